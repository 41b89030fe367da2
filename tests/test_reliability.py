"""Reliability through real HTTP: deadlines, disconnects, model faults, a dead worker, SIGTERM (issue 5).

    pytest tests/test_reliability.py -q          # ~1 min: starts 5 servers on 127.0.0.1 (gunicorn if installed)

Every server here is the real batched app run by a real uvicorn process. Faults are injected by
`fault_app`, a test-only uvicorn factory that wraps `engine.predict` after the lifespan has loaded
the model: texts carrying a marker hang the worker, raise, or kill the consumer; FAULT_BATCH_DELAY_MS
makes every batch slow, so queues build up with a tiny model. Nothing in production code knows.
What "never computed" means is read from the server's own /metrics: the batch-size histogram's
sum counts every item that went through the model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from tests.processes import Proc, free_port, start, wait_until_ok

HANG, RAISE, DIE = "__fault_hang__", "__fault_raise__", "__fault_die__"


class WorkerDied(BaseException):
    """Escapes the batcher's `except Exception`, like an error that kills the consumer task."""


def fault_app() -> FastAPI:
    """uvicorn --factory tests.test_reliability:fault_app (FAULT_STALL_S, FAULT_BATCH_DELAY_MS).

    The test hook: the real app from batched_server.create_app(), plus two /_fault routes (release the
    held worker; pid, queue depth and requests read so far), and engine.predict_ids wrapped once loaded."""
    import batched_server

    if os.environ.get("FAULT_STALL_S"):  # STALL_S is a module constant; lowered so a test can wait it out
        batched_server.STALL_S = float(os.environ["FAULT_STALL_S"])
    delay_s = float(os.environ.get("FAULT_BATCH_DELAY_MS", "0")) / 1000
    release = threading.Semaphore(0)
    state = {"received": 0, "hanging": 0}
    app = batched_server.create_app()
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a) -> AsyncIterator[None]:
        async with inner(a):
            engine = a.state.service.engine
            real = engine.predict_ids
            hang, die, fail = engine.tokenize([HANG, DIE, RAISE])  # the worker sees token ids

            def predict_ids(ids, on_pass=None, tokenize_ms=0.0):
                if hang in ids:
                    state["hanging"] += 1
                    release.acquire(timeout=60)  # bounded: a forgotten release cannot block shutdown forever
                    state["hanging"] -= 1
                if die in ids:
                    raise WorkerDied("injected")
                if fail in ids:
                    raise RuntimeError("CUDA out of memory (injected)")
                time.sleep(delay_s)
                return real(ids, on_pass=on_pass, tokenize_ms=tokenize_ms)

            engine.predict_ids = predict_ids
            yield

    app.router.lifespan_context = lifespan

    @app.post("/_fault/release")
    async def release_worker() -> dict[str, int]:
        release.release()
        return {"released": 1}

    @app.get("/_fault/state")
    async def fault_state(request: Request) -> dict[str, int]:
        service = request.app.state.service
        batcher = service.batcher if service is not None else None
        return {"pid": os.getpid(), "depth": batcher.depth if batcher else 0, **state}

    class CountReceived:  # pure ASGI, so it cannot change how disconnects reach the endpoint
        def __init__(self, inner_app) -> None:
            self.app = inner_app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/predict"):
                state["received"] += 1
            await self.app(scope, receive, send)

    app.add_middleware(CountReceived)
    return app


# ------------------------------------------------------------------------------------------ harness


def _command(launcher: str, port: int, workers: int) -> list[str]:
    if launcher == "gunicorn":  # its master closes the listening socket before it signals the workers
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "30",
            "tests.test_reliability:fault_app()",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.test_reliability:fault_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


