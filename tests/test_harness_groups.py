"""The bench's protocol and cache groups, table-driven: the gRPC user, wrk's v2 and numbered bodies, the
configurations, the rows' glue and the report's ratio and goal lines.

    .venv/bin/python -m pytest tests/test_harness_groups.py -q     # a few seconds: no servers, no model

Covers harness/grpc_infer.py (the request, both forms of the answer, failures as stable messages, the
request event on success and failure, with fake transports and a fake Locust environment),
harness/grpc_user.py and locustfile.py's --protocol grpc and --unique-texts (under a stand-in of locust:
importing the real one would gevent-patch the test process), harness/wrk.py (v2 bodies, numbered bodies
as wrk's Lua would build them, script arguments; one test runs the real wrk against a stdlib server),
harness/bench.py and harness/bench_groups.py (--protocols, --cache, --only, launch's environment, one row
with Locust, the scrapes and wrk faked), harness/groups_report.py (on a synthetic summary.csv) and
harness/paired.py (the paired ratios, the report, the counters read from a stdlib server). Every
expected value is worked out by hand from the small inputs beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from harness import bench, bench_groups, cache_overhead, groups_report, grpc_infer, paired, report, wrk
from harness.launch import ROOT
from tests.processes import StubRequest, stub_http
from tests.test_harness import lua_unquote

# ------------------------------------------------------------------------------------------ helpers


class Recorder:
    """A Locust environment's events.request: keeps every fire()'s keywords."""

    def __init__(self) -> None:
        self.fired: list[dict[str, Any]] = []
        self.events = types.SimpleNamespace(request=types.SimpleNamespace(fire=self.fire))

    def fire(self, **kw: Any) -> None:
        self.fired.append(kw)


class FakeTransport:
    """Answers each text with `answer` (or raises it, if it is an exception); remembers texts and closes."""

    def __init__(self, answer: Any, length: int = 70) -> None:
        self.answer, self.length, self.texts, self.closed = answer, length, [], False

    def infer(self, text: str) -> tuple[dict[str, Any], int]:
        self.texts.append(text)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer, self.length

    def close(self) -> None:
        self.closed = True


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a failed unary call raises: an RpcError that is also a Call (code, details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:  # what Locust would show raw: a debug string that differs every time
        return f"<_InactiveRpcError of RPC: status = {self._code}, created_time 2026-12-07T09:00:00.123456>"

    def initial_metadata(self) -> Any: ...
    def trailing_metadata(self) -> Any: ...
    def is_active(self) -> bool: ...
    def time_remaining(self) -> Any: ...
    def cancel(self) -> bool: ...
    def add_callback(self, callback: Any) -> bool: ...


class TritonError(Exception):
    """tritonclient's InferenceServerException: status() and message()."""

    def status(self) -> str:
        return "StatusCode.RESOURCE_EXHAUSTED"

    def message(self) -> str:
        return "queue full"


def check_label(item: dict[str, Any]) -> str | None:
    """locustfile.check_label's verdicts for the labels and scores these tests send."""
    if item.get("label") not in ("POSITIVE", "NEGATIVE"):
        return f"bad label {item.get('label')!r}"
    return None if 0.0 <= item["score"] <= 1.0 else f"bad score {item['score']!r}"


def answer(*outputs: tuple[str, str, list[int], bytes | None, Any]) -> service_pb2.ModelInferResponse:
    """A ModelInferResponse: (name, datatype, shape, raw bytes or None, typed contents or None) per output."""
    r = service_pb2.ModelInferResponse(model_name="sentiment")
    raws = []
    for name, datatype, shape, raw, typed in outputs:
        out = r.outputs.add(name=name, datatype=datatype, shape=shape)
        if typed is not None:
            field = out.contents.bytes_contents if datatype == "BYTES" else out.contents.fp32_contents
            field.extend(typed)
        raws.append(raw)
    r.raw_output_contents.extend(x for x in raws if x is not None)
    return r


LABEL_RAW = struct.pack("<I", 8) + b"POSITIVE"
SCORE_RAW = struct.pack("<f", 0.75)


# ----------------------------------------------------------------- grpc_infer: request and answers


def test_infer_request_is_one_bytes_row():
    r = grpc_infer.infer_request("café", "sentiment")
    assert r.model_name == "sentiment" and len(r.inputs) == 1 and not r.outputs  # no outputs named: both sent
    (t,) = r.inputs
    assert (t.name, t.datatype, list(t.shape)) == ("text", "BYTES", [1, 1])
    assert list(t.contents.bytes_contents) == ["café".encode()]
    assert not r.raw_input_contents


@pytest.mark.parametrize(
    "response",
    [
        # binary, as a server answering the binary extension sends: raw_output_contents, one per output
        answer(("label", "BYTES", [1, 1], LABEL_RAW, None), ("score", "FP32", [1, 1], SCORE_RAW, None)),
        # typed contents, outputs in the other order
        answer(("score", "FP32", [1, 1], None, [0.75]), ("label", "BYTES", [1, 1], None, [b"POSITIVE"])),
        # an extra output is ignored
        answer(
            ("label", "BYTES", [1, 1], None, [b"POSITIVE"]),
            ("probs", "FP32", [1, 2], None, [0.25, 0.75]),
            ("score", "FP32", [1, 1], None, [0.75]),
        ),
    ],
)
def test_read_outputs(response):
    assert grpc_infer.read_outputs(response) == {"label": "POSITIVE", "score": 0.75}


@pytest.mark.parametrize(
    "response, why",
    [
        (answer(("label", "BYTES", [1, 1], None, [b"POSITIVE"])), "expected one score output"),
        (answer(("score", "FP32", [1, 1], None, [0.5])), "expected one label output"),
        (
            answer(("label", "BYTES", [2, 1], None, [b"A", b"B"]), ("score", "FP32", [2, 1], None, [0.1, 0.2])),
            "label has shape [2, 1], not [1, 1]",
        ),
        (
            answer(
                ("label", "BYTES", [1, 1], struct.pack("<I", 9) + b"POSITIVE", None),
                ("score", "FP32", [1, 1], SCORE_RAW, None),
            ),
            "expected one label output",  # a length prefix that does not match the bytes
        ),
        (
            answer(("label", "BYTES", [1, 1], LABEL_RAW, None), ("score", "FP32", [1, 1], SCORE_RAW * 2, None)),
            "expected one score output",
        ),
        (
            answer(("label", "BYTES", [1, 1], None, [b"POSITIVE"]), ("score", "INT64", [1, 1], None, None)),
            "score is INT64, not FP32",
        ),
    ],
)
def test_read_outputs_refuses(response, why):
    with pytest.raises(grpc_infer.AnswerError, match=f"^{re.escape(why)}$"):
        grpc_infer.read_outputs(response)


