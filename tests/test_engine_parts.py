"""The engine process's small parts: the core plan, the wire format, the engine settings, the socket path.

    pytest tests/test_engine_parts.py -q

The process split itself (kill, stall, death, drain, several front ends on one engine) is tested with
real processes in tests/test_reliability.py.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from serving import wire
from serving.cores import plan_cores
from serving.engine_client import socket_path
from serving.settings import Settings, parse_cpus


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
