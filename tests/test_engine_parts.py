"""The engine process's small parts: the core plan, the wire format, the engine settings, the socket path.

    pytest tests/test_engine_parts.py -q

The process split itself (kill, stall, death, drain, several front ends on one engine) is tested with
real processes in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
import zmq
import zmq.asyncio

from serving import wire
from serving.cores import CorePlan, plan_cores
from serving.engine_client import EngineClient, socket_path
from serving.engine_core import EngineCore
from serving.ops import Observability
from serving.settings import Settings, parse_cpus
from serving.source import Source
from serving.text import Prediction


@pytest.fixture
def no_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def fp32(**changes: object) -> Settings:
    return Settings(model_id="stand-in", device="cpu", dtype="fp32", **changes)  # type: ignore[arg-type]


def test_many_cores_leave_a_quarter_to_the_front_ends_and_pin_the_rest(no_omp: None) -> None:
    plan = plan_cores(fp32(), range(8))
    assert plan.threads == 6 and plan.cpus == (2, 3, 4, 5, 6, 7)
    assert plan_cores(fp32(), range(3)).cpus == (1, 2)  # at least one core for HTTP


def test_two_shared_cores_get_two_threads_unpinned_and_one_core_one(no_omp: None) -> None:
    for backend, dtype in (("torch", "fp32"), ("torch", "bf16"), ("onnx", "int8")):
        plan = plan_cores(fp32(), (0, 1), (backend, dtype))
        assert (plan.threads, plan.cpus) == (2, ()) and f"{backend} {dtype}" in plan.why
    assert plan_cores(fp32(), (5,)).threads == 1


def test_settings_and_the_environment_override_the_plan(no_omp: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert plan_cores(fp32(engine_threads=3), range(8)) == plan_cores(fp32(engine_threads=3), range(8))
    assert plan_cores(fp32(engine_threads=3), range(8)).threads == 3
    pinned = plan_cores(fp32(engine_cpus="1-3"), range(8))
    assert (pinned.threads, pinned.cpus) == (3, (1, 2, 3))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert plan_cores(fp32(), range(8)).threads == 1  # the user's own choice wins over the plan
    with pytest.raises(ValueError, match="ENGINE_CPUS"):
        plan_cores(fp32(engine_cpus="6-9"), range(8))  # cores this process may not use


def test_cpu_lists_read_as_linux_writes_them() -> None:
    assert parse_cpus("") == () and parse_cpus("0-2,5") == (0, 1, 2, 5) and parse_cpus(" 3 ,1") == (1, 3)
    for bad in ("a", "3-1", "1-", "-2"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_engine_settings_are_validated_on_creation() -> None:
    for bad in ({"engine_threads": -1}, {"engine_stall_s": 0}, {"engine_cpus": "x"}, {"engine_factory": "nocolon"}):
        with pytest.raises(ValueError):
            fp32(**bad)


def test_settings_read_engine_fields_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_THREADS", "3")
    monkeypatch.setenv("ENGINE_STALL_S", "7.5")
    monkeypatch.setenv("ENGINE_SOCKET", "/tmp/x.sock")
    s = Settings.from_env()
    assert (s.engine_threads, s.engine_stall_s, s.engine_socket) == (3, 7.5, "/tmp/x.sock")
    assert str(socket_path(s)) == "/tmp/x.sock"


def test_every_message_round_trips_and_a_foreign_frame_is_refused() -> None:
    to_engine = [wire.Hello(1), wire.Bye(1), wire.Submit(7, [[101, 7592, 102]], time.monotonic()), wire.Cancel(7)]
    to_engine.append(wire.Query(8))
    for msg in to_engine:
        assert wire.decode_to_engine(wire.encode(msg)) == msg
    answer = wire.Answer(7, ["POSITIVE"], [0.9], [3], [1.5], [0.2], [None], 2.5)
    status = wire.Status(pid=9, ready=True, depth=2, busy_s=0.1, passes=4, info={"backend": "torch"})
    for reply in (answer, wire.Failed(7, "busy", "full", 2.0), wire.MetricsText(8, "# x"), status):
        assert wire.decode_from_engine(wire.encode(reply)) == reply
    with pytest.raises(msgspec.ValidationError):
        wire.decode_to_engine(wire.encode(answer))  # an engine's message is no front end's
    with pytest.raises(msgspec.DecodeError):
        wire.decode_from_engine(b"\x93not msgpack")


# ------------------------------------------------------------------------------- the hop, in process


class StubEngine:
    """Cost-free model for EngineCore: answers every text, records the batch sizes it was given."""

    packed = None
    max_pass_tokens = 512
    batches: ClassVar[list[int]] = []

    def warmup(self) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"backend": "stub"}

    def predict_ids(self, batch: list[list[int]], on_pass: object = None) -> list[Prediction]:
        StubEngine.batches.append(len(batch))
        return [Prediction("POSITIVE", len(ids) / 100, len(batch)) for ids in batch]


def stub_engine(settings: Settings, source: Source) -> StubEngine:
    return StubEngine()


async def _recv(sock: zmq.asyncio.Socket, timeout_s: float = 10.0) -> list[bytes]:
    return await asyncio.wait_for(sock.recv_multipart(), timeout_s)


async def _ready(sock: zmq.asyncio.Socket) -> None:
    async with asyncio.timeout(10):
        while True:  # Status heartbeats until the engine is warm
            frames = await _recv(sock)
            if any(isinstance(m, wire.Status) and m.ready for m in map(wire.decode_from_engine, frames)):
                return


@pytest.mark.anyio
async def test_the_engine_takes_requests_sent_together_and_answers_a_pass_in_one_message(tmp_path: Path) -> None:
    settings = fp32(engine_factory="tests.test_engine_parts:stub_engine", max_wait_ms=50)
    core = EngineCore(settings, Source(str(tmp_path), "local"), CorePlan(1, (), "test"), f"ipc://{tmp_path}/e.sock")
    serving_task = asyncio.create_task(core.serve())
    ctx = zmq.asyncio.Context()
    front = ctx.socket(zmq.DEALER)
    front.connect(f"ipc://{tmp_path}/e.sock")
    try:
        await front.send(wire.encode(wire.Hello(os.getpid())))
        await _ready(front)
        StubEngine.batches.clear()
        submits = [wire.Submit(rid, [[101] * rid], time.monotonic()) for rid in range(1, 6)]
        await front.send_multipart([wire.encode(m) for m in submits])  # five requests, one message
        answers: list[wire.Answer] = []
        async with asyncio.timeout(10):  # heartbeats keep coming: bound the wait for answers
            while len(answers) < 5:
                msgs = [wire.decode_from_engine(f) for f in await _recv(front)]
                got = [m for m in msgs if isinstance(m, wire.Answer)]
                assert not got or len(got) == 5, f"a pass's answers split over messages: {len(got)} of 5 in one"
                answers += got
        assert StubEngine.batches == [5]
        assert sorted(a.rid for a in answers) == [1, 2, 3, 4, 5]
        assert all(a.scores == [a.rid / 100] for a in answers)  # each answer is its own request's
        await front.send(wire.encode(wire.Bye(os.getpid())))
        await asyncio.wait_for(serving_task, 10)
    finally:
        serving_task.cancel()  # on a failure above: the engine still stops and closes its socket
        await asyncio.gather(serving_task, return_exceptions=True)
        front.close(linger=0)
        ctx.term()


@pytest.mark.anyio
async def test_a_front_end_sends_requests_of_one_loop_turn_together_and_reads_answers_sent_together(
    tmp_path: Path,
) -> None:
    settings = fp32(engine_socket=str(tmp_path / "e.sock"))
    lock = open(tmp_path / "e.lock", "a+")  # noqa: SIM115  # held: the client attaches, never starts an engine
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx = zmq.asyncio.Context()
    engine = ctx.socket(zmq.ROUTER)
    engine.bind(f"ipc://{tmp_path}/e.sock")
    client = EngineClient(settings, Source(str(tmp_path), "local"), Observability("batched", engine_side=False))
    try:
        starting = asyncio.create_task(client.start())
        identity, hello = await _recv(engine)
        assert isinstance(wire.decode_to_engine(hello), wire.Hello)
        status = wire.Status(pid=os.getpid(), ready=True, depth=0, busy_s=0.0, passes=0)
        await engine.send_multipart([identity, wire.encode(status)])
        await asyncio.wait_for(starting, 10)
        calls = [asyncio.create_task(client.submit([[101, n]], time.monotonic())) for n in range(4)]
        message = await _recv(engine)
        while len(message) == 2 and isinstance(wire.decode_to_engine(message[1]), wire.Hello):
            message = await _recv(engine)  # a Hello or two sent while it was attaching
        submits = [wire.decode_to_engine(f) for f in message[1:]]
        assert [type(m) for m in submits] == [wire.Submit] * 4, "requests of one loop turn went apart"
        replies = [wire.Answer(m.rid, ["NEGATIVE"], [m.rid / 10], [4], [1.0], [0.0], [None]) for m in submits]  # type: ignore[union-attr]
        await engine.send_multipart([identity, *map(wire.encode, replies)])  # four answers, one message
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert [a.rid for a in answers] == [m.rid for m in submits]  # type: ignore[union-attr]
        assert [a.scores for a in answers] == [[r.scores[0]] for r in replies]
    finally:
        await client.stop()
        engine.close(linger=0)
        ctx.term()
        lock.close()
