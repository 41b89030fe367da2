"""Reliability through real HTTP: deadlines, disconnects, engine faults, a dead or stalled engine, SIGTERM.

    pytest tests/test_reliability.py -q          # ~2 min: starts 8 servers on 127.0.0.1 (gunicorn if installed)

Every server here is the real batched app run by a real uvicorn (or gunicorn) process, with its real
engine process. Faults are injected in the engine through ENGINE_FACTORY=tests.faults:fault_engine
(tests/faults.py): texts carrying a marker hang the engine's worker, raise, or end the engine
process; FAULT_BATCH_DELAY_MS makes every pass slow, so queues build up with a tiny model. Nothing in
production code knows. What "never computed" means is read from the server's own /metrics: the
batch-size histogram's sum (the engine's, carried over IPC) counts every item that went through the model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

import batched_server
from serving.engine_client import LOST_AFTER_S
from serving.settings import Settings
from tests.conftest import serving
from tests.faults import DIE, HANG, RAISE
from tests.processes import Proc, delta, eventually, free_port, metrics_at, start, wait_until_ok

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
            "tests.faults:fault_app()",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.faults:fault_app",
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
        MODEL_ID=model_dir,
        MODEL_FALLBACK="0",
        DEVICE="cpu",
        OMP_NUM_THREADS="1",
        ENGINE_FACTORY="tests.faults:fault_engine",
        FAULT_DIR=str(tmp),
        ENGINE_SOCKET=str(tmp / "engine.sock"),  # this server's own engine, whatever else runs
    )
    environ.update({k: str(v) for k, v in env.items()})
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
    return metrics_at(server.url, timeout_s=5)


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
STALL_S = 5.0  # ENGINE_STALL_S of the fragile server; every test but the stall test holds the worker far less


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(
        tiny_model_dir,
        tmp_path_factory.mktemp("reliability"),
        MAX_QUEUE=4,
        MAX_BATCH_SIZE=8,
        MAX_WAIT_MS=0,
        REQUEST_TIMEOUT_MS=1000,
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


async def _engine_pid(client: httpx.AsyncClient) -> int:
    r = await client.get("/ready")
    return r.json()["engine_pid"] if r.status_code == 200 else 0


async def _restarted(client: httpx.AsyncClient, old_pid: int) -> int:
    """The new engine's pid once /ready is 200 again behind another engine than old_pid."""
    pid = await _engine_pid(client)
    return pid if pid not in (0, old_pid) else 0


def _front_pid(server: Server) -> int:
    return httpx.get(f"{server.url}/_fault/state", timeout=5).json()["pid"]


