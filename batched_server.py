"""The batched server: requests queue, a background consumer runs one forward pass per batch.

    uvicorn batched_server:app --port 8001
    MAX_BATCH_SIZE=32 MAX_WAIT_MS=5 uvicorn batched_server:app --port 8001

Each request becomes one item of a `DynamicBatcher` (batcher.py). Its worker thread owns the model:
it tokenizes every text it takes in one call, splits them into length groups (model.plan_groups)
and pads each group only to its own longest text, never to 512. Answers carry `batch_size`, and
the headers `X-Batch-Size` and `Server-Timing` (queue, tokenize, infer). On SIGTERM uvicorn stops
accepting, in-flight requests finish, then the lifespan drains whatever is still queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response

from batcher import BatcherStopped, BatchInfo, DeadlineExceeded, DynamicBatcher, QueueFull, retry_after_header
from serving.api import (
    ApiError,
    BatchedPredictResponse,
    BatchRequest,
    BatchResponse,
    Label,
    PredictRequest,
    build_app,
    check_texts,
    require_ready,
)
from serving.model import Engine, PassStats, Prediction, load_engine, resolve_source
from serving.ops import Observability, configure_logging
from serving.settings import Settings

STALL_S = 120.0  # a batch computing longer than this means the worker is stuck: /ready turns 503


@dataclass(frozen=True, slots=True)
class Job:
    text: str
    submitted: float  # perf_counter at submit


@dataclass(frozen=True, slots=True)
class Served:
    prediction: Prediction
    queue_ms: float


def make_batch_fn(engine: Engine, obs: Observability):
    """The function the worker thread runs on each taken batch."""

    def on_pass(p: PassStats) -> None:
        obs.batch_size.observe(p.items)
        obs.real_tokens.inc(p.real_tokens)
        obs.computed_tokens.inc(p.computed_tokens)

    def run(jobs: list[Job]) -> list[Served]:
        started = time.perf_counter()
        preds = engine.predict([j.text for j in jobs], on_pass=on_pass)
        return [Served(p, (started - j.submitted) * 1000) for p, j in zip(preds, jobs)]

    return run


def make_batcher(settings: Settings, engine: Engine, obs: Observability) -> DynamicBatcher[Job, Served]:
    def on_batch(info: BatchInfo) -> None:
        for wait in info.queue_waits_s:
            obs.queue_wait.observe(wait)
        obs.compute.observe(info.compute_s)
        obs.queue_depth.set(batcher.depth)

    batcher: DynamicBatcher[Job, Served] = DynamicBatcher(
        make_batch_fn(engine, obs),
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_s,
        max_queue=settings.max_queue,
        timeout_s=settings.request_timeout_s,
        on_batch=on_batch,
        on_drop=lambda reason: obs.dropped.labels(reason).inc(),
        name="model",
    )
    return batcher


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_logging(settings)
    source = await asyncio.to_thread(resolve_source, settings)
    engine = await asyncio.to_thread(load_engine, settings, source)
    await asyncio.to_thread(engine.warmup)
    batcher = make_batcher(settings, engine, app.state.obs)
    await batcher.start()
    app.state.engine, app.state.batcher = engine, batcher
    app.state.is_ready = lambda: batcher.accepting and batcher.healthy(STALL_S)
    app.state.ready_info = lambda: {
        **engine.describe(),
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue": settings.max_queue,
            "request_timeout_ms": settings.request_timeout_ms,
            "batch_policy": settings.batch_policy,
            "max_batch_tokens": settings.max_batch_tokens,
        },
        "queue_depth": batcher.depth,
    }
    app.state.obs.ready.set(1)
    try:
        yield
    finally:
        app.state.obs.ready.set(0)
        await batcher.stop()  # uvicorn has stopped accepting; finish everything still queued


async def _serve(request: Request, texts: list[str]) -> list[Served]:
    """Queues every text, waits for all of them, and maps batcher outcomes to HTTP errors."""
    batcher: DynamicBatcher[Job, Served] = request.app.state.batcher
    now = time.perf_counter()
    futures: list[asyncio.Future[Served]] = []
    try:
        for text in texts:
            futures.append(batcher.submit_nowait(Job(text, now)))
    except QueueFull as exc:
        for f in futures:
            f.cancel()
        raise ApiError(503, f"server busy: {exc}", {"Retry-After": retry_after_header(exc.retry_after_s)}) from None
    except BatcherStopped:
        raise ApiError(503, "server shutting down", {"Retry-After": "1"}) from None
    request.app.state.obs.queue_depth.set(batcher.depth)
    gathered = asyncio.gather(*futures)
    try:
        return await _unless_disconnected(request, gathered)
    except DeadlineExceeded as exc:
        raise ApiError(504, f"request timed out in the queue: {exc}") from None
    except BatcherStopped:
        raise ApiError(503, "server shutting down", {"Retry-After": "1"}) from None


async def _unless_disconnected(request: Request, work: asyncio.Future[list[Served]]) -> list[Served]:
    """Waits for work; if the client goes away first, cancels it so its items are never computed."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
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


def _timing(served: Served) -> str:
    p = served.prediction
    return f"queue;dur={served.queue_ms:.2f}, tokenize;dur={p.tokenize_ms:.2f}, infer;dur={p.infer_ms:.2f}"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = build_app("batched", lifespan, settings)

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request, response: Response) -> BatchedPredictResponse:
        started = time.perf_counter()
        check_texts(require_ready(request), [body.text], batch=False)
        served = (await _serve(request, [body.text]))[0]
        p = served.prediction
        response.headers["X-Batch-Size"] = str(p.batch_size)
        response.headers["Server-Timing"] = _timing(served)
        return BatchedPredictResponse(
            label=p.label, score=p.score, batch_size=p.batch_size, latency_ms=(time.perf_counter() - started) * 1000
        )

    @app.post("/predict/batch")
    async def predict_batch(body: BatchRequest, request: Request) -> BatchResponse:
        started = time.perf_counter()
        check_texts(require_ready(request), body.texts, batch=True)
        served = await _serve(request, body.texts)
        return BatchResponse(
            predictions=[Label(label=s.prediction.label, score=s.prediction.score) for s in served],
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    return app


app = create_app()