@dataclass
class Server:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running(model_dir: str, tmp: Path, launcher: str = "uvicorn", workers: int = 1, **env: object) -> Iterator[Server]:
    """The fault app served and ready; on exit the process and all it spawned are gone, whatever happened."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(
        MODEL_ID=model_dir, MODEL_FALLBACK="0", DEVICE="cpu", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()}
    )
    proc = start(f"{launcher}-{port}", _command(launcher, port, workers), tmp, environ)
    try:
        wait_until_ok(proc, f"http://127.0.0.1:{port}/ready")
        yield Server(proc, port)
    finally:
        proc.stop(grace_s=5)


async def until(check: Callable[[], Awaitable[object]], limit_s: float = 20.0, every_s: float = 0.02) -> object:
    """Polls an async check until it returns something truthy (a bound, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(every_s)
    raise AssertionError(f"condition never held within {limit_s} s")


def metrics(server: Server) -> dict[str, float]:
    """Samples of /metrics keyed like `name{label="v"}`, for before/after deltas."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=5).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


COMPUTED = "sentimentalyzer_batch_size_sum"  # items that went through the model
DROPPED = 'sentimentalyzer_dropped_total{reason="%s"}'


@asynccontextmanager
async def hung_worker(client: httpx.AsyncClient) -> AsyncIterator[asyncio.Task]:
    """The worker held inside a batch until the block ends; yields the held request."""
    held = asyncio.ensure_future(client.post("/predict", json={"text": HANG}, timeout=60))
    try:
        await until(lambda: _state(client, "hanging"))
        yield held
    finally:
        await client.post("/_fault/release")


async def _state(client: httpx.AsyncClient, key: str) -> int:
    return (await client.get("/_fault/state")).json()[key]


async def _state_is(client: httpx.AsyncClient, key: str, value: int) -> bool:
    return await _state(client, key) == value


# --------------------------------------------------------------------------------------------- tests

pytestmark = pytest.mark.anyio
STALL_S = 5.0  # the fault server's STALL_S; every test but the stall test holds the worker far less


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(
        tiny_model_dir,
        tmp_path_factory.mktemp("reliability"),
        MAX_QUEUE=4,
        MAX_BATCH_SIZE=8,
        MAX_WAIT_MS=0,
        REQUEST_TIMEOUT_MS=1000,
        FAULT_STALL_S=STALL_S,
    ) as s:
        yield s


async def test_deadline_is_504_and_never_computed_and_a_full_queue_is_503(server: Server) -> None:
    before = metrics(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        async with hung_worker(c) as held:
            queued = [asyncio.ensure_future(c.post("/predict", json={"text": f"late {i}"})) for i in range(4)]
            await until(lambda: _state_is(c, "depth", 4))
            full = await c.post("/predict", json={"text": "one too many"})  # MAX_QUEUE=4
            late = await asyncio.gather(*queued)  # REQUEST_TIMEOUT_MS passes while the worker is held
        assert (await held).status_code == 200
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1 and "detail" in full.json()
    assert [r.status_code for r in late] == [504] * 4 and all("detail" in r.json() for r in late)
    after = metrics(server)
    assert delta(before, after, DROPPED % "deadline") == 4
    assert delta(before, after, DROPPED % "queue_full") == 1
    assert delta(before, after, COMPUTED) == 1  # the held request only: no expired item reached the model


async def test_client_that_disconnects_while_queued_is_never_computed(server: Server) -> None:
    before = metrics(server)
    body = b'{"text": "gone before its turn"}'
    raw = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        async with hung_worker(c) as held:
            socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
            for s in socks:
                s.sendall(raw % (len(body), body))
            await until(lambda: _state_is(c, "depth", 3))
            for s in socks:
                s.close()
            await until(lambda: _dropped_since(server, before, "cancelled", 3))
        assert (await held).status_code == 200
    assert delta(before, metrics(server), COMPUTED) == 1


async def _dropped_since(server: Server, before: dict[str, float], reason: str, n: int) -> bool:
    return delta(before, metrics(server), DROPPED % reason) == n


async def test_a_raising_batch_fails_only_its_culprit_and_serving_goes_on(server: Server) -> None:
    before = metrics(server)
    texts = ["good 0", RAISE, "good 1", "good 2"]  # queued together: one batch of four
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        async with hung_worker(c):
            pending = [asyncio.ensure_future(c.post("/predict", json={"text": t})) for t in texts]
            await until(lambda: _state_is(c, "depth", 4))
        answers = dict(zip(texts, await asyncio.gather(*pending), strict=True))
        after_fault = await c.post("/predict", json={"text": "still serving"})
        ready = await c.get("/ready")
    assert {t: r.status_code for t, r in answers.items()} == {"good 0": 200, RAISE: 500, "good 1": 200, "good 2": 200}
    assert "detail" in answers[RAISE].json()
    assert after_fault.status_code == 200 and ready.status_code == 200
    # bisection: each good item went through one successful pass; held + 3 good + 1 after
    assert delta(before, metrics(server), COMPUTED) == 5


async def test_a_stalled_worker_turns_ready_503_without_hanging(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:  # a hanging answer fails here
        async with hung_worker(c) as held:
            await until(lambda: _status(c.get("/ready"), 503), limit_s=STALL_S + 20, every_s=0.2)
            refused = await c.post("/predict", json={"text": "while stalled"})
        assert (await held).status_code == 200
        await until(lambda: _status(c.get("/ready"), 200))
    assert refused.status_code == 503 and "detail" in refused.json()


async def _status(request, status: int) -> bool:
    return (await request).status_code == status


async def test_oversized_bodies_are_refused_on_the_wire(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        # declared over 1 MiB and never sent: answered at once, without waiting for the body
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n"
        )
        head = b""
        while b'"detail"' not in head and (chunk := s.recv(65536)):
            head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b'"detail"' in head

    async def chunks():
        for _ in range(32):
            yield b"x" * 65536

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        r = await c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "detail" in r.json()


async def test_a_dead_worker_answers_every_caller_and_turns_ready_503(tiny_model_dir: str, tmp_path: Path) -> None:
    with running(tiny_model_dir, tmp_path, MAX_BATCH_SIZE=1, MAX_WAIT_MS=0) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            async with hung_worker(c) as held:
                dying = asyncio.ensure_future(c.post("/predict", json={"text": DIE}))
                await until(lambda: _state_is(c, "depth", 1))
                queued = asyncio.ensure_future(c.post("/predict", json={"text": "queued behind"}))
                await until(lambda: _state_is(c, "depth", 2))
            assert (await held).status_code == 200
            await until(lambda: _status(c.get("/ready"), 503))
            after = await c.post("/predict", json={"text": "after the death"})
            assert (await queued).status_code == 503 and after.status_code == 503
            # the request whose batch killed the worker must be answered too, not left hanging
            done, _ = await asyncio.wait({dying}, timeout=10)
            assert done, "the request in the dead worker's batch never got an answer"
            assert dying.result().status_code >= 500 and "detail" in dying.result().json()


LAUNCHERS = [
    pytest.param(("uvicorn", 1), id="uvicorn"),
    pytest.param(("uvicorn", 2), id="uvicorn-workers-2"),
    pytest.param(("gunicorn", 2), id="gunicorn-workers-2"),
]


@pytest.mark.parametrize("launcher", LAUNCHERS)
async def test_sigterm_finishes_every_accepted_request_refuses_new_ones_and_exits(
    launcher: tuple[str, int], tiny_model_dir: str, tmp_path: Path
) -> None:
    kind, workers = launcher
    if kind == "gunicorn":
        pytest.importorskip("gunicorn")
    n = 60  # 100 ms a batch of 2: a drain of ~3 s on one worker, long enough to probe during it
    with running(
        tiny_model_dir,
        tmp_path,
        kind,
        workers,
        MAX_BATCH_SIZE=2,
        MAX_WAIT_MS=0,
        FAULT_BATCH_DELAY_MS=100,
        REQUEST_TIMEOUT_MS=60_000,
    ) as srv:
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            pending = [asyncio.ensure_future(c.post("/predict", json={"text": f"accepted {i}"})) for i in range(n)]
            seen: dict[int, int] = {}  # worker pid -> requests it has read
            await until(lambda: _received_by_all_workers(srv, seen, n))  # accepted = read by a worker
            srv.proc.popen.send_signal(signal.SIGTERM)  # to the master only, as a container runtime does
            stopped = time.monotonic()
            refused_while_draining = await _probe_new_connections(srv.port, pending)
            answers = await asyncio.gather(*pending, return_exceptions=True)
        try:
            code = await asyncio.to_thread(srv.proc.popen.wait, max(1.0, 30 - (time.monotonic() - stopped)))
        except subprocess.TimeoutExpired:
            pytest.fail("still running 30 s after SIGTERM")
    assert [getattr(a, "status_code", repr(a)) for a in answers] == [200] * n
    assert code in (0, -signal.SIGTERM), f"exit status {code}"
    if (kind, workers) == ("uvicorn", 2) and not refused_while_draining:
        pytest.xfail(
            "uvicorn's --workers supervisor keeps the listening socket open while its workers drain: "
            "new connections wait in the backlog and are reset at exit (run multi-worker under gunicorn)"
        )
    assert refused_while_draining, "new connections were not refused while the server drained"


async def _received_by_all_workers(srv: Server, seen: dict[int, int], n: int) -> bool:
    # each poll is a new connection, so with several workers each of them answers sooner or later
    async with httpx.AsyncClient(base_url=srv.url, timeout=5) as probe:
        state = (await probe.get("/_fault/state")).json()
    seen[state["pid"]] = state["received"]
    return sum(seen.values()) >= n


async def _probe_new_connections(port: int, pending: list[asyncio.Task]) -> bool:
    """True once a fresh connection is refused while accepted requests are still being answered."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(t.done() for t in pending):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            writer.close()
        except ConnectionRefusedError:
            return not all(t.done() for t in pending)
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return False
