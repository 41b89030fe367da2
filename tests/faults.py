"""Faults injected into the batched server's engine process, for tests/test_reliability.py only.

    ENGINE_FACTORY=tests.faults:fault_engine FAULT_DIR=/tmp/x uvicorn --factory tests.faults:fault_app

`fault_engine` is the real engine (serving.model.load_engine) with `predict_ids` wrapped: a batch
holding HANG blocks the engine's worker until a byte arrives on the FIFO `release-<engine pid>`,
RAISE raises inside the pass (the batcher bisects it out), DIE ends the engine process at once, and
FAULT_BATCH_DELAY_MS makes every pass slow so queues build up with a tiny model. `fault_app` is the
real front end plus two routes: POST /_fault/release (writes that byte) and GET /_fault/state (the
front end's pid, the engine's pid, queue depth and hanging count, requests read). Nothing in the
serving code knows about any of this: the engine loads it through ENGINE_FACTORY like any factory.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

from serving.engine import Engine
from serving.model import Source, load_engine
from serving.settings import Settings

HANG, RAISE, DIE = "__fault_hang__", "__fault_raise__", "__fault_die__"


def _dir() -> Path:
    return Path(os.environ["FAULT_DIR"])


def _hanging_file(engine_pid: int) -> Path:
    return _dir() / f"hanging-{engine_pid}"


def fault_engine(settings: Settings, source: Source) -> Engine:
    engine = load_engine(settings, source)
    real = engine.predict_ids
    hang, die, fail = engine.tokenize([HANG, DIE, RAISE])  # the engine sees token ids, not texts
    delay_s = float(os.environ.get("FAULT_BATCH_DELAY_MS", "0")) / 1000
    fifo = _dir() / f"release-{os.getpid()}"
    os.mkfifo(fifo)
    release = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # read-write: opening never blocks on a writer
    hanging = _hanging_file(os.getpid())
    hanging.write_text("0")

    def predict_ids(ids: list[list[int]], **kwargs: Any) -> Any:
        if hang in ids:
            hanging.write_text("1")
            select.select([release], [], [], 60)  # bounded: a forgotten release cannot block forever
            os.read(release, 1)
            hanging.write_text("0")
        if die in ids:
            time.sleep(0.2)  # partway through the pass (answers of the passes before it have gone out)
            os._exit(3)  # then the engine process dies, as on a segfault
        if fail in ids:
            raise RuntimeError("CUDA out of memory (injected)")
        time.sleep(delay_s)
        return real(ids, **kwargs)

    engine.predict_ids = predict_ids  # type: ignore[method-assign]
    return engine


def fault_app() -> FastAPI:
    """The real batched app with /_fault routes and a count of the /predict requests this front end read."""
    import batched_server

    state = {"received": 0}
    app = batched_server.create_app()

    def engine_pid(request: Request) -> int:
        service = request.app.state.service
        status = service.client.status if service is not None and service.client is not None else None
        return status.pid if status is not None else 0

    @app.post("/_fault/release")
    async def release_worker(request: Request) -> dict[str, int]:
        try:
            fd = os.open(_dir() / f"release-{engine_pid(request)}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # that engine is gone: nothing to release
            return {"released": 0}
        os.write(fd, b"x")
        os.close(fd)
        return {"released": 1}

    @app.get("/_fault/state")
    async def fault_state(request: Request) -> dict[str, int]:
        service = request.app.state.service
        status = service.client.status if service is not None and service.client is not None else None
        pid = engine_pid(request)
        path = _hanging_file(pid)
        return {
            "pid": os.getpid(),
            "engine_pid": pid,
            "depth": status.depth if status is not None else 0,
            "hanging": int(path.read_text() or 0) if path.exists() else 0,
            **state,
        }

    class CountReceived:  # pure ASGI, so it cannot change how disconnects reach the endpoint
        def __init__(self, inner_app: Any) -> None:
            self.app = inner_app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/predict"):
                state["received"] += 1
            await self.app(scope, receive, send)

    app.add_middleware(CountReceived)
    return app
