"""A front end's side of the engine process: attach to it (or start and supervise it), submit, cancel.

    client = EngineClient(settings, source, obs)
    await client.start()                     # owner: starts serving.engine_core (engine_launch.py); waits until warm
    preds = await client.submit(ids, arrived)  # -> list[Remote]; raises EngineError
    await client.stop()                      # Bye; the owner waits for the engine to drain and exit

Every front end of one server (uvicorn --workers N, gunicorn -w N, or one process) derives the same
socket path; the first to take its lock file starts the engine as its child and supervises it: a
dead engine, or one whose heartbeats stop or whose pass outlasts ENGINE_STALL_S, is killed and
started again, with a back-off that doubles while it keeps dying young. The others attach; if the
owner dies, its engine dies with it and the first of them to take the lock starts a new one. Any
front end that loses the engine fails every request waiting on it with EngineError("down") at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from serving import wire
from serving.channel import Channel
from serving.engine_launch import EngineProcess
from serving.ops import Observability
from serving.settings import Settings
from serving.source import Source

log = logging.getLogger("sentimentalyzer.engine_client")
HEARTBEAT_S = 0.1  # the engine's (serving/engine_core.py)
LOST_AFTER_S = 2.0  # no heartbeat for this long: the engine is gone or frozen
BACKOFF_S = (0.5, 30.0)  # first and longest wait before starting a dead engine again
STABLE_S = 30.0  # an engine that lived this long died of something else than a crash loop
START_LIMIT_S = 900.0  # the longest a first start (load and warm-up) may take
_apps = itertools.count(1)


class EngineError(Exception):
    """kind: busy, deadline, stopped, down, cancelled or error; retry_after_s for the 503s."""

    def __init__(self, kind: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.kind, self.retry_after_s = kind, retry_after_s


def socket_path(settings: Settings) -> Path:
    """ENGINE_SOCKET, or one path per server: the workers of one uvicorn or gunicorn share their
    parent's; a server run as one process has its own (and each app object in it, for tests)."""
    if settings.engine_socket:
        return Path(settings.engine_socket)
    base = Path(tempfile.gettempdir()) / f"sentimentalyzer-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"engine-{_server_key()}.sock"


def _server_key() -> str:
    if multiprocessing.parent_process() is not None:  # a uvicorn worker (spawned)
        return f"p{os.getppid()}"
    with contextlib.suppress(OSError):
        if b"gunicorn" in Path(f"/proc/{os.getppid()}/cmdline").read_bytes():  # a gunicorn worker (forked)
            return f"p{os.getppid()}"
    return f"{os.getpid()}-{next(_apps)}"


