"""The naive server: the model called inline, once per request (the pattern that breaks under load).

    uvicorn naive_server:app --port 8000
    NAIVE_MODE=blocking uvicorn naive_server:app --port 8000

NAIVE_MODE picks how requests reach the model, each a row of the benchmark:
- threadpool (default): a `def` endpoint, so FastAPI's thread pool runs up to 40 model calls at once,
  each a batch of one, all fighting over the same cores;
- blocking: an `async def` endpoint that calls the model on the event loop, the mistake many
  tutorials make: while one request computes, the server cannot even answer /health;
- on-demand: loads the model from disk for every request ("load per call").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from serving.api import (
    BatchRequest,
    BatchResponse,
    Label,
    PredictRequest,
    PredictResponse,
    build_app,
    check_texts,
    require_ready,
)
from serving.model import Engine, PassStats, Prediction, load_engine, resolve_source
from serving.ops import Observability, configure_logging
from serving.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_logging(settings)
    source = await asyncio.to_thread(resolve_source, settings)
    engine = await asyncio.to_thread(load_engine, settings, source)
    await asyncio.to_thread(engine.warmup, False)
    app.state.engine = engine
    app.state.is_ready = lambda: True
    app.state.ready_info = lambda: {**engine.describe(), "naive_mode": settings.naive_mode}
    app.state.obs.ready.set(1)
    try:
        yield
    finally:
        app.state.is_ready = lambda: False
        app.state.obs.ready.set(0)


def _run(request: Request, texts: list[str]) -> list[Prediction]:
    state = request.app.state
    engine: Engine = state.engine
    if state.settings.naive_mode == "on-demand":
        engine = load_engine(state.settings, engine.source)
    return engine.predict(texts, on_pass=_metrics_hook(state.obs))


def _metrics_hook(obs: Observability):
    def on_pass(p: PassStats) -> None:
        obs.batch_size.observe(p.items)
        obs.real_tokens.inc(p.real_tokens)
        obs.computed_tokens.inc(p.computed_tokens)

    return on_pass


def _answer(started: float, pred: Prediction) -> PredictResponse:
    return PredictResponse(label=pred.label, score=pred.score, latency_ms=(time.perf_counter() - started) * 1000)


def _batch_answer(started: float, preds: list[Prediction]) -> BatchResponse:
    return BatchResponse(
        predictions=[Label(label=p.label, score=p.score) for p in preds],
        latency_ms=(time.perf_counter() - started) * 1000,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = build_app("naive", lifespan, settings)

    if settings.naive_mode == "blocking":

        @app.post("/predict")
        async def predict(body: PredictRequest, request: Request) -> PredictResponse:
            started = time.perf_counter()
            check_texts(require_ready(request), [body.text], batch=False)
            return _answer(started, _run(request, [body.text])[0])  # on the event loop: blocks everything

        @app.post("/predict/batch")
        async def predict_batch(body: BatchRequest, request: Request) -> BatchResponse:
            started = time.perf_counter()
            check_texts(require_ready(request), body.texts, batch=True)
            return _batch_answer(started, _run(request, body.texts))
    else:

        @app.post("/predict")
        def predict(body: PredictRequest, request: Request) -> PredictResponse:  # type: ignore[no-redef]
            started = time.perf_counter()
            check_texts(require_ready(request), [body.text], batch=False)
            return _answer(started, _run(request, [body.text])[0])

        @app.post("/predict/batch")
        def predict_batch(body: BatchRequest, request: Request) -> BatchResponse:  # type: ignore[no-redef]
            started = time.perf_counter()
            check_texts(require_ready(request), body.texts, batch=True)
            return _batch_answer(started, _run(request, body.texts))

    return app


app = create_app()