def test_read_outputs_counts_raw_contents_against_outputs():
    r = answer(("label", "BYTES", [1, 1], LABEL_RAW, None), ("score", "FP32", [1, 1], None, [0.75]))
    with pytest.raises(grpc_infer.AnswerError, match="1 raw_output_contents for 2 outputs"):
        grpc_infer.read_outputs(r)


@pytest.mark.parametrize(
    "host, target",
    [
        ("grpc://127.0.0.1:8081", "127.0.0.1:8081"),
        ("127.0.0.1:8081", "127.0.0.1:8081"),
        ("grpc://localhost:9/", "localhost:9"),
        ("grpc://[::1]:50051", "[::1]:50051"),
    ],
)
def test_grpc_target(host, target):
    assert grpc_infer.grpc_target(host) == target


@pytest.mark.parametrize("host", [None, "", "http://127.0.0.1:8001", "grpc://127.0.0.1", "grpc://h:port"])
def test_grpc_target_refuses(host):
    with pytest.raises(ValueError, match="--host grpc://HOST:PORT"):
        grpc_infer.grpc_target(host)


@pytest.mark.parametrize(
    "exc, message",
    [
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"), "gRPC UNAVAILABLE: failed to connect"),
        (FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "x" * 200), "gRPC DEADLINE_EXCEEDED: " + "x" * 80),
        (TritonError(), "gRPC RESOURCE_EXHAUSTED: queue full"),
        (grpc_infer.AnswerError("expected one label output"), "expected one label output"),
        (OSError("boom"), "OSError: boom"),
    ],
)
def test_failure_messages_are_stable(exc, message):
    assert str(grpc_infer.failure(exc)) == message


# ----------------------------------------------------------------- grpc_infer: Locust's request event


def test_client_fires_a_request_event_on_success():
    env, transport = Recorder(), FakeTransport({"label": "NEGATIVE", "score": 0.25}, length=71)
    client = grpc_infer.GrpcClient(env, transport, check_label)
    assert client.infer("dull") == {"label": "NEGATIVE", "score": 0.25}
    (event,) = env.fired
    assert transport.texts == ["dull"]
    assert {k: event[k] for k in ("request_type", "name", "response_length", "exception")} == {
        "request_type": "grpc",
        "name": "ModelInfer",
        "response_length": 71,
        "exception": None,
    }
    assert isinstance(event["response_time"], float) and 0 <= event["response_time"] < 1000
    assert event["response"] == {"label": "NEGATIVE", "score": 0.25} and event["context"] == {}
    client.close()
    assert transport.closed


@pytest.mark.parametrize(
    "answer_or_error, message, length",
    [
        ({"label": "MAYBE", "score": 0.5}, "bad label 'MAYBE'", 70),  # arrived, but breaks the contract
        ({"label": "POSITIVE", "score": 1.5}, "bad score 1.5", 70),
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "gRPC UNAVAILABLE: connection refused", 0),
        (TritonError(), "gRPC RESOURCE_EXHAUSTED: queue full", 0),
        (grpc_infer.AnswerError("expected one score output"), "expected one score output", 0),
        (RuntimeError("anything else"), "RuntimeError: anything else", 0),
    ],
)
def test_client_fires_a_failure(answer_or_error, message, length):
    env = Recorder()
    client = grpc_infer.GrpcClient(env, FakeTransport(answer_or_error), check_label)
    assert client.infer("text") is None  # never raises: a failed request, not a crashed user
    (event,) = env.fired
    assert isinstance(event["exception"], grpc_infer.InferFailure) and str(event["exception"]) == message
    assert event["request_type"] == "grpc" and event["name"] == "ModelInfer"
    assert event["response_length"] == length and event["response_time"] >= 0


# --------------------------------------------------------- grpc_user and locustfile, on a fake locust


def fake_locust() -> dict[str, types.ModuleType]:
    """Just enough of locust for grpc_user.py and locustfile.py to import, and for a user to be built."""

    class Hook:
        def __init__(self) -> None:
            self.listeners: list[Callable[..., Any]] = []

        def add_listener(self, f: Callable[..., Any]) -> Callable[..., Any]:
            self.listeners.append(f)
            return f

    class User:
        abstract = True
        host: str | None = None
        tasks: list[Any] = []

        def __init__(self, environment: Any) -> None:
            self.environment = environment

    locust = types.ModuleType("locust")
    locust.User = locust.FastHttpUser = User  # type: ignore[attr-defined]
    locust.events = types.SimpleNamespace(init_command_line_parser=Hook(), init=Hook())  # type: ignore[attr-defined]
    locust.tag = lambda *names: lambda f: f  # type: ignore[attr-defined]
    locust.task = lambda f: f  # type: ignore[attr-defined]
    exception = types.ModuleType("locust.exception")
    exception.LocustError = type("LocustError", (Exception,), {})  # type: ignore[attr-defined]
    env = types.ModuleType("locust.env")
    env.Environment = object  # type: ignore[attr-defined]
    wait_time = types.ModuleType("locust.user.wait_time")
    wait_time.constant_throughput = lambda rate: lambda u: 1.0 / rate  # type: ignore[attr-defined]
    modules = {"locust": locust, "locust.exception": exception, "locust.env": env}
    return {**modules, "locust.user": types.ModuleType("locust.user"), "locust.user.wait_time": wait_time}


def load(monkeypatch: pytest.MonkeyPatch, path: str, name: str) -> types.ModuleType:
    """path as a module of its own name (never the real one in sys.modules), against the fake locust."""
    for mod_name, module in fake_locust().items():
        monkeypatch.setitem(sys.modules, mod_name, module)
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def options(**kw: Any) -> argparse.Namespace:
    base = {"grpc_client": "raw", "kserve_model": "sentiment", "target_rps_per_user": 0.0}
    return argparse.Namespace(**{**base, **kw})


def test_grpc_user_sends_picked_texts_and_fires_events(monkeypatch):
    user_mod = load(monkeypatch, "harness/grpc_user.py", "grpc_user_under_test")
    patched, made = [], []
    monkeypatch.setattr(user_mod, "patch_gevent", lambda: patched.append(len(made)))

    def make(target: str, model: str) -> FakeTransport:
        made.append((target, model))
        return FakeTransport({"label": "POSITIVE", "score": 0.9})

    monkeypatch.setattr(user_mod, "TRANSPORTS", {"raw": make, "triton": make})
    texts = iter(["first", "second"])
    cls = user_mod.configured(lambda: next(texts), check_label)
    assert issubclass(cls, user_mod.GrpcUser) and cls.abstract  # spawned only as locustfile picks it
    cls.host = "grpc://127.0.0.1:8081"
    env = Recorder()
    env.parsed_options = options(kserve_model="other")
    user = cls(env)
    assert patched == [0]  # gevent first, then the channel
    assert made == [("127.0.0.1:8081", "other")]
    user.infer()
    user.infer()
    assert user.client.transport.texts == ["first", "second"]
    assert [e["exception"] for e in env.fired] == [None, None]
    assert user.wait_time() == 0.0  # closed loop
    user.on_stop()
    assert user.client.transport.closed