class EngineClient:
    def __init__(self, settings: Settings, source: Source, obs: Observability) -> None:
        self.settings, self.source, self.obs = settings, source, obs
        self.path = socket_path(settings)
        self.status: wire.Status | None = None
        self.up = False
        self.proc: EngineProcess | None = None
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._lock: IO[str] | None = None
        self._channel: Channel | None = None
        self._monitor: Channel | None = None
        self._outbox: list[tuple[int, bytes]] = []  # (rid of a Submit or 0, frame): sent once per loop turn
        self._flush_handle: asyncio.Handle | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lost_timer: asyncio.TimerHandle | None = None
        self._down_tick: asyncio.TimerHandle | None = None
        self._warm = asyncio.Event()
        self._stopping = False
        self._first_exit: asyncio.Future[int] | None = None

    @property
    def owner(self) -> bool:
        return self._lock is not None

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._first_exit = loop.create_future()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for an engine that is not there
        self._monitor = Channel(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED), self._watch)
        sock.connect(f"ipc://{self.path}")
        self._channel = Channel(sock, self._take)
        self._monitor.start()
        self._channel.start()
        self._while_down()
        warm: asyncio.Future[Any] = asyncio.ensure_future(self._warm.wait())
        await asyncio.wait([warm, self._first_exit], timeout=START_LIMIT_S, return_when=asyncio.FIRST_COMPLETED)
        if not self._warm.is_set():
            warm.cancel()
            exited = self._first_exit.result() if self._first_exit.done() else None
            await self.stop()
            raise RuntimeError(
                f"the engine process exited with {exited} before it was ready (its log is above)"
                if exited is not None
                else f"the engine did not get ready within {START_LIMIT_S:.0f} s"
            )

    async def stop(self) -> None:
        """Bye to the engine; the owner then waits until it has drained and exited (bounded)."""
        self._stopping = True
        if self._channel is not None:
            self._send(wire.Bye(os.getpid()))
            self._flush()  # now: the socket may close before the loop turns again
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), self.settings.request_timeout_s + 10)
            except TimeoutError:
                log.error("the engine did not exit after its front ends left: killed")
                self.proc.kill()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in (self._lost_timer, self._down_tick):
            if timer is not None:
                timer.cancel()
        self._fail_pending(EngineError("stopped", "server shutting down"))
        for channel in (self._channel, self._monitor):
            if channel is not None:
                channel.close()
        if self._ctx is not None:
            self._ctx.term()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def ready(self) -> bool:
        return self.up and not self._stopping

    # -------------------------------------------------------------------------------------- requests

    async def submit(self, ids: list[list[int]], arrived: float) -> wire.Answer:
        """One request's texts; cancelling the caller cancels its items in the engine."""
        if not self.up:
            raise EngineError("down", "the engine is not running (restarting)", 1.0)
        rid = next(self._rids)
        future: asyncio.Future[wire.Answer] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._send(wire.Submit(rid, ids, arrived))
        try:
            return await future
        except asyncio.CancelledError:
            self._send(wire.Cancel(rid))
            raise
        finally:
            self._pending.pop(rid, None)

    async def metrics_text(self) -> bytes:
        """The engine's own metrics (empty while it is down)."""
        if not self.up:
            return b""
        rid = next(self._rids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._send(wire.Query(rid))
        try:
            return (await asyncio.wait_for(future, 2.0)).encode()
        except (TimeoutError, EngineError):
            return b""
        finally:
            self._pending.pop(rid, None)

    def _send(self, msg: wire.ToEngine) -> None:
        # Requests that arrive in one loop turn travel to the engine in one message.
        self._outbox.append((msg.rid if isinstance(msg, wire.Submit) else 0, wire.encode(msg)))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        outbox, self._outbox = self._outbox, []
        if not outbox or self._channel is None or self._channel.send([frame for _, frame in outbox]):
            return
        # No engine connected (IMMEDIATE) or its queue full: the requests in it fail now, not later.
        # A lost Hello, Cancel, Query or Bye is sent again by supervision, or no longer matters.
        for rid, _ in outbox:
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(EngineError("down", "the engine is not connected or not reading; retry", 1.0))

    def _take(self, message: list[bytes]) -> None:
        for frame in message:
            msg = wire.decode_from_engine(frame)
            if isinstance(msg, wire.Status):
                self._beat(msg)
                continue
            future = self._pending.get(msg.rid)
            if future is None or future.done():
                continue  # its caller went away
            if isinstance(msg, wire.Failed):
                future.set_exception(EngineError(msg.kind, msg.message, msg.retry_after_s))
            elif isinstance(msg, wire.MetricsText):
                future.set_result(msg.text)
            else:
                future.set_result(msg)

    # ----------------------------------------------------------------------------------- supervision

    def _watch(self, message: list[bytes]) -> None:
        """The kernel closes a dead engine's end of the socket at once: every front end hears of it
        here, long before a missed heartbeat would tell (the owner also sees its child exit)."""
        event = parse_monitor_message(message)
        if event["event"] == zmq.EVENT_DISCONNECTED and self.up and not self._stopping:
            self._lost("the engine closed its socket")

    def _beat(self, status: wire.Status) -> None:
        self.status = status
        if status.busy_s > self.settings.engine_stall_s:
            return self._lost(f"stalled: a pass has run for {status.busy_s:.1f} s (ENGINE_STALL_S)")
        self._arm_lost_timer()
        if status.ready and not self.up:
            self.up = True
            self.obs.engine_up.set(1)
            self._warm.set()
            log.info("engine %d is serving", status.pid)

    def _arm_lost_timer(self) -> None:
        if self._lost_timer is not None:
            self._lost_timer.cancel()
        loop = asyncio.get_running_loop()
        self._lost_timer = loop.call_later(LOST_AFTER_S, self._no_heartbeat)

    def _no_heartbeat(self) -> None:
        # A front end whose own loop was held (a long GC pause, a blocking call, a paused process) runs
        # this timer before it reads the heartbeats that wait on its socket: those say the engine is alive.
        if self._channel is not None and int(self._channel.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            return self._arm_lost_timer()
        self._lost(f"no heartbeat for {LOST_AFTER_S:.0f} s")

    def _lost(self, reason: str) -> None:
        """The engine is dead or stuck: nobody waits for it; the owner kills it (its supervisor then
        starts another), the others take over if the owner itself is gone."""
        if self._lost_timer is not None:
            self._lost_timer.cancel()
        if self.up:
            log.error("engine lost: %s", reason)
        self.up = False
        self.obs.engine_up.set(0)
        self._fail_pending(EngineError("down", f"the engine failed ({reason}); retry", 1.0))
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self._down_tick is None:
            self._while_down()

    def _while_down(self) -> None:
        """Until heartbeats come: Hello again (a new engine knows no front end), and take over the
        engine if its owner is gone, every few heartbeats (one such timer at a time)."""
        self._down_tick = None
        if self.up or self._stopping:
            return
        self._send(wire.Hello(os.getpid()))
        self._take_ownership()
        self._down_tick = asyncio.get_running_loop().call_later(3 * HEARTBEAT_S, self._while_down)

    def _fail_pending(self, error: EngineError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    def _take_ownership(self) -> None:
        if self.owner or self._stopping:
            return
        lock = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115  # held open: the lock lives with it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return
        self._lock = lock
        self._tasks.append(asyncio.create_task(self._supervise(), name="engine-supervisor"))

    async def _supervise(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stopping:
            self.proc = await self._spawn()
            born = asyncio.get_running_loop().time()
            code = await self.proc.wait()
            if self._stopping:
                return
            if not self._warm.is_set() and self._first_exit and not self._first_exit.done():
                return self._first_exit.set_result(code)  # never got warm: a setup error, not a crash loop
            self._lost(f"engine exited with {code}")
            lived = asyncio.get_running_loop().time() - born
            backoff = BACKOFF_S[0] if lived > STABLE_S else min(BACKOFF_S[1], backoff * 2)
            log.error(
                "engine %d exited with %s after %.1f s: starting another in %.1f s", self.proc.pid, code, lived, backoff
            )
            await asyncio.sleep(backoff)
            self.obs.engine_restarts.inc()

    async def _spawn(self) -> EngineProcess:
        s = self.settings
        fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.repr}  # no keys or URLs
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}  # its own registry
        argv = ["--socket", str(self.path), "--parent", str(os.getpid()), "--settings", json.dumps(fields)]
        argv += ["--source", json.dumps(dataclasses.asdict(self.source))]
        return await EngineProcess.start(argv, env)