@pytest.fixture(scope="module")
def fragile(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose engine is killed, stalled and crashed by the tests below, in turn."""
    with running(
        tiny_model_dir, tmp_path_factory.mktemp("fragile"), MAX_BATCH_SIZE=1, MAX_WAIT_MS=0, ENGINE_STALL_S=STALL_S
    ) as s:
        yield s


async def test_an_engine_that_dies_mid_pass_fails_its_callers_at_once_and_is_restarted(fragile: Server) -> None:
    front = _front_pid(fragile)
    async with httpx.AsyncClient(base_url=fragile.url, timeout=30) as c:
        old = await _engine_pid(c)
        async with hung_worker(c) as held:
            dying = asyncio.ensure_future(c.post("/predict", json={"text": DIE}))
            await until(lambda: _state_is(c, "depth", 1))
            queued = asyncio.ensure_future(c.post("/predict", json={"text": "queued behind"}))
            await until(lambda: _state_is(c, "depth", 2))
        assert (await held).status_code == 200
        # the death fails every caller of that engine well before REQUEST_TIMEOUT_MS (10 s here)
        done, _ = await asyncio.wait({dying, queued}, timeout=5)
        assert done == {dying, queued}, "a request waiting on the dead engine was left hanging"
        after = await c.post("/predict", json={"text": "right after the death"})
        new = await until(lambda: _restarted(c, old))
        again = await c.post("/predict", json={"text": "served by the new engine"})
        m = metrics(fragile)
    for r in (dying.result(), queued.result()):
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "detail" in r.json()
    assert after.status_code in (200, 503)  # 200 only if the new engine was already warm
    assert again.status_code == 200 and new != old
    assert _front_pid(fragile) == front  # the front end was never restarted
    assert m["sentimentalyzer_engine_restarts_total"] >= 1 and m["sentimentalyzer_engine_up"] == 1


async def test_a_killed_engine_turns_ready_503_and_comes_back(fragile: Server) -> None:
    async with httpx.AsyncClient(base_url=fragile.url, timeout=30) as c:
        old = await until(lambda: _engine_pid(c))
        template = psutil.Process(old).parent()
        async with hung_worker(c) as held:
            os.kill(old, signal.SIGKILL)  # from outside, as the OOM killer would
            held_answer = await asyncio.wait_for(held, 5)
            down = await until(lambda: _status(c.get("/ready"), 503), limit_s=5)
            refused = await c.post("/predict", json={"text": "while it restarts"})
        new = await until(lambda: _restarted(c, old))
        served = await c.post("/predict", json={"text": "after the restart"})
    # both engines forked from one template that imported torch once (serving/engine_launch.py), the
    # front end's child: a restart loads weights, it does not import torch again
    assert template is not None and "multiprocessing.forkserver" in " ".join(template.cmdline())
    assert template.ppid() == _front_pid(fragile) and psutil.Process(new).ppid() == template.pid
    assert held_answer.status_code == 503 and "Retry-After" in held_answer.headers
    assert down and refused.status_code in (200, 503) and served.status_code == 200


async def test_a_stalled_engine_fails_its_callers_turns_ready_503_and_is_replaced(fragile: Server) -> None:
    async with httpx.AsyncClient(base_url=fragile.url, timeout=5) as c:  # a hanging answer fails here
        old = await until(lambda: _engine_pid(c))
        held = asyncio.ensure_future(c.post("/predict", json={"text": HANG}, timeout=STALL_S + 20))
        await until(lambda: _state(c, "hanging"))  # never released: the pass makes no progress
        await until(lambda: _status(c.get("/ready"), 503), limit_s=STALL_S + 20, every_s=0.2)
        refused = await c.post("/predict", json={"text": "while stalled"})
        held_answer = await asyncio.wait_for(held, 5)
        await until(lambda: _restarted(c, old), limit_s=30)
        served = await c.post("/predict", json={"text": "after the stall"})
    assert held_answer.status_code == 503 and "detail" in held_answer.json()
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert served.status_code == 200


@pytest.mark.parametrize("launcher", ["uvicorn", "gunicorn"])
async def test_front_ends_share_one_engine_and_metrics_appear_once_summed(
    launcher: str, tiny_model_dir: str, tmp_path: Path
) -> None:
    if launcher == "gunicorn":
        pytest.importorskip("gunicorn")
    n = 40
    (tmp_path / "prom").mkdir()  # front-end counts summed over workers: prometheus-client's multiprocess mode
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "ENGINE_SOCKET": ""}  # the derived, shared path
    with running(tiny_model_dir, tmp_path, launcher, 2, **env) as srv:
        fronts: dict[int, int] = {}
        engines = set()
        async with httpx.AsyncClient(
            base_url=srv.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        ) as c:
            before = metrics(srv)
            answers = await asyncio.gather(*(c.post("/predict", json={"text": f"shared {i}"}) for i in range(n)))
            for _ in range(20):
                state = (await c.get("/_fault/state")).json()
                fronts[state["pid"]] = state["received"]
                engines.add(state["engine_pid"])
        text = httpx.get(f"{srv.url}/metrics", timeout=5).text
        after = metrics(srv)
    assert [r.status_code for r in answers] == [200] * n
    assert len(fronts) == 2 and len(engines) == 1, (fronts, engines)
    families = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), "a metric family appears twice in /metrics"
    assert delta(before, after, 'sentimentalyzer_requests_total{endpoint="/predict",status="200"}') == n
    assert delta(before, after, COMPUTED) == n  # the engine's histogram, once, counting both front ends


async def test_a_front_end_whose_loop_was_held_keeps_its_engine(attached_settings: Settings) -> None:
    # Missed heartbeats that wait unread on the socket are the front end's lateness, not the engine's death.
    async with serving(batched_server.create_app(attached_settings)) as c:
        engine = (await c.get("/ready")).json()["engine_pid"]
        time.sleep(LOST_AFTER_S + 0.5)  # the event loop held: no await, no heartbeat read
        answer = await c.post("/predict", json={"text": "still here"})
        ready = (await c.get("/ready")).json()
    assert answer.status_code == 200 and ready["engine_pid"] == engine


def test_the_engine_goes_when_its_server_is_killed(tiny_model_dir: str, tmp_path: Path) -> None:
    with running(tiny_model_dir, tmp_path) as srv:
        engine = httpx.get(f"{srv.url}/ready", timeout=5).json()["engine_pid"]
        srv.proc.popen.kill()  # SIGKILL: no lifespan, no Bye; only the kernel knows
        srv.proc.popen.wait(10)
        assert eventually(lambda: not _alive(engine), 10), "the engine outlived its server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited: only its parent has yet to reap it
        return f.read().split(") ")[1][0] != "Z"


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
