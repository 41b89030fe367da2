"""The batched server: requests queue, a background consumer runs one forward pass per batch.

    uvicorn batched_server:app --port 8001
    MAX_BATCH_SIZE=32 MAX_WAIT_MS=5 uvicorn batched_server:app --port 8001
    BACKEND=onnx DTYPE=int8 uvicorn batched_server:app --port 8001

A request's texts are tokenized on arrival (in a thread of their own, off the event loop), so each
becomes an item of a `DynamicBatcher` (batcher.py) that knows its token count. The batcher's worker
thread owns the model. With a packed engine (PyTorch DistilBERT) one take is one padding-free pass of
at most the calibrated token budget; with a padded one (ONNX Runtime) a take is split into length
groups, each padded to its longest text on the length ladder (serving/engine.py). A request whose
answer cannot come within REQUEST_TIMEOUT_MS, predicted from the passes that the tokens queued ahead
fill (each timed as fixed + per-token seconds, fitted to recent passes), is refused at once (503 +
Retry-After). Answers carry `batch_size`, and the headers
`X-Batch-Size` and `Server-Timing` (queue, tokenize, infer). On SIGTERM uvicorn stops accepting,
in-flight requests finish, then the lifespan drains the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request

from batcher import BatcherStopped, BatchInfo, DeadlineExceeded, Done, DynamicBatcher, QueueFull, retry_after_header
from serving.api import ApiError
from serving.model import Engine, PassStats, Prediction, load_engine, resolve_source
from serving.ops import Observability
from serving.service import create_app as create_service_app
from serving.settings import Settings

STALL_S = 120.0  # a batch computing longer than this means the worker is stuck: /ready turns 503
MIN_TOKENS = 2  # the fewest tokens a text becomes: [CLS] and [SEP]


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One text, tokenized on arrival: the batcher budgets passes and the queue by its token count."""

    ids: list[int]
    tokenize_ms: float


class BatchedService:
    """Every text is an item of one DynamicBatcher; its worker thread is the only caller of the model."""

    def __init__(self, settings: Settings, obs: Observability) -> None:
        self.settings, self.obs = settings, obs
        self.engine: Engine | None = None
        self.batcher: DynamicBatcher[Job, Prediction] | None = None
        # tokenization stays off the event loop and off the model's thread, so it overlaps a pass
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def start(self) -> None:
        s = self.settings
        source = await asyncio.to_thread(resolve_source, s)
        engine = await asyncio.to_thread(load_engine, s, source)
        await asyncio.to_thread(engine.warmup)
        self.engine = engine
        self.batcher = DynamicBatcher(
            self._run,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_s,
            max_queue=s.max_queue,
            timeout_s=s.request_timeout_s,
            cost_of=lambda job: len(job.ids),
            # packed: one take is one pass of at most the calibrated tokens; padded engines group a take
            max_batch_cost=engine.max_pass_tokens if engine.packed is not None else None,
            max_queue_cost=s.max_queue_tokens,
            admit_by_deadline=True,
            on_batch=self._on_batch,
            on_drop=lambda reason: self.obs.dropped.labels(reason).inc(),
            name="model",
        )
        await self.batcher.start()

    def ready(self) -> bool:
        b = self.batcher
        return b is not None and b.accepting and b.healthy(STALL_S)

    def describe(self) -> dict[str, object]:
        s = self.settings
        info = self.engine.describe() if self.engine is not None else {}
        batching = {
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "request_timeout_ms": s.request_timeout_ms,
            "batch_policy": "packed" if self.engine is not None and self.engine.packed else s.batch_policy,
            "max_batch_tokens": self.engine.max_pass_tokens if self.engine is not None else s.max_batch_tokens,
            "max_queue_tokens": s.max_queue_tokens,
        }
        return {**info, "batching": batching, "queue_depth": self.batcher.depth if self.batcher else 0}

    async def predict(self, request: Request, texts: list[str]) -> list[Prediction]:
        """Queues every text, waits for all of them, and maps batcher outcomes to HTTP errors."""
        batcher, engine = self.batcher, self.engine
        assert batcher is not None and engine is not None  # routed only once ready
        futures: list[asyncio.Future[Done[Prediction]]] = []
        arrived = time.monotonic()  # REQUEST_TIMEOUT_MS counts from here: tokenizing is part of it
        try:
            # refused before tokenizing if even its fewest tokens cannot be served: under a flood the
            # 503 then costs no tokenizer time and does not queue behind other requests' tokenization
            batcher.check_admission(MIN_TOKENS * len(texts))
            jobs = await asyncio.get_running_loop().run_in_executor(self._tokenizer, _tokenize, engine, texts)
            for job in jobs:
                futures.append(batcher.submit_nowait(job, arrived))
        except QueueFull as exc:
            for f in futures:
                f.cancel()
            raise ApiError(503, f"server busy: {exc}", {"Retry-After": retry_after_header(exc.retry_after_s)}) from None
        except BatcherStopped:
            raise ApiError(503, "server shutting down", {"Retry-After": "1"}) from None
        self.obs.queue_depth.set(batcher.depth)
        try:
            done = await _unless_disconnected(request, asyncio.gather(*futures))
        except DeadlineExceeded as exc:
            raise ApiError(504, f"request timed out in the queue: {exc}") from None
        except BatcherStopped:
            raise ApiError(503, "server shutting down", {"Retry-After": "1"}) from None
        answered_s = time.monotonic() - arrived
        for d in done:
            if d.predicted_s:  # how far admission's prediction was off: what REQUEST_TIMEOUT_MS rests on
                self.obs.admission_ratio.observe(answered_s / d.predicted_s)
        return [
            dataclasses.replace(d.value, queue_ms=d.queue_wait_s * 1000, tokenize_ms=job.tokenize_ms)
            for d, job in zip(done, jobs, strict=True)
        ]

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()  # uvicorn has stopped accepting; finish everything still queued
        self._tokenizer.shutdown(wait=True)

    def _run(self, jobs: list[Job]) -> list[Prediction]:
        """The batch function, on the worker thread."""
        assert self.engine is not None
        return self.engine.predict_ids([j.ids for j in jobs], on_pass=self._on_pass)

    def _on_pass(self, p: PassStats) -> None:
        self.obs.observe_pass(p.items, p.real_tokens, p.computed_tokens)

    def _on_batch(self, info: BatchInfo) -> None:
        for wait in info.queue_waits_s:
            self.obs.queue_wait.observe(wait)
        self.obs.compute.observe(info.compute_s)
        self.obs.dispatch.labels(info.reason).inc()
        self.obs.oldest_wait.observe(max(info.queue_waits_s))
        if self.batcher is not None:
            self.obs.queue_depth.set(self.batcher.depth)


def _tokenize(engine: Engine, texts: list[str]) -> list[Job]:
    t0 = time.perf_counter()
    ids = engine.tokenize(texts)
    ms = (time.perf_counter() - t0) * 1000 / len(texts)
    return [Job(x, ms) for x in ids]


async def _unless_disconnected(
    request: Request, work: asyncio.Future[list[Done[Prediction]]]
) -> list[Done[Prediction]]:
    """Waits for work; if the client goes away first, cancels it so its items are never computed."""
    watcher = asyncio.ensure_future(_disconnected(request))
    either: set[asyncio.Future[Any]] = {work, watcher}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        # a gather cancelled while one child already failed would log "exception never retrieved"
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise ApiError(499, "client disconnected")
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app("batched", BatchedService, settings or Settings.from_env())


app = create_app()
