"""The batched server's engine process: the model and its one queue, fed by every HTTP front end.

    python -m serving.engine_core --socket /tmp/sentimentalyzer-0/engine-41.sock --parent 41 \\
        --settings '{"model_id": "stand-in", ...}' --source '{"path": ..., "kind": "stand-in"}'

Started (forked from a forkserver that has imported torch: serving/engine_launch.py, or run as
above) and supervised by one front end (serving/engine_client.py), never by hand. It binds a ZeroMQ
ROUTER socket at once and sends every front end that said Hello a Status heartbeat (ready=False
while it loads), then loads the model on the cores that serving/cores.py plans, warms it up, and
serves: each Submit (one request's token ids) becomes items of one DynamicBatcher (batcher.py), whose
worker thread alone runs the model; admission, deadlines, queue bounds and cancels are the batcher's,
answered here, where the queue is (exact, not from a state that is stale by one hop). SIGINT and
SIGTERM are ignored: the engine drains and exits when its last front end has said Bye or died, and
dies with the front end that started it (PR_SET_PDEATHSIG), so it is never left orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import importlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable

import zmq
from prometheus_client import CollectorRegistry

from batcher import BatcherStopped, BatchInfo, DeadlineExceeded, Done, DynamicBatcher, QueueFull
from serving import wire
from serving.channel import Channel
from serving.cores import CorePlan, apply_plan, plan_cores
from serving.model import Engine, PassStats, Prediction, Source, load_engine
from serving.ops import EngineMetrics, configure_logging
from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.engine_core")
HEARTBEAT_S = 0.1  # how often front ends hear from the engine; they call it lost after a few misses
PR_SET_PDEATHSIG = 1


class EngineCore:
    """One engine: a model, a batcher over it, and the socket every front end talks to."""

    def __init__(self, settings: Settings, source: Source, plan: CorePlan, address: str) -> None:
        self.settings, self.source, self.plan, self.address = settings, source, plan, address
        self.metrics = EngineMetrics(CollectorRegistry())
        self.engine: Engine | None = None
        self.batcher: DynamicBatcher[list[int], Prediction] | None = None
        self.fronts: dict[bytes, int] = {}  # ZeroMQ identity -> front-end pid
        self.seen_front = False
        self.pending: dict[tuple[bytes, int], list[asyncio.Future[Done[Prediction]]]] = {}
        self.channel: Channel | None = None
        self.outbox: dict[bytes, list[bytes]] = {}  # frames per front end, sent once per loop turn
        self.flush: asyncio.Handle | None = None
        self.done = asyncio.Event()
        self.answered = asyncio.Event()  # set while no request waits for its answer
        self.answered.set()

    async def serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(self.address)
        self.channel = Channel(sock, self._take)
        self.channel.start()
        beats = asyncio.create_task(self._heartbeats())
        try:
            await self._load()
            await self.done.wait()
        finally:
            if self.batcher is not None:
                await self.batcher.stop()  # every item still queued is computed and answered
            with contextlib.suppress(TimeoutError):  # their answers' callbacks run a loop turn or two later
                await asyncio.wait_for(self.answered.wait(), 1.0)
            self._flush()  # and are sent before the socket closes
            beats.cancel()
            self.channel.close(linger_ms=1000)
            ctx.term()

    async def _load(self) -> None:
        s = self.settings
        factory = _factory(s.engine_factory)
        engine = await asyncio.to_thread(factory, s, self.source)
        await asyncio.to_thread(engine.warmup)
        self.engine = engine
        self.batcher = DynamicBatcher(
            self._run,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_s,
            max_queue=s.max_queue,
            timeout_s=s.request_timeout_s,
            cost_of=len,
            # packed: one take is one pass of at most the calibrated tokens; padded engines group a take
            max_batch_cost=engine.max_pass_tokens if engine.packed is not None else None,
            max_queue_cost=s.max_queue_tokens,
            admit_by_deadline=True,
            on_batch=self._on_batch,
            on_drop=lambda reason: self.metrics.dropped.labels(reason).inc(),
            name="model",
        )
        await self.batcher.start()
        log.info("engine %d ready: %s", os.getpid(), self.plan.describe())

    def describe(self) -> dict[str, object]:
        s, engine = self.settings, self.engine
        info = engine.describe() if engine is not None else {}
        batching = {
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "request_timeout_ms": s.request_timeout_ms,
            "batch_policy": "packed" if engine is not None and engine.packed else s.batch_policy,
            "max_batch_tokens": engine.max_pass_tokens if engine is not None else s.max_batch_tokens,
            "max_queue_tokens": s.max_queue_tokens,
        }
        return {**info, "batching": batching, "engine_pid": os.getpid(), "engine_cores": self.plan.describe()}

    # --------------------------------------------------------------------------------- the socket

    def _send(self, identity: bytes, msg: wire.FromEngine) -> None:
        # A pass answers many requests at once: one message per front end per loop turn, not one each.
        self.outbox.setdefault(identity, []).append(wire.encode(msg))
        if self.flush is None:
            self.flush = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush = None
        outbox, self.outbox = self.outbox, {}
        for identity, frames in outbox.items():
            # a ROUTER drops what it cannot route (a front end that is gone) rather than wait
            if self.channel is not None:
                self.channel.send([identity, *frames])

    def _take(self, message: list[bytes]) -> None:
        identity, *frames = message
        for frame in frames:
            try:
                msg = wire.decode_to_engine(frame)
            except Exception:  # msgspec's DecodeError or ValidationError: a bad frame, not a bad engine
                log.warning("dropped a malformed frame from a front end")
                continue
            self._dispatch(identity, msg)

    def _dispatch(self, identity: bytes, msg: wire.ToEngine) -> None:
        match msg:
            case wire.Submit():
                self._submit(identity, msg)
            case wire.Cancel(rid=rid):
                for future in self.pending.get((identity, rid), ()):
                    future.cancel()
            case wire.Hello(pid=pid):
                self.fronts[identity] = pid
                self.seen_front = True
                self._send(identity, self._status())
            case wire.Bye():
                self.fronts.pop(identity, None)
                self._maybe_done()
            case wire.Query(rid=rid):
                self._send(identity, wire.MetricsText(rid, self.metrics.exposition().decode()))

    def _submit(self, identity: bytes, msg: wire.Submit) -> None:
        batcher = self.batcher
        if batcher is None:
            return self._send(identity, wire.Failed(msg.rid, "stopped", "engine not ready"))
        futures: list[asyncio.Future[Done[Prediction]]] = []
        try:
            for ids in msg.ids:
                futures.append(batcher.submit_nowait(ids, msg.arrived))
        except QueueFull as exc:
            for f in futures:
                f.cancel()
            return self._send(identity, wire.Failed(msg.rid, "busy", f"server busy: {exc}", exc.retry_after_s))
        except BatcherStopped:
            return self._send(identity, wire.Failed(msg.rid, "stopped", "server shutting down"))
        self.metrics.queue_depth.set(batcher.depth)
        self.pending[(identity, msg.rid)] = futures
        self.answered.clear()
        # one callback per request, not a task per item: it answers the front end once
        answer = functools.partial(self._answer, identity, msg.rid, time.perf_counter())
        if len(futures) == 1:  # most requests: no gather's extra future and callbacks
            futures[0].add_done_callback(answer)
        else:
            asyncio.gather(*futures).add_done_callback(answer)

    def _answer(
        self,
        identity: bytes,
        rid: int,
        received: float,
        outcome: asyncio.Future[list[Done[Prediction]]] | asyncio.Future[Done[Prediction]],
    ) -> None:
        self.pending.pop((identity, rid), None)
        if not self.pending:
            self.answered.set()
        if outcome.cancelled():
            return self._send(identity, wire.Failed(rid, "cancelled", "client disconnected"))
        exc = outcome.exception()
        if exc is None:
            result = outcome.result()
            done = result if isinstance(result, list) else [result]
            preds = [d.value for d in done]
            return self._send(
                identity,
                wire.Answer(
                    rid,
                    [p.label for p in preds],
                    [p.score for p in preds],
                    [p.batch_size for p in preds],
                    [p.infer_ms for p in preds],
                    [d.queue_wait_s * 1000 for d in done],
                    [d.predicted_s for d in done],
                    (time.perf_counter() - received) * 1000,
                ),
            )
        if isinstance(exc, asyncio.CancelledError):
            return self._send(identity, wire.Failed(rid, "cancelled", "client disconnected"))
        if isinstance(exc, DeadlineExceeded):
            return self._send(identity, wire.Failed(rid, "deadline", f"request timed out in the queue: {exc}"))
        if isinstance(exc, BatcherStopped):
            return self._send(identity, wire.Failed(rid, "stopped", "server shutting down"))
        log.error("a request failed in the model: %r", exc)
        self._send(identity, wire.Failed(rid, "error", f"{type(exc).__name__}: {exc}"))

    def _status(self) -> wire.Status:
        b = self.batcher
        busy = b.stats.busy_since if b is not None else None
        return wire.Status(
            pid=os.getpid(),
            ready=b is not None and b.accepting,
            depth=b.depth if b is not None else 0,
            busy_s=0.0 if busy is None else time.monotonic() - busy,
            passes=b.stats.batches if b is not None else 0,
            info=self.describe(),
        )

    async def _heartbeats(self) -> None:
        while True:
            status = self._status()
            for identity, pid in list(self.fronts.items()):
                if not _alive(pid):  # died without a Bye: it waits for nothing any more
                    self.fronts.pop(identity, None)
                    continue
                self._send(identity, status)
            self._maybe_done()
            await asyncio.sleep(HEARTBEAT_S)

    def _maybe_done(self) -> None:
        if self.seen_front and not self.fronts:
            self.done.set()

    # ---------------------------------------------------------------------------- the worker thread

    def _run(self, batch: list[list[int]]) -> list[Prediction]:
        assert self.engine is not None
        return self.engine.predict_ids(batch, on_pass=self._on_pass)

    def _on_pass(self, p: PassStats) -> None:
        self.metrics.observe_pass(p.items, p.real_tokens, p.computed_tokens)

    def _on_batch(self, info: BatchInfo) -> None:
        m = self.metrics
        for wait in info.queue_waits_s:
            m.queue_wait.observe(wait)
        m.compute.observe(info.compute_s)
        m.dispatch.labels(info.reason).inc()
        m.oldest_wait.observe(max(info.queue_waits_s))
        if self.batcher is not None:
            m.queue_depth.set(self.batcher.depth)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (as the front ends run under uvicorn): its loop turn is cheaper,
    and the engine's loop turns once for every message it reads and every answer it sends."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _factory(spec: str) -> Callable[[Settings, Source], Engine]:
    if not spec:
        return load_engine
    module, _, name = spec.partition(":")
    factory: Callable[[Settings, Source], Engine] = getattr(importlib.import_module(module), name)
    return factory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _die_with(front_end: int) -> None:
    """The kernel kills this process when its parent dies (Linux): the front end's forkserver, which
    exits with that front end (serving/engine_launch.py), or the front end if it ran this directly."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or not _alive(front_end):  # it died before the line above took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the IPC socket path to bind")
    parser.add_argument("--parent", type=int, default=0, help="the front end's pid: die with it")
    parser.add_argument("--settings", required=True, help="the front end's Settings as JSON")
    parser.add_argument("--source", required=True, help="where the weights come from, as JSON")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with(args.parent)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the front ends decide when it stops: it drains with them
        signal.signal(sig, signal.SIG_IGN)
    settings = Settings(**json.loads(args.settings))
    source = Source(**json.loads(args.source))
    plan = plan_cores(settings, os.sched_getaffinity(0))
    apply_plan(plan)  # before any thread starts: threads inherit the affinity
    configure_logging(settings, everything=True)  # LOG_FORMAT=json covers the engine's lines too
    core = EngineCore(settings, source, plan, f"ipc://{args.socket}")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(core.serve())


if __name__ == "__main__":
    main()