def test_grpc_user_paces_and_refuses_an_http_host(monkeypatch):
    user_mod = load(monkeypatch, "harness/grpc_user.py", "grpc_user_under_test")
    monkeypatch.setattr(user_mod, "patch_gevent", lambda: None)
    monkeypatch.setattr(user_mod, "TRANSPORTS", {"raw": lambda t, m: FakeTransport({})})
    cls = user_mod.configured(lambda: "x", check_label)
    env = Recorder()
    env.parsed_options = options(target_rps_per_user=4.0)
    cls.host = "grpc://127.0.0.1:1"
    assert cls(env).wait_time() == 0.25  # constant_throughput(4)
    cls.host = "http://127.0.0.1:8001"
    with pytest.raises(Exception, match="--protocol grpc needs --host grpc://HOST:PORT") as info:
        cls(env)
    assert type(info.value).__name__ == "LocustError"


@pytest.fixture
def locustfile(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    return load(monkeypatch, "locustfile.py", "locustfile_under_test")


def init(locustfile: types.ModuleType, **kw: Any) -> types.SimpleNamespace:
    """Runs locustfile's init listener on an environment with these options; returns the environment."""
    opts = argparse.Namespace(
        **{"corpus": "data/short.txt", "protocol": "json", "tags": None, "exclude_tags": None, **kw}
    )
    env = types.SimpleNamespace(parsed_options=opts, user_classes=[locustfile.SentimentUser])
    locustfile._on_init(env)
    return env


def test_locustfile_protocol_grpc_binds_the_grpc_user(locustfile, monkeypatch):
    calls: list[Any] = []
    fake = types.ModuleType("harness.grpc_user")
    fake.patch_gevent = lambda: calls.append("patch")  # type: ignore[attr-defined]
    user_class = types.SimpleNamespace(tasks=[])

    def configured(pick: Any, check: Any) -> Any:
        calls.append(("configured", pick, check))
        return user_class

    fake.configured = configured  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "harness.grpc_user", fake)
    env = init(locustfile, protocol="grpc", unique_texts=False)
    assert env.user_classes == [user_class]
    assert calls == ["patch", ("configured", locustfile.pick_text, locustfile.check_label)]  # gevent first


def test_locustfile_plain_run_loads_no_grpc(locustfile, monkeypatch):
    monkeypatch.delitem(sys.modules, "harness.grpc_user", raising=False)
    env = init(locustfile)
    assert env.user_classes == [locustfile.SentimentUser]
    assert "harness.grpc_user" not in sys.modules


def test_locustfile_unique_texts_numbers_every_text(locustfile):
    init(locustfile, unique_texts=True)
    texts = [locustfile.pick_text() for _ in range(500)]  # more than the corpus's 200 lines
    assert len(set(texts)) == 500
    run = texts[0].rsplit(" #", 1)[1].split("-")[0]
    for n, t in enumerate(texts, 1):
        text, _, number = t.rpartition(" #")
        assert text in locustfile.CORPUS and number == f"{run}-{n}"
    init(locustfile, unique_texts=False)
    assert all(locustfile.pick_text() in locustfile.CORPUS for _ in range(50))


# -------------------------------------------------------------------------- wrk: v2 and numbered


def lua_table(script: str, name: str) -> list[str]:
    table = script.split(f"local {name} = {{\n", 1)[1].split("\n}\n", 1)[0]
    return [lua_unquote(line.strip().removesuffix(",")) for line in table.splitlines()]


TEXTS = ['a "quoted" review', "back\\slash", "naïve 😀", "ends with #", "@@wrk-number@@ in the text"]


def test_wrk_v2_bodies_are_kserve_requests():
    script = wrk.lua_script(TEXTS, None, "v2")
    bodies = lua_table(script, "bodies")
    # locustfile.kserve_request's body, as json= sends it (tests/test_peers.py pins the same dict)
    expected = [{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [t]}]} for t in TEXTS]
    assert [json.loads(b) for b in bodies] == expected
    assert bodies == [json.dumps(e) for e in expected]
    assert wrk.lua_script(TEXTS) == wrk.lua_script(TEXTS, None, "json")  # the default is unchanged


@pytest.mark.parametrize("protocol", ["json", "v2"])
def test_wrk_unique_bodies_number_each_text(protocol):
    script = wrk.lua_script(TEXTS, {"Authorization": "Bearer k"}, protocol, unique=True)
    heads, tails = lua_table(script, "heads"), lua_table(script, "tails")
    assert len(heads) == len(tails) == len(TEXTS)
    for n, (head, tail, text) in enumerate(zip(heads, tails, TEXTS, strict=True), 1):
        got = json.loads(head + "wabc" + "-" + str(n) + tail)  # what request() concatenates
        assert got == wrk.body(protocol, f"{text} #wabc-{n}")
    for line in (
        "init = function(args)",
        "  run = args[1] or run",
        '  return wrk.format(nil, nil, nil, heads[i] .. run .. "-" .. n .. tails[i])',
        'wrk.headers["Authorization"] = "Bearer k"',
    ):
        assert line in script.splitlines()


def test_wrk_paths_bodies_and_arguments():
    assert wrk.path("json") == "/predict" and wrk.path("v2") == "/v2/models/sentiment/infer"
    assert wrk.path("v2", "other") == "/v2/models/other/infer"
    with pytest.raises(ValueError, match="not 'grpc'"):
        wrk.body("grpc", "x")
    cmd = wrk.command("http://127.0.0.1:9/predict", 4, 2, Path("/tmp/x.lua"), ("w1234",))
    assert cmd[-3:] == ["http://127.0.0.1:9/predict", "--", "w1234"]  # after the URL: init(args)
    assert "--" not in wrk.command("http://127.0.0.1:9/predict", 4, 2, Path("/tmp/x.lua"))


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (.ci/run installs it)")
def test_wrk_posts_numbered_v2_bodies_to_a_local_server(tmp_path):
    """The real wrk on a v2, numbered script: every body a valid one-row request, no text twice, and the
    measured run's numbers not the warm-up's; on_start runs between the two."""
    seen: list[tuple[str, str]] = []

    def answer(request: StubRequest) -> tuple[int, bytes]:
        (tensor,) = json.loads(request.body)["inputs"]
        seen.append((request.path, tensor["data"][0]))
        return 200, b'{"outputs": []}'

    marks: list[int] = []

    def at_start() -> None:
        marks.append(len(seen))

    with stub_http(answer) as base:
        prefix = tmp_path / "v_u2"
        result = wrk.measure(base + wrk.path("v2"), 2, 1, ["one", "two"], prefix, prefix, {}, "v2", True, at_start)
    assert result is not None and result["requests"] > 2
    assert {p for p, _ in seen} == {"/v2/models/sentiment/infer"}
    texts = [t for _, t in seen]
    assert len(set(texts)) == len(texts)  # not one text twice, warm-up and measured run together
    (mark,) = marks
    warm_runs = {t.rsplit(" #", 1)[1].split("-")[0] for t in texts[:mark]}
    runs = {t.rsplit(" #", 1)[1].split("-")[0] for t in texts[mark + 2 :]}  # past what was in flight
    assert len(warm_runs) == len(runs) == 1 and warm_runs != runs
    assert {t.rsplit(" #", 1)[0] for t in texts} == {"one", "two"}


