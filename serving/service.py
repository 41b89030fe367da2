"""The app factory both servers share: a Service (how requests reach the model) behind the contract.

    from serving.service import create_app
    app = create_app("naive", InlineService, settings)   # naive_server.py
    app = create_app("batched", BatchedService, settings)  # batched_server.py

A Service is built in the app's lifespan from the settings and the app's metrics, then `start`ed
(load, warm up, start workers); /ready asks `ready()` and shows `describe()`; POST /predict and
/predict/batch validate the body, then await `predict(request, texts)`; on shutdown `stop()` runs
after uvicorn has stopped accepting (the batched one finishes everything queued). With GRPC_PORT set,
the lifespan also serves the Open Inference Protocol over gRPC (serving/grpc_server.py) while the
Service runs, through this same app. Predictions that went through the batched server's answer cache
say so: /predict answers `X-Cache: miss|hit|coalesced` and /predict/batch `X-Cache: hit=H, miss=M,
coalesced=C` (no header with the cache off). The routes exist once, here: a server module holds only
what makes it different.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request, Response

from serving import grpc_server
from serving.api import (
    BatchedPredictResponse,
    BatchRequest,
    BatchResponse,
    Label,
    PredictRequest,
    PredictResponse,
    build_app,
    check_texts,
    require_ready,
)
from serving.oip import V2Errors, add_v2_routes
from serving.ops import Observability
from serving.settings import Settings
from serving.text import Prediction


class Service(Protocol):
    async def start(self) -> None:
        """Loads and warms up the model and starts whatever serves it; the app is ready after."""

    def ready(self) -> bool:
        """Whether requests can be answered now (false while stopping, or once a worker died)."""

    def describe(self) -> dict[str, object]:
        """The /ready body: model, engine and, for the batched server, its batching settings."""

    async def predict(self, request: Request, texts: list[str]) -> list[Prediction]:
        """One Prediction per text, in order; raises api.ApiError for answers other than 200."""

    async def stop(self) -> None:
        """Called once uvicorn stopped accepting: finish what was accepted, then release."""


def create_app(kind: str, service_of: Callable[[Settings, Observability], Service], settings: Settings) -> FastAPI:
    """The contract's app (api.build_app) with the prediction routes served by `service_of`'s Service."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current: Settings = app.state.settings
        service = service_of(current, app.state.obs)
        await service.start()
        app.state.service = service
        grpc = None
        try:
            if current.grpc_port:  # an adapter onto this very app: its calls pass the same middleware
                grpc = await grpc_server.start(app, current.grpc_port, app.state.obs)
            app.state.obs.ready.set(1)
            yield
        finally:
            app.state.obs.ready.set(0)
            if grpc is not None:  # calls in flight finish (bounded like a request), before the model goes
                await grpc_server.stop(grpc, current.request_timeout_s + 1.0)
            await service.stop()

    app = build_app(kind, lifespan, settings)
    add_v2_routes(app)  # the Open Inference Protocol over HTTP: the same Service behind it
    app.add_middleware(V2Errors)  # outermost: every refusal under /v2 in the protocol's form
    batched = kind == "batched"

    @app.post("/predict", response_model=BatchedPredictResponse if batched else PredictResponse)
    async def predict(body: PredictRequest, request: Request, response: Response) -> PredictResponse:
        started = time.perf_counter()
        check_texts(require_ready(request), [body.text], batch=False)
        p = (await request.app.state.service.predict(request, [body.text]))[0]
        latency_ms = (time.perf_counter() - started) * 1000
        if not batched:
            return PredictResponse(label=p.label, score=p.score, latency_ms=latency_ms)
        response.headers["X-Batch-Size"] = str(p.batch_size)  # 0 for a cache hit: no pass served it
        if p.cache:  # the answer cache is on (CACHE_BYTES): miss, hit or coalesced
            response.headers["X-Cache"] = p.cache
        response.headers["Server-Timing"] = (
            f"queue;dur={p.queue_ms:.2f}, tokenize;dur={p.tokenize_ms:.2f}, infer;dur={p.infer_ms:.2f}"
        )
        return BatchedPredictResponse(label=p.label, score=p.score, batch_size=p.batch_size, latency_ms=latency_ms)

    @app.post("/predict/batch")
    async def predict_batch(body: BatchRequest, request: Request, response: Response) -> BatchResponse:
        started = time.perf_counter()
        check_texts(require_ready(request), body.texts, batch=True)
        preds = await request.app.state.service.predict(request, body.texts)
        if preds and preds[0].cache:
            counts = Counter(p.cache for p in preds)
            response.headers["X-Cache"] = ", ".join(f"{k}={counts[k]}" for k in ("hit", "miss", "coalesced"))
        return BatchResponse(
            predictions=[Label(label=p.label, score=p.score) for p in preds],
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    return app
