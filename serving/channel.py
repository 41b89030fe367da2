"""A ZeroMQ socket on the running asyncio loop, read when readable and written without waiting.

    channel = Channel(ctx.socket(zmq.DEALER), on_message)  # a plain zmq.Socket, connected or bound
    channel.start()                  # from the loop: on_message(frames) for every message, in order
    channel.send([frame, ...])       # False when ZeroMQ would have to wait (no peer yet, queue full)
    channel.close()

The hop between front ends and engine (serving/engine_client.py, serving/engine_core.py) carries
thousands of messages a second on two cores, so each costs no future, task or loop turn of its own
(pyzmq's asyncio sockets make a future per call). ZeroMQ's file descriptor is edge-triggered and is
also the one its sends use: after it fires, and after every send, the socket is read until it has
nothing more, or a message that arrived meanwhile would wait for the next edge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger("sentimentalyzer.channel")
BURST = 256  # messages read in one go before the loop runs anything else


class Channel:
    def __init__(self, sock: zmq.Socket[bytes], on_message: Callable[[list[bytes]], None]) -> None:
        self.sock, self.on_message = sock, on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._read)
        self._read()  # what arrived before the reader was there: no edge will announce it

    def send(self, frames: list[bytes]) -> bool:
        if self.sock.closed:
            return False
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        finally:
            self._after_io()

    def close(self, linger_ms: int = 0) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self.sock.close(linger=linger_ms)

    def _read(self) -> None:
        self._scheduled = False
        for _ in range(BURST):
            if self.sock.closed:
                return
            try:
                message = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.on_message(message)
            except Exception:  # one bad message must not stop the reading: nothing would restart it
                log.exception("a message could not be handled")
        self._schedule()  # more is waiting: read it after what else the loop has to run

    def _after_io(self) -> None:
        if not self.sock.closed and int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._read)
