"""The messages between the batched server's front ends and its engine process: one msgpack frame each.

    from serving.wire import Submit, decode_to_engine, encode
    frame = encode(Submit(rid=7, ids=[[101, 7592, 102]], arrived=time.monotonic()))
    msg = decode_to_engine(frame)  # -> Submit(...); match on the type

A front end (DEALER socket) sends Hello once, then Submit / Cancel / Query, and Bye when it stops; the
engine (ROUTER) answers each Submit with exactly one Answer or Failed, each Query with MetricsText,
and sends every front end a Status heartbeat. A ZeroMQ message carries one or more frames, one message
each: what one side has to send in one loop turn (the answers of a pass, the requests that arrived
together) goes as one message, so the hop's cost per request falls as the load rises. Typed msgspec
structs, tagged by class name, so a malformed frame is a decode error and never a pickle. Times are
time.monotonic(): Linux's CLOCK_MONOTONIC is one clock for every process on the machine, so an
arrival time crosses the hop.
"""

from __future__ import annotations

import msgspec


class Hello(msgspec.Struct, tag=True, frozen=True):
    pid: int


class Bye(msgspec.Struct, tag=True, frozen=True):
    pid: int


class Submit(msgspec.Struct, tag=True, frozen=True):
    """One request's texts as token ids; its deadline counts from `arrived`."""

    rid: int
    ids: list[list[int]]
    arrived: float


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """The client went away: its items still queued are dropped, never computed."""

    rid: int


class Query(msgspec.Struct, tag=True, frozen=True):
    """Asks for the engine's metrics (Prometheus text)."""

    rid: int


class Answer(msgspec.Struct, tag=True, frozen=True):
    """One result per submitted text, in order (lists of equal length)."""

    rid: int
    labels: list[str]
    scores: list[float]
    batch_sizes: list[int]
    infer_ms: list[float]
    queue_ms: list[float]
    predicted_s: list[float | None]
    engine_ms: float = 0.0  # from the Submit frame's arrival in the engine to this answer's departure


class Failed(msgspec.Struct, tag=True, frozen=True):
    """kind: busy (503, retry_after_s), deadline (504), stopped (503) or error (500)."""

    rid: int
    kind: str
    message: str
    retry_after_s: float = 1.0


class MetricsText(msgspec.Struct, tag=True, frozen=True):
    rid: int
    text: str


class Status(msgspec.Struct, tag=True, frozen=True):
    """The engine's heartbeat: alive, warm, how busy; `info` is the engine part of /ready."""

    pid: int
    ready: bool
    depth: int
    busy_s: float  # how long the pass in flight has run (0 when idle): a stall shows here
    passes: int
    info: dict[str, object] = {}


ToEngine = Hello | Bye | Submit | Cancel | Query
FromEngine = Answer | Failed | MetricsText | Status

_encoder = msgspec.msgpack.Encoder()
_to_engine = msgspec.msgpack.Decoder(ToEngine)
_from_engine = msgspec.msgpack.Decoder(FromEngine)


def encode(msg: ToEngine | FromEngine) -> bytes:
    return _encoder.encode(msg)


def decode_to_engine(frame: bytes) -> ToEngine:
    return _to_engine.decode(frame)


def decode_from_engine(frame: bytes) -> FromEngine:
    return _from_engine.decode(frame)
