"""The peer field: the registry, the KServe v2 Locust user, the summary's peer rows, and every peer started,
asked once and stopped.

    pytest tests/test_peers.py -q
    python -m harness.peers.envs build     # the live tests need .peers/<name>/; without it each one skips

The live tests serve the suite's tiny model (MODEL_ID = its directory) from each peer's own environment,
send the request the bench warms it with, check the answer as Locust does, and check that stopping it
left no process behind. Triton's and BentoML's also run Locust with their --protocol for a few seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from harness import bench, report
from harness.launch import ROOT, environ
from harness.peers import PEERS, envs, peer_configs, peer_of, reference_of
from harness.peers import summary as peer_summary
from harness.peers.process import PeerProcess, peer_error

# ------------------------------------------------------------------ locustfile without importing locust


def _fake_locust() -> dict[str, types.ModuleType]:
    """Just enough of locust for locustfile.py to import: importing the real one would gevent-patch the
    test process (sockets, threads) for every test after this one."""

    class Hook:
        def __init__(self) -> None:
            self.listeners: list[Callable[..., Any]] = []

        def add_listener(self, f: Callable[..., Any]) -> Callable[..., Any]:
            self.listeners.append(f)
            return f

    class User:
        abstract = True
        tasks: list[Any] = []

        def __init_subclass__(cls) -> None:  # as locust's metaclass: concrete unless the class says otherwise
            cls.abstract = bool(cls.__dict__.get("abstract", False))

    locust = types.ModuleType("locust")
    locust.FastHttpUser = User  # type: ignore[attr-defined]
    locust.events = types.SimpleNamespace(init_command_line_parser=Hook(), init=Hook())  # type: ignore[attr-defined]
    locust.tag = lambda *names: lambda f: f  # type: ignore[attr-defined]
    locust.task = lambda f: f  # type: ignore[attr-defined]
    env = types.ModuleType("locust.env")
    env.Environment = object  # type: ignore[attr-defined]
    user = types.ModuleType("locust.user")
    wait_time = types.ModuleType("locust.user.wait_time")
    wait_time.constant_throughput = lambda rate: lambda u: 0.0  # type: ignore[attr-defined]
    return {"locust": locust, "locust.env": env, "locust.user": user, "locust.user.wait_time": wait_time}


@pytest.fixture
def locustfile(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    for name, module in _fake_locust().items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("locustfile_under_test", ROOT / "locustfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kserve_body(label: Any = "POSITIVE", score: Any = 0.75, **extra: Any) -> dict[str, Any]:
    outputs = [
        {"name": "label", "datatype": "BYTES", "shape": [1, 1], "data": [label]},
        {"name": "score", "datatype": "FP32", "shape": [1, 1], "data": [score]},
    ]
    return {"model_name": "sentiment", "outputs": outputs, **extra}


def test_kserve_request_is_one_bytes_row(locustfile):
    assert locustfile.kserve_request("good") == {
        "inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["good"]}]
    }


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (200, kserve_body(), None),
        (200, kserve_body("NEGATIVE", 0.0), None),
        (200, kserve_body(score=1), None),
        (400, {"error": "unexpected shape for input 'text'"}, "HTTP 400: unexpected shape for input 'text'"),
        (503, None, "HTTP 503"),
        (200, None, "no outputs"),
        (200, {"outputs": "label"}, "no outputs"),
        (200, {"outputs": [kserve_body()["outputs"][1]]}, "expected one label output"),
        (200, {"outputs": [kserve_body()["outputs"][0]]}, "expected one score output"),
        (
            200,
            {"outputs": [{"name": "label", "data": ["POSITIVE", "NEGATIVE"]}, kserve_body()["outputs"][1]]},
            "expected one label output",
        ),
        (200, kserve_body("MAYBE"), "bad label 'MAYBE'"),
        (200, kserve_body(score=1.5), "bad score '1.5'"),
        (200, kserve_body(score="0.5"), "bad score '0.5'"),
        (200, kserve_body(score=True), "bad score 'True'"),
    ],
)
def test_check_kserve_answer(locustfile, status, body, expected):
    assert locustfile.check_kserve_answer(status, body) == expected


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (200, [{"label": "NEGATIVE", "score": 0.6}], None),
        (200, [], "expected a list of 1 prediction"),
        (200, [{"label": "POSITIVE", "score": 0.6}] * 2, "expected a list of 1 prediction"),
        (200, {"label": "POSITIVE", "score": 0.6}, "expected a list of 1 prediction"),
        (200, [{"label": "POSITIVE", "score": -0.1}], "bad score '-0.1'"),
        (200, ["POSITIVE"], "prediction is not an object"),
        (500, {"error": "Server disconnected"}, "HTTP 500: Server disconnected"),
        (422, None, "HTTP 422"),
    ],
)
def test_check_bentoml_answer(locustfile, status, body, expected):
    assert locustfile.check_bentoml_answer(status, body) == expected
    assert locustfile.bentoml_request("fine") == {"texts": ["fine"]}


def test_protocol_users_only_when_asked_for(locustfile, tmp_path):
    """A plain run keeps SentimentUser alone (the others are abstract); --protocol swaps one in."""
    assert locustfile.KServeUser.abstract is True and locustfile.BentoMLUser.abstract is True
    assert locustfile.SentimentUser.abstract is False
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n")
    (on_init,) = sys.modules["locust"].events.init.listeners  # type: ignore[attr-defined]
    for protocol, expected in (
        ("json", [locustfile.SentimentUser]),
        ("kserve", [locustfile.KServeUser]),
        ("bentoml", [locustfile.BentoMLUser]),
    ):
        options = types.SimpleNamespace(corpus=str(corpus), tags=None, exclude_tags=None, protocol=protocol)
        environment = types.SimpleNamespace(parsed_options=options, user_classes=[locustfile.SentimentUser])
        on_init(environment)
        assert environment.user_classes == expected
    assert locustfile.CORPUS == ["one", "two"]


def test_real_locust_lists_only_sentiment_user():
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "SentimentUser" in out.stdout and "KServeUser" not in out.stdout and "BentoMLUser" not in out.stdout


# --------------------------------------------------------------------------------------- the registry


def test_every_peer_has_a_module_and_requirements_that_leave_torch_to_the_builder():
    for peer in PEERS.values():
        assert importlib.util.find_spec(peer.module) is not None, peer.module
        lines = [line.split("#")[0].strip() for line in peer.requirements_file.read_text().splitlines()]
        pins = [line for line in lines if line]
        assert pins and all("==" in line for line in pins), pins
        assert not any(line.startswith("torch") for line in pins), "torch is installed first, pinned, by envs.py"


def test_peer_configs_carry_readiness_and_protocol():
    cfgs = {c.name: c for c in peer_configs((1, 8), 5.0)}
    assert list(cfgs) == list(PEERS)
    assert all(c.group == "peer" and c.users == (1, 8) and c.duration_s == 5.0 for c in cfgs.values())
    assert cfgs["triton"].locust_args == ("--protocol", "kserve")
    assert cfgs["triton"].ready_path == "/v2/models/sentiment/ready"
    assert cfgs["litserve"].locust_args == () and cfgs["bentoml"].ready_path == "/readyz"
    assert cfgs["bentoml"].locust_args == ("--protocol", "bentoml")
    names = [c.name for c in bench.configurations(bench.PROFILES["cpu"], peers=True)]
    assert [n for n in names if n in PEERS] == list(PEERS) and len(names) == len(set(names))


def test_peer_rows_at_another_engine():
    cfgs = peer_configs((32,), 5.0, names=["triton", "ray-serve"], env={"DTYPE": "bf16"}, suffix="-torch-bf16")
    assert [(c.name, c.env, c.locust_args) for c in cfgs] == [
        ("triton-torch-bf16", {"DTYPE": "bf16"}, ("--protocol", "kserve")),
        ("ray-serve-torch-bf16", {"DTYPE": "bf16"}, ()),
    ]
    assert [peer_of(c.name).name for c in cfgs] == ["triton", "ray-serve"]
    assert reference_of("ray-serve-torch-bf16") == "batched-torch-bf16" and reference_of("bentoml") == "batched"
    with pytest.raises(KeyError):
        peer_of("batched")


def test_env_problem_and_stamp(monkeypatch, tmp_path):
    peer = PEERS["litserve"]
    monkeypatch.setattr("harness.peers.ENVS", tmp_path)
    monkeypatch.setattr(envs, "ENVS", tmp_path)
    assert envs.problem(peer) == "not built (python -m harness.peers.envs build litserve)"
    (tmp_path / "litserve.error").write_text("`-r x.txt` exited 1: no such version\n")
    assert envs.problem(peer).startswith("build failed: `-r x.txt` exited 1: no such version")
    (tmp_path / "litserve" / "bin").mkdir(parents=True)
    (tmp_path / "litserve" / "bin" / "python").write_text("")
    (tmp_path / "litserve" / ".built").write_text("0000\n")
    assert envs.problem(peer).startswith("environment out of date")
    (tmp_path / "litserve" / ".built").write_text(envs.stamp_of(peer) + "\n")
    assert envs.problem(peer) is None
    assert envs.torch_pin() == "torch==2.13.0"


@pytest.mark.parametrize(
    "log, expected",
    [
        ("starting\nTraceback (most recent call last):\n  File x\nModuleNotFoundError: No module named 'ray'\n",
         "ModuleNotFoundError: No module named 'ray'"),
        ("(ServeReplica pid=1) AttributeError: 'Settings' object has no attribute 'x'\nshutting down\n",
         "(ServeReplica pid=1) AttributeError: 'Settings' object has no attribute 'x'"),
        ("E1201 lifecycle.cc:654] failed to load 'sentiment'\nbye\n",
         "E1201 lifecycle.cc:654] failed to load 'sentiment'"),
        ("triton: not built (python -m harness.peers.envs build)\n",
         "triton: not built (python -m harness.peers.envs build)"),
        ("", None),
    ],
)  # fmt: skip
def test_peer_error_picks_the_telling_line(log, expected):
    assert peer_error(log) == expected


def test_batch_counters_from_the_peer_log(tmp_path):
    log = tmp_path / "peer.log"
    log.write_text(
        "PEER_BATCH 4 100 160\n"
        "\x1b[36m(ServeReplica:sentiment:Sentiment pid=7)\x1b[0m PEER_BATCH 2 30 40\n"
        "INFO something else\n"
    )
    proc = PeerProcess("ray-serve", None, log, peer=PEERS["ray-serve"])  # type: ignore[arg-type]
    after = proc.counters()
    assert bench.metrics_delta({}, after) == {"avg_batch_size": 3.0, "padding_efficiency": 130 / 200}
    assert bench.metrics_delta(after, after) == {"avg_batch_size": None, "padding_efficiency": None}


def test_a_peer_without_its_environment_fails_to_start_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr("harness.peers.ENVS", tmp_path)
    monkeypatch.setattr(envs, "ENVS", tmp_path)
    proc = PeerProcess.launch(PEERS["triton"], tmp_path / "triton.log", environ())
    try:
        with pytest.raises(RuntimeError, match=r"triton exited with code 1: triton: not built \(python -m harness"):
            proc.wait_ready(timeout_s=30)
    finally:
        proc.stop()


# -------------------------------------------------------------------------------- the summary's rows


def row(name: str, group: str, users: int, rps: float | None, p50: float = 100.0, p99: float = 200.0, **kw: Any):
    return {
        "configuration": name,
        "group": group,
        "users": users,
        "requests_per_s": rps,
        "p50_ms": p50,
        "p95_ms": p99,
        "p99_ms": p99,
        "failures": 0.0,
        "rps_over_model_limit": kw.pop("limit", None),
        "locust_cpu_warning": False,
        **kw,
    }


PEER_ROWS = [
    row("batched", "batched", 8, 50.0, 150.0, 400.0, limit=0.5),
    row("batched", "batched", 32, 100.0, 300.0, 600.0, limit=1.0),
    row("naive-threadpool", "naive", 32, 30.0, 900.0, 1200.0, limit=0.3),
    row("litserve", "peer", 8, 60.0, 120.0, 300.0, limit=0.6, avg_batch_size=6.54, padding_efficiency=0.4123),
    row("litserve", "peer", 32, 80.0, 350.0, 700.0, limit=0.8),
    row("ray-serve", "peer", 32, 25.0, 1000.0, 2500.0, limit=0.25),
]
PEER_ENV = {
    "corpus": "data/long.txt",
    "peers": {
        "litserve": {"version": "0.2.19", "settings": "batch 64, 10 ms"},
        "triton": {"version": "0.7.0", "settings": "dynamic batcher", "environment_problem": None},
        "ray-serve": {"version": "2.60.0", "settings": "@serve.batch"},
    },
    "servers": {"litserve": {}, "ray-serve": {}, "triton": {"error": "triton exited with code 1: OSError: no lib"}},
}


def test_peer_table_rows():
    lines = peer_summary.table(PEER_ROWS, PEER_ENV)
    assert lines[:2] == [
        "| server | version | batching | users | req/s | p50 ms | p99 ms | avg batch | padding eff. "
        "| / model limit | x batched |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    assert lines[2:] == [
        "| batched |  | the project's | 8 | 50.0 | 150 | 400 |  |  | 0.50 | 1.00 |",
        "| litserve | 0.2.19 | batch 64, 10 ms | 8 | 60.0 | 120 | 300 | 6.5 | 0.41 | 0.60 | 1.20 |",
        "| batched |  | the project's | 32 | 100.0 | 300 | 600 |  |  | 1.00 | 1.00 |",
        "| naive-threadpool |  | the project's | 32 | 30.0 | 900 | 1,200 |  |  | 0.30 | 0.30 |",
        "| litserve | 0.2.19 | batch 64, 10 ms | 32 | 80.0 | 350 | 700 |  |  | 0.80 | 0.80 |",
        "| ray-serve | 2.60.0 | @serve.batch | 32 | 25.0 | 1,000 | 2,500 |  |  | 0.25 | 0.25 |",
        "| triton | 0.7.0 | dynamic batcher | | did not run: triton exited with code 1: OSError: no lib | | | | | | |",
    ]


def test_a_peer_that_answered_nothing_keeps_its_row():
    rows = [row("batched", "batched", 8, 4.7), row("triton", "peer", 8, None, p50=None, p99=None, failures=2.0)]
    assert peer_summary.table(rows, {"peers": {"triton": {"version": "0.7.0"}}})[3:] == [
        "| triton | 0.7.0 |  | 8 | no answer completed in the run (2 failures) | | | | | | |"
    ]


def test_peer_table_without_batched_row_leaves_the_ratio_blank():
    (line,) = peer_summary.table([row("bentoml", "peer", 4, 12.0)], {"peers": {"bentoml": {}}})[2:]
    assert line == "| bentoml |  |  | 4 | 12.0 | 100 | 200 |  |  |  |  |"


def test_a_peer_never_started_is_listed_with_its_environment_problem():
    env = {"peers": {"bentoml": {"environment_problem": "not built (python -m harness.peers.envs build bentoml)"}}}
    assert peer_summary.table([], env)[2:] == [
        "| bentoml |  |  | | did not run: not built (python -m harness.peers.envs build bentoml) | | | | | | |"
    ]


def test_engine_variant_is_compared_with_batched_on_its_engine():
    rows = [
        row("batched", "batched", 32, 100.0, limit=1.0),
        row("batched-torch-bf16", "engine", 32, 150.0, limit=1.5),
        row("triton", "peer", 32, 90.0, limit=0.9),
        row("triton-torch-bf16", "peer", 32, 120.0, p99=150.0, limit=1.2),
    ]
    assert peer_summary.table(rows, {})[2:] == [
        "| batched |  | the project's | 32 | 100.0 | 100 | 200 |  |  | 1.00 | 1.00 |",
        "| batched-torch-bf16 |  | the project's | 32 | 150.0 | 100 | 200 |  |  | 1.50 | 1.00 |",
        "| triton |  |  | 32 | 90.0 | 100 | 200 |  |  | 0.90 | 0.90 |",
        "| triton-torch-bf16 |  |  | 32 | 120.0 | 100 | 150 |  |  | 1.20 | 0.80 |",
    ]
    assert peer_summary.wins(rows, {}) == [
        "At 32 users triton-torch-bf16's p99 was lower than the batched server (batched-torch-bf16)'s: "
        "150 ms vs 200 ms."
    ]


def test_peer_wins_and_section():
    assert peer_summary.wins(PEER_ROWS, PEER_ENV) == [
        "At 8 users litserve served more requests/s than the batched server: 60.0 vs 50.0.",
        "At 8 users litserve's p99 was lower than the batched server's: 300 ms vs 400 ms.",
    ]
    assert peer_summary.wins(PEER_ROWS[1:3] + PEER_ROWS[5:], PEER_ENV) == [
        "No peer beat the batched server on requests/s or p99 at any user count measured."
    ]
    assert peer_summary.section(PEER_ROWS[:3], {"corpus": "x"}) == []
    lines = peer_summary.section(PEER_ROWS, PEER_ENV)
    assert lines[0] == "## Peers: the same model in other servers"
    assert "- At 8 users litserve served more requests/s than the batched server: 60.0 vs 50.0." in lines


def test_report_markdown_has_the_peer_section_and_plot(tmp_path):
    rows = [{**r, "avg_batch_size": None, "padding_efficiency": None, "rps_over_http_ceiling": None} for r in PEER_ROWS]
    md = report.markdown(rows, PEER_ENV).splitlines()
    assert md.index("## Peers: the same model in other servers") < md.index("## Where batching loses")
    assert "| 8 | litserve | 0.83x | 1.33 |" in md  # the ratios table now names every peer
    assert peer_summary.plot(rows, PEER_ENV, tmp_path / "peers.png") and (tmp_path / "peers.png").stat().st_size
    assert not peer_summary.plot(rows[:3], PEER_ENV, tmp_path / "none.png")


def test_field_table_across_runs(tmp_path):
    for corpus, scale in (("data/short.txt", 2.0), ("data/long.txt", 0.5)):
        run = tmp_path / Path(corpus).stem
        run.mkdir()
        with open(run / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["configuration", "group", "users", "requests_per_s", "p50_ms", "p99_ms"])
            w.writeheader()
            for r in PEER_ROWS:
                w.writerow({k: (r[k] * scale if k == "requests_per_s" else r[k]) for k in w.fieldnames})
        (run / "environment.json").write_text(json.dumps({**PEER_ENV, "corpus": corpus}))
    lines = peer_summary.field_table([tmp_path / "short", tmp_path / "long"])
    assert lines == [
        "| server | data/short.txt | data/long.txt |",
        "|---|---:|---:|",
        "| batched | 200.0, p99 600 ms @ 32 users | 50.0, p99 600 ms @ 32 users |",
        "| naive-threadpool | 60.0 (0.30x), p99 1200 ms @ 32 users | 15.0 (0.30x), p99 1200 ms @ 32 users |",
        "| litserve | 160.0 (0.80x), p99 700 ms @ 32 users | 40.0 (0.80x), p99 700 ms @ 32 users |",
        "| triton | did not run | did not run |",
        "| ray-serve | 50.0 (0.25x), p99 2500 ms @ 32 users | 12.5 (0.25x), p99 2500 ms @ 32 users |",
    ]


# ------------------------------------------------------------------ each peer: start, one answer, stop


def check_answer(peer_protocol: str, body: Any) -> None:
    if peer_protocol == "kserve":
        outputs = {o["name"]: o["data"] for o in body["outputs"]}
        label, score = outputs["label"][0], outputs["score"][0]
    elif peer_protocol == "bentoml":
        ((label, score),) = [(p["label"], p["score"]) for p in body]
    else:
        label, score = body["label"], body["score"]
    assert label in ("POSITIVE", "NEGATIVE") and 0.0 <= score <= 1.0, body


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_starts_answers_and_stops(name: str, tiny_model_dir: str, tmp_path: Path) -> None:
    peer = PEERS[name]
    why = envs.problem(peer)
    if why:
        pytest.skip(f"{name}: {why}")
    env = environ({"MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0", "DEVICE": "cpu"})
    proc = PeerProcess.launch(peer, tmp_path / f"{name}.log", env)
    try:
        info = proc.wait_ready(timeout_s=240)
        assert info["model_source"] == "local" and info["dtype"] == "fp32", info
        path, body = peer.probe()
        r = httpx.post(proc.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        check_answer(peer.protocol, r.json())
        if peer.protocol != "json":  # its Locust user class against the real server
            out = subprocess.run(
                [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "2", "-r", "2",
                 "-t", "3s", "--host", proc.url, *peer.locust_args, "--only-summary", "--csv", str(tmp_path / "k")],
                cwd=ROOT, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            with open(tmp_path / "k_stats.csv", newline="") as f:
                agg = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
            assert int(agg["Request Count"]) > 0 and agg["Failure Count"] == "0", out.stdout[-2000:]
    finally:
        proc.stop()
    assert proc.popen.poll() is not None
    alive = [p for p in proc.descendants.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}\n{proc.tail(40)}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(proc.url + peer.ready_path, timeout=2)