# -------------------------------------------------------------- bench: --protocols and --cache


def namespace(profile: str = "cpu", **kw: Any) -> argparse.Namespace:
    base = {"profile_name": profile, "users": None, "duration": None, "peers": False, "ops": False, "only": None}
    base.update({"min_answers": None, "max_duration_s": None, "wrk_users": None, "protocols": False, "cache": False})
    base.update({"cache_corpus": "data/zipf.txt", "cache_unique_corpus": "data/reviews.txt", "cache_bytes": 64_000_000})
    return argparse.Namespace(**{**base, **kw})


def test_protocol_configs_one_server_three_rows():
    (server,) = bench_groups.protocol_configs(bench.PROFILES["cpu"])
    assert (server.name, server.group, server.target, server.users, server.grpc) == (
        "batched-protocols",
        "protocol",
        "batched_server:app",
        (1, 32),
        True,
    )
    assert server.env == {}  # the run's engine, nothing else changed
    assert [(r.name, r.locust_args) for r in server.rows] == [
        ("proto-json", ()),
        ("proto-v2-http", ("--protocol", "kserve")),
        ("proto-grpc", ("--protocol", "grpc", "--grpc-client", "raw")),
    ]
    # each user count, every row at it: one after the other on the one server
    assert [(u, r.name) for u, r in bench.points(server)][:4] == [
        (1, "proto-json"),
        (1, "proto-v2-http"),
        (1, "proto-grpc"),
        (32, "proto-json"),
    ]
    assert [bench.wrk_headers(r) for r in server.rows] == [{}, {}, None]  # gRPC: no wrk
    assert [bench_groups.wrk_protocol(r) for r in server.rows] == ["json", "v2", None]
    p = bench.PROFILES["cpu"]
    assert bench.point_cost(server.rows[2], p, 32) == 3 + 15 + 4  # no wrk time planned
    assert bench.point_cost(server.rows[1], p, 32) == 3 + 15 + 4 + 15 + 3


def test_cache_configs_off_and_on_per_corpus():
    run = bench_groups.CacheRun("data/zipf.txt", "data/reviews.txt", 1000)
    cfgs = bench_groups.cache_configs(bench.PROFILES["cpu"], run)
    assert [(c.name, c.env, c.corpus, c.locust_args, c.users) for c in cfgs] == [
        ("batched-cache-off-dup", {"CACHE_BYTES": "0"}, "data/zipf.txt", (), (32,)),
        ("batched-cache-on-dup", {"CACHE_BYTES": "1000"}, "data/zipf.txt", (), (32,)),
        ("batched-cache-off-unique", {"CACHE_BYTES": "0"}, "data/reviews.txt", ("--unique-texts",), (32,)),
        ("batched-cache-on-unique", {"CACHE_BYTES": "1000"}, "data/reviews.txt", ("--unique-texts",), (32,)),
    ]
    assert {c.group for c in cfgs} == {"cache"} and not any(c.rows or c.grpc for c in cfgs)
    assert all(bench.wrk_headers(c) == {} for c in cfgs)  # wrk beside each


@pytest.mark.parametrize(
    "kw, names",
    [
        (
            {"protocols": True, "only": "protocol"},
            [("batched-protocols", ["proto-json", "proto-v2-http", "proto-grpc"])],
        ),
        ({"protocols": True, "only": "proto-grpc"}, [("batched-protocols", ["proto-grpc"])]),  # its siblings stay out
        ({"protocols": True, "only": "proto-json,proto-grpc"}, [("batched-protocols", ["proto-json", "proto-grpc"])]),
        (
            {"cache": True, "only": "cache"},  # the ceiling caps the cache's goal: it comes along, first
            [("http-ceiling", []), *[(f"batched-cache-{s}-{k}", []) for k in ("dup", "unique") for s in ("off", "on")]],
        ),
        (
            {"profile": "quick", "protocols": True, "cache": True},  # a flag's group runs beyond quick's own list
            [
                ("http-ceiling", []),
                ("naive-threadpool", []),
                ("batched", []),
                ("batched-protocols", ["proto-json", "proto-v2-http", "proto-grpc"]),
            ]
            + [(f"batched-cache-{s}-{k}", []) for k in ("dup", "unique") for s in ("off", "on")],
        ),
        ({"only": "batched"}, [("batched", [])]),  # without the flags, no new rows
    ],
)
def test_select_groups(kw, names):
    _, cfgs = bench.select(namespace(**kw))
    assert [(c.name, [r.name for r in c.rows]) for c in cfgs] == names


def test_select_quick_protocol_users_and_unknown_row():
    _, (server,) = bench.select(namespace("quick", protocols=True, only="protocol"))
    assert server.users == (1, 8) and all(r.users == (1, 8) for r in server.rows)  # quick's top is 8
    with pytest.raises(SystemExit, match="unknown configuration proto-nope"):
        bench.select(namespace(protocols=True, only="proto-nope"))


def test_parse_args_cache_settings(tmp_path):
    dup, reviews = tmp_path / "dup.txt", str(ROOT / "data" / "reviews.txt")
    dup.write_text("a\nb\na\n", encoding="utf-8")
    base = ["--corpus", reviews, "--cache-unique-corpus", reviews]  # absolute: whatever the working directory
    a = bench.parse_args([*base, "--cache", "--cache-corpus", str(dup), "--cache-bytes", "1000"])
    assert (a.cache_corpus, a.cache_unique_corpus, a.cache_bytes) == (str(dup), "data/reviews.txt", 1000)
    assert bench.parse_args([*base, "--protocols"]).protocols is True
    with pytest.raises(SystemExit):
        bench.parse_args([*base, "--cache", "--cache-corpus", str(tmp_path / "none.txt")])  # names zipf_corpus
    with pytest.raises(SystemExit):
        bench.parse_args([*base, "--cache", "--cache-corpus", str(dup), "--cache-bytes", "0"])
    assert bench.parse_args([*base, "--cache-corpus", str(tmp_path / "none.txt")]).cache is False  # unread


