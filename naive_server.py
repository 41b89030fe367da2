"""The naive server: the model called inline, once per request (the pattern that breaks under load).

    uvicorn naive_server:app --port 8000
    NAIVE_MODE=blocking uvicorn naive_server:app --port 8000

NAIVE_MODE picks how requests reach the model, each a row of the benchmark:
- threadpool (default): the call runs in Starlette's thread pool (what a `def` endpoint does), so up
  to 40 model calls run at once, each a batch of one, all fighting over the same cores;
- blocking: the call runs on the event loop, the mistake many tutorials make (an `async def`
  endpoint calling the model): while one request computes, the server cannot even answer /health;
- on-demand: loads the model from disk for every request ("load per call").
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from serving.model import Engine, PassStats, Prediction, load_engine, resolve_source
from serving.ops import Observability
from serving.service import create_app as create_service_app
from serving.settings import Settings


class InlineService:
    """Each request calls the engine itself: no queue, no batching across requests."""

    def __init__(self, settings: Settings, obs: Observability) -> None:
        self.settings, self.obs = settings, obs
        self.engine: Engine | None = None
        self.stopping = False

    async def start(self) -> None:
        source = await asyncio.to_thread(resolve_source, self.settings)
        engine = await asyncio.to_thread(load_engine, self.settings, source, "one")
        await asyncio.to_thread(engine.warmup, False)
        self.engine = engine

    def ready(self) -> bool:
        return self.engine is not None and not self.stopping

    def describe(self) -> dict[str, object]:
        info = self.engine.describe() if self.engine is not None else {}
        return {**info, "naive_mode": self.settings.naive_mode}

    async def predict(self, request: Request, texts: list[str]) -> list[Prediction]:
        if self.settings.naive_mode == "blocking":
            return self._run(texts)  # on the event loop, on purpose: this mode shows what that costs
        return await run_in_threadpool(self._run, texts)

    async def stop(self) -> None:
        self.stopping = True

    def _run(self, texts: list[str]) -> list[Prediction]:
        engine = self.engine
        assert engine is not None  # predict is only routed once ready
        if self.settings.naive_mode == "on-demand":
            engine = load_engine(self.settings, engine.source, "one")
        return engine.predict(texts, on_pass=self._on_pass)

    def _on_pass(self, p: PassStats) -> None:
        self.obs.observe_pass(p.items, p.real_tokens, p.computed_tokens)


def create_app(settings: Settings | None = None) -> FastAPI:
    return create_service_app("naive", InlineService, settings or Settings.from_env())


app = create_app()
