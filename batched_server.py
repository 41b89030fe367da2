"""The batched server: HTTP front ends that tokenize, and one engine process that batches and computes.

    uvicorn batched_server:app --port 8001
    uvicorn batched_server:app --port 8001 --workers 4        # 4 front ends, still one engine and one queue
    MAX_BATCH_SIZE=32 MAX_WAIT_MS=5 uvicorn batched_server:app --port 8001
    BACKEND=onnx DTYPE=int8 uvicorn batched_server:app --port 8001
    CACHE_BYTES=67108864 REDIS_URL=redis://127.0.0.1:6379/0 uvicorn batched_server:app --port 8001

Each front end (this module's app, in each uvicorn or gunicorn worker) tokenizes a request's texts on
arrival, in a thread of its own, and hands the token ids to the engine process over a ZeroMQ socket
(serving/engine_client.py, serving/wire.py). The engine (serving/engine_core.py) runs the model on
cores of its own (serving/cores.py) behind one `DynamicBatcher` (batcher.py): packed passes of at
most the calibrated token budget (PyTorch DistilBERT) or padded length groups on the length ladder
(ONNX Runtime), admission by deadline (503 + Retry-After when REQUEST_TIMEOUT_MS cannot be met), 504
past it, queue bounds, cancels of clients that left. The first front end's lifespan starts the engine
and supervises it; the others attach. If the engine dies or stalls, every waiting request gets 503 at
once and a new engine is started. Answers carry `batch_size`, and the headers `X-Batch-Size` and
`Server-Timing` (queue, tokenize, infer). With CACHE_BYTES set, texts go through the answer cache
(serving/cache.py) first and only those that miss are tokenized and submitted; /predict answers then
carry `X-Cache` (miss, hit or coalesced), /predict/batch the counts. On SIGTERM uvicorn stops
accepting, in-flight requests finish, then the front ends leave and the engine drains its queue and exits.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request

from batcher import retry_after_header
from serving.api import ApiError
from serving.cache import AnswerCache, engine_identity
from serving.engine_client import EngineClient, EngineError
from serving.oip import client_deadline
from serving.ops import Observability
from serving.service import create_app as create_service_app
from serving.settings import Settings
from serving.source import resolve_source
from serving.text import Prediction, TextTokenizer, load_tokenizer

T = TypeVar("T")
STATUS_OF = {"busy": 503, "stopped": 503, "down": 503, "deadline": 504, "cancelled": 499, "error": 500}


class BatchedService:
    """A front end: tokenizes here, computes in the engine process that every front end shares."""

    def __init__(self, settings: Settings, obs: Observability) -> None:
        self.settings, self.obs = settings, obs
        self.tokenizer: TextTokenizer | None = None
        self.client: EngineClient | None = None
        self.cache: AnswerCache | None = None
        # tokenization stays off the event loop, so it overlaps the next request's HTTP work
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def start(self) -> None:
        source = await asyncio.to_thread(resolve_source, self.settings)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, source)
        client = EngineClient(self.settings, source, self.obs)
        await client.start()
        self.client = client
        if self.settings.cache_bytes:
            self.cache = AnswerCache(self.settings, self.obs, self._engine_identity)

    def ready(self) -> bool:
        return self.client is not None and self.client.ready()

    def describe(self) -> dict[str, object]:
        status = self.client.status if self.client is not None else None
        info = dict(status.info) if status is not None else {}
        # the answer cache is said here, so a run that measured with it on (CACHE_BYTES) records so
        shared = self.cache is not None and self.cache.store is not None
        cache = {"cache_bytes": self.settings.cache_bytes, "redis": shared}
        return {
            **info,
            "queue_depth": status.depth if status is not None else 0,
            "engine_up": self.ready(),
            "answer_cache": cache,
        }

    async def metrics_text(self) -> bytes:
        return await self.client.metrics_text() if self.client is not None else b""

    async def predict(self, request: Request, texts: list[str]) -> list[Prediction]:
        """Through the answer cache when CACHE_BYTES is set; a client that leaves cancels its part."""
        assert self.client is not None and self.tokenizer is not None  # routed only once ready
        arrived = time.monotonic()  # REQUEST_TIMEOUT_MS counts from here: tokenizing is part of it
        deadline = client_deadline(request)
        if deadline is not None:  # a gRPC deadline shorter than REQUEST_TIMEOUT_MS is the request's: the
            # engine's admission and expiry count REQUEST_TIMEOUT_MS from `arrived`, so arrival moves back
            arrived = min(arrived, deadline - self.settings.request_timeout_s)
        compute = functools.partial(self._compute, arrived)
        work = compute(texts) if self.cache is None else self.cache.answer(texts, compute)
        return await _unless_disconnected(request, asyncio.ensure_future(work))

    async def _compute(self, arrived: float, texts: list[str]) -> list[Prediction]:
        """Tokenizes, submits to the engine, waits; maps the engine's refusals to HTTP errors."""
        client, tokenizer = self.client, self.tokenizer
        assert client is not None and tokenizer is not None
        t0 = time.perf_counter()
        ids = await asyncio.get_running_loop().run_in_executor(self._tokenizer, tokenizer, texts)
        submitted = time.perf_counter()
        tokenize_ms = (submitted - t0) * 1000 / len(texts)
        try:
            answer = await client.submit(ids, arrived)
        except EngineError as exc:
            headers = {"Retry-After": retry_after_header(exc.retry_after_s)} if STATUS_OF[exc.kind] == 503 else {}
            raise ApiError(STATUS_OF[exc.kind], str(exc), headers) from None
        self.obs.engine_hop.observe(max(0.0, time.perf_counter() - submitted - answer.engine_ms / 1000))
        answered_s = time.monotonic() - arrived
        for predicted in answer.predicted_s:
            if predicted:  # how far admission's prediction was off: what REQUEST_TIMEOUT_MS rests on
                self.obs.admission_ratio.observe(answered_s / predicted)
        return [
            Prediction(label, score, size, tokenize_ms, infer_ms, queue_ms)
            for label, score, size, infer_ms, queue_ms in zip(
                answer.labels, answer.scores, answer.batch_sizes, answer.infer_ms, answer.queue_ms, strict=True
            )
        ]

    def _engine_identity(self) -> str | None:
        status = self.client.status if self.client is not None else None
        return engine_identity(status.info) if status is not None else None

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()  # uvicorn has stopped accepting; the engine finishes what is queued
        if self.cache is not None:
            await self.cache.aclose()
        self._tokenizer.shutdown(wait=True)


async def _unless_disconnected(request: Request, work: asyncio.Future[T]) -> T:
    """Waits for work; if the client goes away first, cancels it so its items are never computed."""
    watcher = asyncio.ensure_future(_disconnected(request))
    either: set[asyncio.Future[Any]] = {work, watcher}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()  # its items are cancelled in the engine, never computed
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise ApiError(499, "client disconnected")
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app("batched", BatchedService, settings or Settings.from_env())


app = create_app()