def test_corpus_stats_and_row_columns(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a\n b \n\nb\na\nc\n", encoding="utf-8")  # a, b, b, a, c: lines stripped, blanks dropped
    stats = bench_groups.corpus_stats(str(path))
    assert stats == {"lines": 5, "unique": 3, "duplicate_share": pytest.approx(0.4)}
    assert bench_groups.corpus_stats("data/reviews.txt")["duplicate_share"] == 0.0
    on = bench.Config("batched-cache-on-unique", "cache", "b:app", (32,), 15, {"CACHE_BYTES": "64"})
    on = dataclasses.replace(on, locust_args=("--unique-texts",))
    assert bench_groups.row_columns(on, str(path)) == {
        "corpus": str(path),
        "corpus_duplicate_share": pytest.approx(0.4),
        "unique_texts": True,
        "cache_bytes": 64,
    }
    plain = bench_groups.row_columns(bench.Config("batched", "batched", "b:app", (8,), 15), "data/reviews.txt")
    assert plain == {
        "corpus": "data/reviews.txt",
        "corpus_duplicate_share": 0.0,
        "unique_texts": False,
        "cache_bytes": None,
    }


H, M, C = bench_groups.CACHE_HITS, bench_groups.CACHE_MISSES, bench_groups.CACHE_COALESCED


@pytest.mark.parametrize(
    "before, after, expected",
    [
        ({H: 10, M: 5, C: 0}, {H: 70, M: 25, C: 20}, (0.6, 0.2)),  # 100 texts: 60 hits, 20 misses, 20 coalesced
        ({}, {H: 0, M: 40, C: 0}, (0.0, 0.0)),  # cache on, nothing repeated
        ({}, {}, (None, None)),  # no counters: cache off, or not in this server
        ({H: 5, M: 5, C: 0}, {H: 5, M: 5, C: 0}, (None, None)),  # no lookups in between
        ({H: 50, M: 50, C: 0}, {H: 1, M: 2, C: 0}, (None, None)),  # counters went backwards (a restart)
    ],
)
def test_cache_shares(before, after, expected):
    got = bench_groups.cache_shares(before, after)
    assert (got["cache_hit_share"], got["cache_coalesced_share"]) == pytest.approx(expected)


def test_launch_sets_cache_and_grpc_only_where_asked(monkeypatch, tmp_path):
    started: list[dict[str, str]] = []

    def uvicorn(target: str, log: Path, env: dict[str, str], workers: int = 1) -> Any:
        started.append(env)
        return types.SimpleNamespace(url="http://127.0.0.1:1", grpc_url="")

    monkeypatch.setattr(bench.Process, "uvicorn", staticmethod(uvicorn))
    monkeypatch.setenv("CACHE_BYTES", "999")  # a shell's settings must not turn the cache on for every row
    monkeypatch.setenv("GRPC_PORT", "8081")
    plain = bench.launch(bench.Config("batched", "batched", "b:app", (8,), 15), tmp_path / "a.log")
    (server,) = bench_groups.protocol_configs(bench.PROFILES["quick"])
    proto = bench.launch(server, tmp_path / "b.log")
    (off, on, *_) = bench_groups.cache_configs(bench.PROFILES["quick"], bench_groups.CacheRun(cache_bytes=5))
    bench.launch(off, tmp_path / "c.log")
    bench.launch(on, tmp_path / "d.log")
    assert "CACHE_BYTES" not in started[0] and "GRPC_PORT" not in started[0] and plain.grpc_url == ""
    port = started[1]["GRPC_PORT"]
    assert port.isdigit() and port != "8081" and proto.grpc_url == f"grpc://127.0.0.1:{port}"
    assert [s.get("CACHE_BYTES") for s in started] == [None, None, "0", "5"]


def test_bench_point_glue_for_grpc_and_cache_rows(monkeypatch, tmp_path):
    """One row each, Locust and wrk faked: the gRPC row loads the gRPC URL and runs no wrk; a cache row
    loads its own corpus, wrk posts numbered bodies, and both hit shares cover their own runs."""
    locust_calls: list[tuple[str, str, tuple[str, ...]]] = []
    scrapes = iter([{H: 0, M: 0}, {H: 30, M: 10}, {H: 40, M: 20}, {H: 100, M: 60}])
    measures: list[dict[str, Any]] = []

    def run_locust(host, users, seconds, corpus, processes, log, prefix, extra=()):
        locust_calls.append((host, corpus, tuple(extra)))
        return False

    def measure(url, users, seconds, texts, prefix, log_prefix, headers, protocol, unique, on_start):
        measures.append({"url": url, "texts": len(texts), "protocol": protocol, "unique": unique})
        on_start()
        return {"requests": 300, "duration_us": 10_000_000, "errors": {}, "latency_ms": {"p50": 1, "p95": 2, "p99": 3}}

    stats = {"requests": 400.0, "failures": 0.0, "requests_per_s": 40.0, "p50_ms": 9.0, "p95_ms": 20.0, "p99_ms": 30.0}
    monkeypatch.setattr(bench, "run_locust", run_locust)
    monkeypatch.setattr(bench, "read_locust_stats", lambda prefix: stats)
    monkeypatch.setattr(bench.wrk, "measure", measure)
    p = bench.PROFILES["quick"]
    a = argparse.Namespace(corpus="data/short.txt", wrk_version="wrk 4.1.0")
    readings = iter(range(100))  # the server's CPU seconds: one more at every reading
    proc = types.SimpleNamespace(
        url="http://127.0.0.1:7", grpc_url="grpc://127.0.0.1:9", cpu_seconds=lambda: float(next(readings))
    )
    (server,) = bench_groups.protocol_configs(p)
    monkeypatch.setattr(bench, "scrape", lambda url: {})
    row, _ = bench.bench_point(server.rows[2], 8, p, a, tmp_path, proc, {})
    assert locust_calls == [("grpc://127.0.0.1:9", "data/short.txt", server.rows[2].locust_args)] * 2  # warm-up, run
    assert measures == [] and row["corpus"] == "data/short.txt" and row["cache_hit_share"] is None
    monkeypatch.setattr(bench, "scrape", lambda url: next(scrapes))
    on = bench_groups.cache_configs(p, bench_groups.CacheRun(unique_corpus="data/reviews.txt"))[3]
    row, _ = bench.bench_point(on, 8, p, a, tmp_path, proc, {})
    assert locust_calls[2:] == [("http://127.0.0.1:7", "data/reviews.txt", ("--unique-texts",))] * 2
    assert measures == [{"url": "http://127.0.0.1:7/predict", "texts": 300, "protocol": "json", "unique": True}]
    assert row["cache_hit_share"] == pytest.approx(0.75)  # 30 of 40, Locust's run
    assert row["wrk_cache_hit_share"] == pytest.approx(0.6)  # 40->100 hits, 20->60 misses: wrk's run alone
    assert (row["unique_texts"], row["cache_bytes"], row["wrk_requests"]) == (True, 64_000_000, 300.0)
    # 1 CPU second over each window: Locust's 400 answers; wrk's 300, from on_start (its warm-up not counted)
    assert row["server_cpu_ms_per_answer"] == pytest.approx(2.5)
    assert row["wrk_server_cpu_ms_per_answer"] == pytest.approx(1000 / 300)
    monkeypatch.setattr(bench, "scrape", lambda url: {})
    v2 = bench.bench_point(server.rows[1], 8, p, a, tmp_path, proc, {})[0]
    assert measures[-1]["url"] == "http://127.0.0.1:7/v2/models/sentiment/infer" and measures[-1]["protocol"] == "v2"
    assert v2["configuration"] == "proto-v2-http" and v2["group"] == "protocol"


# ---------------------------------------------------------------- report: ratios and the cache goal


def summary_rows() -> list[dict[str, Any]]:
    """Rows as bench writes them: the ceiling, the protocol rows at 1 and 32 users, the cache rows."""

    def r(name: str, group: str, users: int, rps: float, p50: float, **kw: Any) -> dict[str, Any]:
        return {
            "configuration": name,
            "group": group,
            "users": users,
            "requests_per_s": rps,
            "p50_ms": p50,
            "p95_ms": p50 * 2,
            "p99_ms": p50 * 3,
            "requests": 1000.0,
            "failures": 0.0,
            "duration_s": 15,
            "too_few_answers": False,
            "corpus": "data/short.txt",
            "corpus_duplicate_share": 0.0,
            **kw,
        }

    wrk_cols = {"wrk_requests": 900.0, "wrk_errors": 0.0}
    return [
        r("http-ceiling", "reference", 32, 2000.0, 15.0, wrk_requests_per_s=2500.0, **wrk_cols),
        r("proto-json", "protocol", 1, 40.0, 25.0),
        r("proto-v2-http", "protocol", 1, 38.0, 26.0),
        r("proto-grpc", "protocol", 1, 39.0, 24.0),
        r("proto-json", "protocol", 32, 100.0, 300.0, wrk_requests_per_s=110.0, wrk_p50_ms=280.0, **wrk_cols)
        | {"server_cpu_ms_per_answer": 1.25},
        r("proto-v2-http", "protocol", 32, 95.0, 320.0, wrk_requests_per_s=99.0, wrk_p50_ms=290.0, **wrk_cols),
        r("proto-grpc", "protocol", 32, 90.0, 330.0, server_cpu_ms_per_answer=2.0),
        r(
            "batched-cache-off-dup",
            "cache",
            32,
            100.0,
            300.0,
            corpus="data/zipf.txt",
            corpus_duplicate_share=0.9,
            cache_bytes=0,
            wrk_requests_per_s=110.0,
            **wrk_cols,
        ),
        r(
            "batched-cache-on-dup",
            "cache",
            32,
            350.0,
            90.0,
            corpus="data/zipf.txt",
            corpus_duplicate_share=0.9,
            cache_bytes=64_000_000,
            cache_hit_share=0.75,
            cache_coalesced_share=0.05,
            wrk_requests_per_s=2000.0,
            wrk_cache_hit_share=0.99,
            **wrk_cols,
        ),
        r(
            "batched-cache-off-unique",
            "cache",
            32,
            100.0,
            300.0,
            corpus="data/reviews.txt",
            unique_texts=True,
            cache_bytes=0,
        ),
        r(
            "batched-cache-on-unique",
            "cache",
            32,
            79.0,
            310.0,
            corpus="data/reviews.txt",
            unique_texts=True,
            cache_bytes=64_000_000,
        ),  # a server without the cache's counters: no hit share
    ]


def env_of() -> dict[str, Any]:
    grpc_args = ["--protocol", "grpc", "--grpc-client", "raw"]
    return {
        "wrk": {"users": 32, "version": "wrk 4.1.0"},
        "answers": {"min_answers": 200, "max_duration_s": 120, "standard": 200, "set_by": "the cpu profile"},
        "configurations": {
            "proto-grpc": {"group": "protocol", "locust_args": grpc_args},
            "proto-v2-http": {"group": "protocol", "locust_args": ["--protocol", "kserve"]},
            "triton": {"group": "peer", "locust_args": ["--protocol", "kserve"]},
            "proto-json": {"group": "protocol", "locust_args": []},
        },
    }


def written(tmp_path: Path) -> list[dict[str, Any]]:
    """summary_rows through bench's writer and report's reader: the columns as a real run's."""
    bench.write_summary(tmp_path / "summary.csv", summary_rows())
    with open(tmp_path / "summary.csv", newline="") as f:
        assert next(csv.reader(f)) == bench.SUMMARY_FIELDS
    return report.load_rows(tmp_path / "summary.csv")


def test_load_rows_reads_the_new_columns(tmp_path):
    rows = {(r["configuration"], r["users"]): r for r in written(tmp_path)}
    on = rows["batched-cache-on-dup", 32]
    assert (on["corpus"], on["corpus_duplicate_share"], on["cache_bytes"]) == ("data/zipf.txt", 0.9, 64_000_000.0)
    assert (on["cache_hit_share"], on["cache_coalesced_share"], on["wrk_cache_hit_share"]) == (0.75, 0.05, 0.99)
    assert on["unique_texts"] is False and rows["batched-cache-on-unique", 32]["unique_texts"] is True
    assert rows["batched-cache-on-unique", 32]["cache_hit_share"] is None


def test_protocol_ratios(tmp_path):
    lines = groups_report.section(written(tmp_path), env_of())
    text = "\n".join(lines)
    assert "## Protocols: one batched server, three ways in" in text and "raw client" in text
    # 1 user, medians: gRPC 24/25, v2 26/25; 32 users: 90/100, 95/100; wrk v2 99/110
    assert (
        "| median latency at 1 user (per-request overhead; difference in ms) | 0.96 (-1.0 ms) | 1.04 (+1.0 ms) |"
        in lines
    )
    assert "| requests/s at 32 users, Locust | 0.90 | 0.95 |" in lines
    assert f"| requests/s at 32 users, wrk | {groups_report.NO_WRK} | 0.90 |" in lines
    assert f"| proto-grpc | 32 | 90.0 | 330 | 990 | 0 | 2.00 | {groups_report.NO_WRK} |  |  |" in lines
    assert "| proto-json | 32 | 100.0 | 300 | 900 | 0 | 1.25 | 110.0 | 280 |  |" in lines
    cpu = "| the server's CPU per answer at 32 users, Locust (its own cost, whatever the client's)"
    assert f"{cpu} | 1.60 (+0.75 ms) | not measured |" in lines  # v2's row has no CPU figure
    assert "- gRPC has no wrk row: wrk speaks HTTP/1.1 only." in text


def test_protocol_ratios_without_a_grpc_result(tmp_path):
    rows = [r for r in written(tmp_path) if r["configuration"] != "proto-grpc" or r["users"] == 32]
    rows = [{**r, "too_few_answers": True} if r["configuration"] == "proto-grpc" else r for r in rows]
    lines = groups_report.section(rows, env_of())
    assert (
        "| median latency at 1 user (per-request overhead; difference in ms) | not measured | 1.04 (+1.0 ms) |" in lines
    )
    assert "| requests/s at 32 users, Locust | not measured | 0.95 |" in lines
    assert any(line.startswith("| proto-grpc | 32 | too few answers |") for line in lines)


@pytest.mark.parametrize(
    "off, on, h, cap, target, met",
    [
        (100.0, 350.0, 0.75, 2000.0, 320.0, True),  # 0.8 / 0.25 x 100
        (100.0, 319.0, 0.75, 2000.0, 320.0, False),
        (100.0, 80.0, 0.0, 2000.0, 80.0, True),  # nothing hit: 0.8 x off, the cache's cost bounded
        (100.0, 79.0, 0.0, 2000.0, 80.0, False),
        (100.0, 1900.0, 0.99, 2000.0, 2000.0, False),  # 8,000 capped by the ceiling
        (100.0, 2000.0, 1.0, 2000.0, 2000.0, True),  # every text a hit: the ceiling itself
        (100.0, 500.0, 0.9, None, 800.0, False),  # no ceiling in the run: uncapped
    ],
)
def test_cache_goal(off, on, h, cap, target, met):
    assert groups_report.goal(off, on, h, cap) == (pytest.approx(target), met)


def test_cache_section(tmp_path):
    lines = groups_report.section(written(tmp_path), env_of())
    assert "## Answer cache: CACHE_BYTES=0 against CACHE_BYTES=64,000,000" in lines
    assert (
        "| batched-cache-on-dup | data/zipf.txt | 0.900 | drawn at random | 32 | 350.0 | 270 | 0.750 | 0.050 "
        "| 2,000.0 |  | 0.990 |"
    ) in lines
    assert any(
        line.startswith("| batched-cache-on-unique | data/reviews.txt | 0.000 | numbered | 32 | 79.0 ")
        for line in lines
    )
    # Locust: 350 / 100, goal 0.8 / 0.25 x 100 = 320 (ceiling 2,000): met
    assert "| data/zipf.txt (dup) | Locust | 100.0 | 350.0 | 3.50x | 0.750 | 320.0 | met |" in lines
    # wrk: hit share 0.99, 0.8 / 0.01 x 110 = 8,800, capped by wrk's own ceiling 2,500: 2,000 is short
    assert (
        "| data/zipf.txt (dup) | wrk | 110.0 | 2,000.0 | 18.18x | 0.990 | 2,500.0 (the ceiling) | **not met** |"
        in lines
    )
    # no counters: read as 0, so the goal is 0.8 x 100 = 80; 79 is short; no wrk on the unique rows here
    assert (
        "| data/reviews.txt (unique) | Locust | 100.0 | 79.0 | 0.79x | 0 (no counters) | 80.0 | **not met** |" in lines
    )
    assert not any(line.startswith("| data/reviews.txt (unique) | wrk") for line in lines)


def test_cache_section_without_pairs(tmp_path):
    rows = [r for r in written(tmp_path) if r["configuration"] != "batched-cache-on-dup"]
    rows = [r for r in rows if r["configuration"] != "batched-cache-on-unique"]
    assert "No corpus has both a cache-off and a cache-on result in this run." in groups_report.section(rows, env_of())
    assert groups_report.section([r for r in rows if r["group"] not in ("protocol", "cache")], env_of()) == []


def test_markdown_has_the_sections_and_no_grpc_wrk_row(tmp_path):
    md = report.markdown(written(tmp_path), env_of())
    assert "## Protocols: one batched server, three ways in" in md and "## Answer cache" in md
    wrk_part = md.split("## Locust beside wrk", 1)[1].split("\n## ", 1)[0]
    assert "| proto-json |" in wrk_part and "| proto-v2-http |" in wrk_part and "| proto-grpc |" not in wrk_part
    assert f"- proto-grpc: {groups_report.NO_WRK}." in wrk_part
    assert "- proto-v2-http: wrk posts the v2 body to /v2/models/sentiment/infer, as Locust does." in wrk_part
    assert "## Locust beside wrk (32 users, POST /predict, closed loop)" in md


def test_tiny_model_is_the_model_id_of_every_server_the_run_starts(monkeypatch, tmp_path):
    """--tiny-model: the protocol rows' server gets MODEL_ID = a folder holding the tests' tiny model (no
    fallback), os.environ too (what the model limit's subprocess inherits), environment.json says so;
    the shell's settings come back and the folder goes when the run ends. Without the flag, nothing changes."""
    started: list[dict[str, str]] = []

    def uvicorn(target: str, log: Path, env: dict[str, str], workers: int = 1) -> Any:
        started.append(env)
        return types.SimpleNamespace(url="http://127.0.0.1:1", grpc_url="")

    monkeypatch.setattr(bench.Process, "uvicorn", staticmethod(uvicorn))
    monkeypatch.setenv("MODEL_ID", "stand-in")
    monkeypatch.setenv("MODEL_FALLBACK", "1")
    corpus = ["--corpus", str(ROOT / "data" / "reviews.txt")]  # absolute: whatever the working directory
    a = bench.parse_args([*corpus, "--protocols", "--only", "protocol", "--tiny-model"])
    _, (server,) = bench.select(a)
    with bench.model_override(a.tiny_model) as model:
        bench.launch(server, tmp_path / "a.log")
        folder = Path(started[0]["MODEL_ID"])
        config = json.loads((folder / "config.json").read_text())
        assert (config["n_layers"], config["dim"], config["hidden_dim"]) == (2, 32, 64)
        assert config["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"} and (folder / "tokenizer.json").is_file()
        assert started[0]["MODEL_FALLBACK"] == "0" and started[0]["GRPC_PORT"].isdigit()
        assert (os.environ["MODEL_ID"], os.environ["MODEL_FALLBACK"]) == (str(folder), "0")
    assert model == {"model_id": bench.TINY_MODEL, "model_source": "tiny"}
    assert (os.environ["MODEL_ID"], os.environ["MODEL_FALLBACK"]) == ("stand-in", "1")
    assert not folder.exists()
    assert "(source: tiny). The tests' tiny model (--tiny-model)" in "\n".join(report.header(model))

    plain = bench.parse_args(corpus)
    with bench.model_override(plain.tiny_model) as nothing:
        bench.launch(server, tmp_path / "b.log")
    assert (plain.tiny_model, nothing, started[1]["MODEL_ID"], started[1]["MODEL_FALLBACK"]) == (
        False,
        {},
        "stand-in",
        "1",
    )


# -------------------------------------------------------------- harness.paired: two configurations, paired


def test_paired_rounds_give_the_median_ratio_and_the_report():
    rows = [
        {"round": 1, "side": "off", "wrk_requests_per_s": 100.0, "server_cpu_ms_per_answer": 1.0},
        {"round": 1, "side": "on", "wrk_requests_per_s": 99.0, "server_cpu_ms_per_answer": 1.02},
        {"round": 2, "side": "on", "wrk_requests_per_s": 90.0, "server_cpu_ms_per_answer": 1.1},
        {"round": 2, "side": "off", "wrk_requests_per_s": 100.0, "server_cpu_ms_per_answer": 1.0},
        {"pair": 2, "round": 3, "side": "off", "wrk_requests_per_s": 50.0, "server_cpu_ms_per_answer": None},
        {"pair": 2, "round": 3, "side": "on", "wrk_requests_per_s": None},  # wrk failed: no ratio, not a 0
        {"pair": 2, "round": 4, "side": "on", "wrk_requests_per_s": 102.0, "server_cpu_ms_per_answer": 0.9},
        {"pair": 2, "round": 4, "side": "off", "wrk_requests_per_s": 100.0, "server_cpu_ms_per_answer": 1.0},
    ]
    ratios = paired.paired_ratios(rows)
    assert ratios == pytest.approx([0.99, 0.90, 1.02])
    assert paired.paired_ratios(rows, "server_cpu_ms_per_answer") == pytest.approx([1.02, 1.1, 0.9])
    for r in rows:
        r.update({"wrk_p50_ms": 1.0, "wrk_p99_ms": 2.0, "wrk_errors": 0, "cache_hits": 0.0, "server_cores": 1.5})
        r.update({"cache_misses": 5.0, "cache_coalesced": 0.0})
    cpu = {"model_name": "Some CPU", "cores": 2, "flags": ["avx2"]}
    meta = {"command": "x", "users": 32, "seconds": 15, "corpus": "c", "model_id": "stand-in", "pairs": 2}
    meta |= {"off": "CACHE_BYTES=0", "on": "CACHE_BYTES=9"}
    meta |= {"git_commit": "abc", "git_dirty": False, "cpu": cpu, "ratios": ratios, "ready": {"on": {"dtype": "f"}}}
    text = paired.report(rows, meta)
    assert "median on/off: **0.990** (2 pair(s) of servers)" in text
    assert "on (CACHE_BYTES=9) against off (CACHE_BYTES=0)" in text
    assert "server CPU an answer, on/off per round: 1.020, 1.100, 0.900; median **1.020**" in text
    assert 'Server on: /ready {"dtype": "f"}' in text
    assert "| 2 | 3 | on | 0.0 |" in text and "| 1 | 1 | off | 100.0 | 1.0 | 2.0 | 0 | 1.50 | 1.000 |" in text
    assert "flags avx2" in text


def test_paired_pairs_start_fresh_servers_first_one_alternating(monkeypatch, tmp_path):
    started, stopped = [], []

    class FakeServer:
        def __init__(self, log: Path) -> None:
            self.url, self.name = f"http://127.0.0.1/{log.stem}", log.stem

        def wait_ready(self, timeout_s: float) -> dict[str, Any]:
            return {"pid": len(started)}

        def stop(self) -> None:
            stopped.append(self.name)

    def uvicorn(target, log, env):
        started.append((log.parent.name, log.stem, env["CACHE_BYTES"]))
        return FakeServer(log)

    def run_rounds(args, servers, work, first=0):
        assert list(servers) == ["off", "on"]  # named, whichever started first
        return [{"round": first + n, "side": side} for n in (1, 2) for side in ("off", "on")]

    monkeypatch.setattr(paired.Process, "uvicorn", uvicorn)
    monkeypatch.setattr(paired, "run_rounds", run_rounds)
    args = argparse.Namespace(off={"CACHE_BYTES": "0"}, on={"CACHE_BYTES": "9"}, rounds=2)
    rows = []
    for pair in (1, 2):
        pair_rows, ready = paired.run_pair(args, pair, tmp_path / f"pair{pair}")
        rows += pair_rows
        assert set(ready) == {"off", "on"}
    assert started == [("pair1", "off", "0"), ("pair1", "on", "9"), ("pair2", "on", "9"), ("pair2", "off", "0")]
    assert sorted(stopped) == ["off", "off", "on", "on"]
    assert [(r["pair"], r["round"]) for r in rows] == [(1, 1), (1, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 4), (2, 4)]


def test_paired_counters_read_the_cache_lines_of_metrics():
    page = (
        b"# HELP sentimentalyzer_cache_hits_total answers from the cache\n"
        b"# TYPE sentimentalyzer_cache_hits_total counter\n"
        b'sentimentalyzer_cache_hits_total{store="local"} 3.0\n'
        b'sentimentalyzer_cache_hits_total{store="redis"} 2.0\n'
        b"# TYPE sentimentalyzer_cache_misses_total counter\n"
        b"sentimentalyzer_cache_misses_total 40.0\n"
        b"sentimentalyzer_cache_misses_created 1.7e9\n"
        b'sentimentalyzer_cache_bytes{where="local"} 123.0\n'
    )

    with stub_http(lambda request: (200 if request.path == "/metrics" else 404, page)) as base:
        got = paired.counters(base)
    assert got == {"hits": 5.0, "misses": 40.0, "coalesced": 0.0}  # both stores summed; coalesced absent: 0


def test_paired_settings_are_name_value_pairs():
    assert paired.pairs("BACKEND=torch, TORCH_COMPILE=1") == {"BACKEND": "torch", "TORCH_COMPILE": "1"}
    assert paired.pairs("CACHE_BYTES=0") == {"CACHE_BYTES": "0"} and paired.pairs("") == {}
    for bad in ("BACKEND", "backend=torch", "=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            paired.pairs(bad)


# ------------------------------------------------ harness.cache_overhead: the cache's own cost, in-process


def test_cache_overhead_kinds_are_what_they_say():
    rows = asyncio.run(cache_overhead.rounds(30, 2, 1 << 20))
    assert cache_overhead.marks(rows) == {"direct": {"direct": 60}, "miss": {"miss": 60}, "hit": {"hit": 60}}
    assert all(r[k] > 0 for r in rows for k in ("direct", "miss", "hit"))


def test_cache_overhead_summary_and_report():
    rows = [
        {"direct": 10.0, "miss": 20.0, "hit": 14.0},
        {"direct": 12.0, "miss": 21.0, "hit": 12.0},
        {"direct": 11.0, "miss": 25.0, "hit": 13.0},
    ]
    s = cache_overhead.summary(rows)
    assert (s["direct_us"], s["miss_us"], s["hit_us"]) == (11.0, 21.0, 13.0)
    assert (s["miss_cost_us"], s["hit_cost_us"]) == (10.0, 2.0)  # medians of each round's difference
    meta = {"summary": s, "cpu": {"model_name": "C", "cores": 2, "flags": ["avx2"]}, "command": "x", "requests": 3}
    meta |= {"rounds": 3, "git_commit": "abc", "git_dirty": False, "marks": {"miss": {"miss": 9}}}
    text = cache_overhead.report(meta)
    assert "The cache adds **10.0 us** to a request whose text is new, and +2.0 us" in text
    assert "| miss | 21.0 |" in text and '{"miss": {"miss": 9}}' in text
