"""One command runs the whole comparison: every server configuration under Locust, two ceilings, a report.

    python -m harness.bench                          # CPU sweep, about 10 min on 2 cores -> results/<date>-cpu/
    python -m harness.bench --quick                  # smoke test, under 2 min (CI); rows of 100 answers, 10 s at most
    python -m harness.bench --gpu --out results/h100 # user counts that saturate a GPU, Locust --processes 4
    python -m harness.bench --peers                  # + LitServe, Triton, Ray Serve and BentoML rows (harness/peers/;
                                                   # builds their environments in .peers/ first where missing)
    python -m harness.bench --peers --only peer,batched --corpus data/long.txt --out results/cpu-long
    python -m harness.bench --corpus data/short.txt --out results/cpu-short
    python -m harness.bench --only batched,naive-threadpool --users 8,32 --duration 15
    python -m harness.bench --ops --only ops --out results/cpu-2core-ops   # keys, rate limit, JSON logs: on vs off
    python -m harness.bench --protocols --only protocol --corpus data/short.txt --out results/cpu-avx2-protocols
    python -m harness.bench --protocols --only protocol --tiny-model --out results/cpu-avx512-protocols-tiny
    python -m harness.bench --cache --only cache --out results/cpu-avx2-cache   # cache off/on (harness/bench_groups.py)
    python -m harness.bench --min-answers 200 --max-duration-s 120   # the defaults: every row holds 200 answers
    python -m harness.bench --wrk-users 32           # the default: 32-user rows also run wrk (0: no wrk)
    MODEL_ID=stand-in DTYPE=int8 python -m harness.bench   # server settings come from the environment
                                                   # (API_KEYS, RATE_LIMIT and REDIS_URL are left out)

--tiny-model runs every row on the tests' tiny DistilBERT (harness/fronts.py's tiny_model: 2 layers, dim 32,
the real tokenizer) instead of MODEL_ID: built into a temporary folder, which becomes MODEL_ID (with
MODEL_FALLBACK=0) for everything the run starts, the model limit and the servers, and is removed after.
Its forward pass costs well under a millisecond, so the rows measure the transport and the front ends
(the protocol rows: JSON, v2 over HTTP and gRPC) rather than the model; environment.json and summary.md
say `model_source: tiny`.

For each configuration it starts `uvicorn <module>:app` on a free port with that configuration's
environment, waits for GET /ready, and for each user count warms up (unrecorded Locust load), runs
`locust --headless --csv` and reads the batch-size and padding counters from /metrics before and after.
A row that finished fewer than --min-answers answers (successful responses) runs again for twice as
long, or more as its rate projects, up to --max-duration-s; one still short there is kept, marked
too_few_answers, and summary.md quotes no figure of it. Rows at --wrk-users users (POST /predict,
closed loop; POST /v2/models/sentiment/infer on the v2 protocol row; none on gRPC's) then run wrk for the
same time, beside Locust (harness/wrk.py); without wrk, no wrk columns. A configuration may hold several
rows on its one server (--protocols: one per protocol); a row may name its own corpus (--cache). Every row
records its corpus and the corpus's duplicate share.
Two references are measured in the same run: the model limit (tokenize + forward in-process, no
HTTP, in a subprocess before any server starts) and the HTTP ceiling (`harness.bench:ceiling_app`, a
no-model endpoint on the same FastAPI + uvicorn stack). `harness/report.py` turns summary.csv into
summary.md and the plots. A server that does not get ready is reported with its log tail and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness import bench_groups, wrk
from harness.launch import ROOT, Process, environ, free_port
from harness.limits import default_engine, engine_name, machine_engines
from harness.peers import describe as describe_peers
from harness.peers import launch as launch_peer
from harness.peers import peer_configs
from harness.peers import prepare as prepare_peers
from harness.peers.process import PeerProcess
from harness.references import create_ceiling_app, environment, read_corpus

SUMMARY_FIELDS = [
    "configuration",
    "group",
    "users",
    "requests_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "requests",
    "failures",
    "duration_s",
    "too_few_answers",
    "avg_batch_size",
    "padding_efficiency",
    "rps_over_model_limit",
    "rps_over_http_ceiling",
    "max_batch_size",
    "batch_policy",
    "model_source",
    "locust_cpu_warning",
    "wrk_requests_per_s",
    "wrk_p50_ms",
    "wrk_p95_ms",
    "wrk_p99_ms",
    "wrk_requests",
    "wrk_errors",
    "server_cores",
    "server_cpu_ms_per_answer",
    "wrk_server_cores",
    "wrk_server_cpu_ms_per_answer",
    *bench_groups.COLUMNS,
]
MIN_ANSWERS = 200  # a row with fewer is noise: its p99 is one or two requests
TINY_MODEL = "tiny DistilBERT (harness.fronts.tiny_model: 2 layers, dim 32, seed 1), real uncased tokenizer"


@dataclass(frozen=True)
class Profile:
    users: tuple[int, ...]
    duration_s: float
    warmup_s: float
    bus_sizes: tuple[int, ...]  # MAX_BATCH_SIZE values besides the default, at bus_users
    bus_users: int
    slow_users: tuple[int, ...]  # naive on-demand loads the model per request: few users, short run
    slow_duration_s: float
    processes: int  # Locust --processes; 0 = one process
    limit_batches: tuple[int, ...]
    limit_s: float  # least seconds of model-limit timing per batch size and kind (whole corpus passes)
    wait_ms: tuple[int, ...] = ()  # MAX_WAIT_MS values besides the default, at bus_users
    scale_workers: tuple[int, ...] = ()  # uvicorn --workers N rows (N front ends on the one engine)
    open_loop_rps: float = 0.0  # > 0: a batched row at this offered rate (open loop), to read its p99
    engine_users: tuple[int, ...] = (32,)  # user counts of the other engines' rows
    configs: tuple[str, ...] | None = None  # None = every configuration
    min_answers: int = MIN_ANSWERS  # a row with fewer is run again for longer...
    max_duration_s: float = 120.0  # ...doubling up to this, then kept but marked too_few_answers
    wrk_users: int = 32  # rows at this user count are measured with wrk too (0: never)


PROFILES = {
    "cpu": Profile((1, 8, 32), 15, 3, (1, 16), 32, (2,), 10, 0, (8, 16, 32, 64), 4.0, engine_users=(1, 32)),
    # a smoke test of every step, wrk included, in under 2 minutes: fewer answers, a short cap
    "quick": Profile(
        (8,),
        5,
        2,
        (),
        8,
        (2,),
        5,
        0,
        (16,),
        2.0,
        configs=("http-ceiling", "naive-threadpool", "batched"),
        min_answers=100,
        max_duration_s=10.0,
        wrk_users=8,
    ),
    "gpu": Profile(
        (1, 32, 128, 256, 512),
        30,
        5,
        (1, 4, 16, 256),
        256,
        (4,),
        15,
        4,
        (32, 64, 128, 256, 512),
        3.0,
        wait_ms=(0, 5),
        scale_workers=(2, 4),
        open_loop_rps=2000.0,
    ),
}


@dataclass(frozen=True)
class Config:
    name: str
    group: str  # reference, naive, batched, bus, policy or peer: how report.py groups rows
    target: str  # uvicorn app, or a peer's module (python -m)
    users: tuple[int, ...]
    duration_s: float
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/ready"
    locust_args: tuple[str, ...] = ()
    workers: int = 1  # uvicorn --workers: N front ends on one engine (their metrics summed: PROMETHEUS_MULTIPROC_DIR)
    corpus: str | None = None  # its rows' corpus (None: the run's --corpus)
    grpc: bool = False  # the server also serves gRPC, on a free GRPC_PORT
    rows: tuple[Config, ...] = ()  # rows measured on this one server, each user count in turn (none: itself)


def configurations(
    p: Profile,
    peers: bool,
    ops: bool = False,
    protocols: bool = False,
    cache: bench_groups.CacheRun | None = None,
) -> list[Config]:
    """Every configuration of a profile, references first so later rows can be compared with them."""
    top = (max(p.users),)
    cfgs = [Config("http-ceiling", "reference", "harness.bench:ceiling_app", top, p.duration_s)]
    for mode, users in (("threadpool", p.users), ("blocking", top)):  # blocking: one point shows the damage
        cfgs.append(Config(f"naive-{mode}", "naive", "naive_server:app", users, p.duration_s, {"NAIVE_MODE": mode}))
    cfgs.append(
        Config(
            "naive-on-demand", "naive", "naive_server:app", p.slow_users, p.slow_duration_s, {"NAIVE_MODE": "on-demand"}
        )
    )
    cfgs.append(Config("batched", "batched", "batched_server:app", p.users, p.duration_s))
    cfgs += [
        Config(f"batched-b{n}", "bus", "batched_server:app", (p.bus_users,), p.duration_s, {"MAX_BATCH_SIZE": str(n)})
        for n in p.bus_sizes
    ]
    # packing (the default on PyTorch) against length groups, and against the classic batcher that pads
    # every batch to its longest text: the same server with PACKING=off, then also BATCH_POLICY=pad
    for name, env in (
        ("batched-grouped", {"PACKING": "off"}),
        ("batched-pad", {"PACKING": "off", "BATCH_POLICY": "pad"}),
    ):
        cfgs.append(Config(name, "policy", "batched_server:app", (p.bus_users,), p.duration_s, env))
    # MAX_WAIT_MS (spec default 2): how long a free model waits for companions
    cfgs += [
        Config(f"batched-w{w}", "policy", "batched_server:app", (p.bus_users,), p.duration_s, {"MAX_WAIT_MS": str(w)})
        for w in p.wait_ms
    ]
    # every other engine the machine runs, naive and batched alike (the default engine's rows are above)
    default = default_engine(bool(p.processes))
    for backend, dtype in machine_engines(bool(p.processes)):
        if (backend, dtype) == default:
            continue
        env = {"BACKEND": backend, "DTYPE": dtype, "NAIVE_MODE": "threadpool"}
        name = engine_name(backend, dtype)
        cfgs.append(Config(f"naive-{name}", "engine", "naive_server:app", p.engine_users, p.duration_s, env))
        cfgs.append(Config(f"batched-{name}", "engine", "batched_server:app", p.engine_users, p.duration_s, env))
    if p.open_loop_rps:  # each of the top user count's users paces itself: offered load fixed, whatever the answers
        per_user = p.open_loop_rps / max(p.users)
        cfgs.append(
            Config(
                f"batched-open{p.open_loop_rps:g}",
                "policy",
                "batched_server:app",
                top,
                p.duration_s,
                locust_args=("--target-rps-per-user", f"{per_user:.6g}"),
            )
        )
    cfgs += [
        Config(f"batched-x{n}", "scale", "batched_server:app", top, p.duration_s, workers=n) for n in p.scale_workers
    ]
    if ops:  # issue 6: every operations feature on, against the same server with them off, twice, alternating
        on = {
            "API_KEYS": "bench-key",
            "RATE_LIMIT": "1000000/s",
            "LOG_FORMAT": "json",
            **({"REDIS_URL": os.environ["BENCH_REDIS_URL"]} if os.environ.get("BENCH_REDIS_URL") else {}),
        }
        for i in (1, 2):
            cfgs.append(Config(f"batched-ops-off-{i}", "ops", "batched_server:app", (p.bus_users,), p.duration_s))
            cfgs.append(
                Config(
                    f"batched-ops-on-{i}",
                    "ops",
                    "batched_server:app",
                    (p.bus_users,),
                    p.duration_s,
                    on,
                    locust_args=("--api-key", "bench-key"),
                )
            )
    cfgs += bench_groups.protocol_configs(p) if protocols else []  # one server, a row per protocol
    cfgs += bench_groups.cache_configs(p, cache) if cache else []  # off against on, per corpus
    if peers:  # the registry in harness/peers/__init__.py: module, readiness, Locust protocol per peer
        cfgs += peer_configs(top, p.duration_s)  # the peers table compares them at the top user count
    # a group asked for by its flag runs whatever the profile's own list
    return [c for c in cfgs if p.configs is None or c.name in p.configs or c.group in ("ops", "protocol", "cache")]


def points(cfg: Config) -> list[tuple[int, Config]]:
    """(users, row) in the order a configuration measures them: each user count, then each row at it."""
    return [(u, r) for u in cfg.users for r in cfg.rows or (cfg,)]


def __getattr__(name: str) -> Any:
    # `uvicorn harness.bench:ceiling_app` builds the app on first access, so `import harness.bench` stays cheap
    if name == "ceiling_app":
        return create_ceiling_app()
    raise AttributeError(name)


# ------------------------------------------------------------------------------- parsing, summaries


def read_locust_stats(prefix: str | Path) -> dict[str, float]:
    """The Aggregated row of Locust's `<prefix>_stats.csv` (its last once-a-second snapshot of the run).

    requests_per_s counts successful answers only: Locust's own Requests/s includes failures, and a
    server answering 503 at once would otherwise look fast. Percentiles are Locust's, over all requests.
    """
    with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as f:
        row = next((r for r in csv.DictReader(f) if r["Name"] == "Aggregated"), None)
    requests, failures = (float(row["Request Count"]), float(row["Failure Count"])) if row else (0.0, 0.0)
    if row is None or requests == 0:
        return {"requests": requests, "failures": failures}
    return {
        "requests": requests,
        "failures": failures,
        "requests_per_s": float(row["Requests/s"]) * (requests - failures) / requests,
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {sample name: value}, summed over label sets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Average items per forward pass and padding efficiency over the measured run alone."""

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    passes, computed = d("sentimentalyzer_batch_size_count"), d("sentimentalyzer_computed_tokens_total")
    return {
        "avg_batch_size": d("sentimentalyzer_batch_size_sum") / passes if passes > 0 else None,
        "padding_efficiency": d("sentimentalyzer_real_tokens_total") / computed if computed > 0 else None,
    }


def summary_row(
    cfg: Config,
    users: int,
    stats: dict[str, float],
    delta: dict[str, float | None],
    ready: dict[str, Any],
    cpu_warning: bool,
) -> dict[str, Any]:
    batching = ready.get("batching") or {}
    return {
        "configuration": cfg.name,
        "group": cfg.group,
        "users": users,
        **stats,
        **delta,
        "max_batch_size": batching.get("max_batch_size"),
        "batch_policy": batching.get("batch_policy"),
        "model_source": ready.get("model_source"),
        "locust_cpu_warning": cpu_warning,
    }


def add_ratios(rows: list[dict[str, Any]], model_limit: float | None) -> list[dict[str, Any]]:
    """requests/s over the model limit and over the best HTTP-ceiling figure of the run (rows with too few
    answers are no result: neither a ceiling nor a ratio)."""
    ceiling = max(
        (
            r.get("requests_per_s") or 0.0
            for r in rows
            if r["configuration"] == "http-ceiling" and not r.get("too_few_answers")
        ),
        default=0.0,
    )
    for r in rows:
        # a ceiling over itself says nothing
        rps = r.get("requests_per_s") if r["group"] != "reference" and not r.get("too_few_answers") else None
        r["rps_over_model_limit"] = rps / model_limit if rps is not None and model_limit else None
        r["rps_over_http_ceiling"] = rps / ceiling if rps is not None and ceiling else None
    return rows


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return int(v) if v.is_integer() else float(f"{v:.6g}")  # counts stay counts; rates keep 6 digits
    return "" if v is None else v


# ------------------------------------------------------------------------------- servers and Locust


def launch(cfg: Config, log_path: Path) -> Process:
    """Starts one configuration's server on a free port (not yet ready)."""
    # the comparison is of serving paths: keys and rate limits would only turn load into 401s and 429s;
    # an answer cache or a gRPC port only where a configuration asks (a corpus repeats: the cache would hit)
    env = environ(cfg.env, drop=("API_KEYS", "RATE_LIMIT", "REDIS_URL", "CACHE_BYTES", "GRPC_PORT"))
    grpc_port = free_port() if cfg.grpc else 0
    if grpc_port:
        env["GRPC_PORT"] = str(grpc_port)
    if cfg.group == "peer":  # in its own virtual environment (.peers/<name>/), stopped its own way
        return launch_peer(cfg.name, log_path, env)
    if cfg.workers > 1:  # every worker's counters in one scrape; the directory must start empty
        prom = log_path.parent / f"prometheus-{cfg.name}"
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    proc = Process.uvicorn(cfg.target, log_path, env, workers=cfg.workers)
    proc.grpc_url = f"grpc://127.0.0.1:{grpc_port}" if grpc_port else ""
    return proc


def scrape(url: str) -> dict[str, float]:
    try:
        r = httpx.get(url + "/metrics", timeout=5)
        return parse_metrics(r.text) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def run_locust(
    url: str,
    users: int,
    seconds: float,
    corpus: str,
    processes: int,
    log_path: Path,
    csv_prefix: Path | None,
    extra: tuple[str, ...] = (),
) -> bool:
    """Runs Locust headless; True when its log has the CPU-usage warning (the load generator was the limit)."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "locustfile.py"),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds:g}s",
        "--host",
        url,
        "--corpus",
        corpus,
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "5",
    ]
    cmd += ["--csv", str(csv_prefix)] if csv_prefix else []
    cmd += ["--processes", str(processes)] if processes else []
    cmd += list(extra)
    with open(log_path, "wb") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120).returncode
    text = log_path.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"locust exited with code {rc}:\n{tail(log_path)}")
    return "CPU usage above" in text


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------- enough answers in every row


def answers(row: dict[str, Any]) -> float:
    return (row.get("requests") or 0.0) - (row.get("failures") or 0.0)


def longer(seconds: float, got: float, min_answers: int, max_s: float) -> float:
    """Twice seconds, doubled again while the rate so far projects fewer than min_answers (a quarter more
    for Locust's ramp-up and the last second its CSV misses): one long re-run, not a ladder. At most max_s."""
    need = seconds * min_answers / max(got, 1.0) * 1.25
    nxt = 2 * seconds
    while nxt < min(need, max_s):
        nxt *= 2
    return min(nxt, max_s)


def _say(message: str) -> None:
    print(message, flush=True)


def enough_answers(
    run: Callable[[float], dict[str, Any]],
    first_s: float,
    min_answers: int,
    max_s: float,
    say: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """run(seconds) returns a row; runs it again for longer until the row holds min_answers answers or
    has run max_s seconds. The row records the seconds of the run it is, and too_few_answers."""
    seconds = first_s
    while True:
        row = run(seconds)
        got = answers(row)
        # failures and no answer: the server is failing, not slow, and more time brings more failures
        if got >= min_answers or seconds >= max_s or (got == 0 and row.get("failures")):
            return {**row, "duration_s": seconds, "too_few_answers": got < min_answers}
        nxt = longer(seconds, got, min_answers, max_s)
        say(
            f"  {row['configuration']} u={row['users']}: {got:.0f} answers in {seconds:g} s, "
            f"fewer than {min_answers}: again for {nxt:g} s"
        )
        seconds = nxt


def wrk_headers(cfg: Config) -> dict[str, str] | None:
    """Headers for wrk's POST, or None where wrk would not send Locust's load: a peer's own protocol, gRPC
    (wrk speaks HTTP/1.1), or an open-loop row (wrk keeps every connection busy, it can not pace)."""
    args = list(cfg.locust_args)
    if cfg.group == "peer" or "--target-rps-per-user" in args or bench_groups.wrk_protocol(cfg) is None:
        return None
    return {"Authorization": f"Bearer {args[args.index('--api-key') + 1]}"} if "--api-key" in args else {}


def bench_point(
    cfg: Config, users: int, p: Profile, a: argparse.Namespace, out: Path, proc: Process, ready: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """One row: warm-up, Locust for as long as it takes to hold p.min_answers answers, wrk at p.wrk_users.
    Returns the row and the seconds it took beyond its plan (for the progress estimate)."""
    name, logs, ran = f"{cfg.name}_u{users}", out / "logs", []
    corpus = cfg.corpus or a.corpus
    # gRPC rows load the server's GRPC_PORT; its counters are still read over HTTP
    host = getattr(proc, "grpc_url", "") if bench_groups.protocol(cfg) == "grpc" else proc.url
    run_locust(host, users, p.warmup_s, corpus, p.processes, logs / f"{name}_warmup.log", None, cfg.locust_args)

    def counters() -> dict[str, float]:
        return proc.counters() if isinstance(proc, PeerProcess) else scrape(proc.url)  # a peer's from its log

    def measured(seconds: float) -> dict[str, Any]:
        ran.append(seconds)
        before, cpu = counters(), CpuWindow(proc)
        log = logs / f"{name}_locust.log"
        warn = run_locust(host, users, seconds, corpus, p.processes, log, out / name, cfg.locust_args)
        after = counters()
        row = summary_row(cfg, users, read_locust_stats(out / name), metrics_delta(before, after), ready, warn)
        row.update(cpu.columns("server", answers(row)))
        return {**row, **bench_groups.row_columns(cfg, corpus), **bench_groups.cache_shares(before, after)}

    row = enough_answers(measured, cfg.duration_s, p.min_answers, p.max_duration_s)
    extra = sum(ran) - cfg.duration_s
    if users == p.wrk_users and wrk_headers(cfg) is not None and a.wrk_version:
        row.update(wrk_point(cfg, users, row["duration_s"], corpus, out, proc, counters))
        extra += row["duration_s"] - cfg.duration_s
    return row, extra


class CpuWindow:
    """The CPU the server's processes (Process.cpu_seconds) spend over a window of wall time, from its
    creation (or `start`) to `columns`: cores in use, and CPU milliseconds an answer. Locust's CSV misses
    the run's last second, so over a Locust run the milliseconds an answer read up to ~1/duration high;
    over wrk's run (exact counts, and a client of little CPU beside the server) they are the server's own."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.start()

    def start(self) -> None:
        self.cpu_s, self.wall_s = self.proc.cpu_seconds(), time.monotonic()

    def columns(self, prefix: str, answered: float | None) -> dict[str, float | None]:
        cpu_s, wall_s = self.proc.cpu_seconds() - self.cpu_s, time.monotonic() - self.wall_s
        return {
            f"{prefix}_cores": cpu_s / wall_s if wall_s > 0 else None,
            f"{prefix}_cpu_ms_per_answer": 1000 * cpu_s / answered if answered else None,
        }


def wrk_point(
    cfg: Config,
    users: int,
    seconds: float,
    corpus: str,
    out: Path,
    proc: Process,
    counters: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """wrk's columns for one row, run as long as its Locust run, with the cache's hit share and the server's
    CPU (CpuWindow) over wrk's measured run."""
    name, headers, protocol = f"{cfg.name}_u{users}", wrk_headers(cfg) or {}, bench_groups.wrk_protocol(cfg) or "json"
    before: dict[str, float] = {}
    cpu = CpuWindow(proc)

    def on_start() -> None:  # after wrk's warm-up: the measured run alone
        before.update(counters())
        cpu.start()

    args = list(cfg.locust_args)
    model = args[args.index("--kserve-model") + 1] if "--kserve-model" in args else "sentiment"
    try:
        result = wrk.measure(
            proc.url + wrk.path(protocol, model),
            users,
            seconds,
            read_corpus(str(ROOT / corpus)),
            out / name,
            out / "logs" / name,
            headers,
            protocol,
            unique="--unique-texts" in args,
            on_start=on_start,
        )
    except (subprocess.TimeoutExpired, OSError) as exc:  # wrk's trouble is no reason to lose Locust's row
        print(f"  !! wrk: {exc}", flush=True)
        result = None
    if result is None:
        print(f"  !! wrk gave no result for {name}, see logs/{name}_wrk.log", flush=True)
    if result is None:
        return {**wrk.columns(None), "wrk_cache_hit_share": None}
    cols = wrk.columns(result)
    shares = bench_groups.cache_shares(before, counters())
    server = cpu.columns("wrk_server", cols["wrk_requests"])
    return {**cols, **server, "wrk_cache_hit_share": shares.get("cache_hit_share")}


# ------------------------------------------------------------------------------------ the whole run


class Progress:
    """One line per step: elapsed, and the remaining estimate scaled by how the estimates have held up."""

    def __init__(self, planned_s: float) -> None:
        self.t0, self.planned, self.done_est = time.monotonic(), planned_s, 0.0

    def step(self, estimate_s: float, message: str) -> None:
        self.done_est += estimate_s
        elapsed = time.monotonic() - self.t0
        left = max(0.0, self.planned - self.done_est) * (elapsed / self.done_est if self.done_est else 1.0)
        print(f"[{fmt_s(elapsed):>6} | ~{fmt_s(left)} left] {message}", flush=True)


def fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def start_cost(cfg: Config, gpu: bool) -> float:
    return 4.0 if cfg.group == "reference" else (25.0 if gpu else 14.0)


def point_cost(cfg: Config, p: Profile, users: int) -> float:
    wrk_s = cfg.duration_s + 3.0 if users == p.wrk_users and wrk_headers(cfg) is not None else 0.0
    return p.warmup_s + cfg.duration_s + 4.0 + wrk_s


def bench_config(
    cfg: Config, p: Profile, a: argparse.Namespace, out: Path, progress: Progress, servers: dict[str, Any]
) -> list[dict[str, Any]]:
    """Starts one configuration's server, measures each user count (each of its rows at each), stops it;
    [] if it never got ready."""
    logs = out / "logs"
    proc = launch(cfg, logs / f"{cfg.name}_server.log")
    url = proc.url
    rows: list[dict[str, Any]] = []
    ready: dict[str, Any] | None = None
    try:
        ready = proc.wait_ready(cfg.ready_path, timeout_s=300 if a.gpu else 180)
        servers[cfg.name] = ready
        progress.step(start_cost(cfg, a.gpu), f"{cfg.name}: ready at {url} (model {ready.get('model_source')})")
        for users, row_cfg in points(cfg):
            row, extra_s = bench_point(row_cfg, users, p, a, out, proc, ready)
            rows.append(row)
            progress.planned += extra_s  # a longer row moves the plan, it is not the estimates going wrong
            progress.step(point_cost(row_cfg, p, users) + extra_s, describe(row))
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        servers[cfg.name] = {"error": str(exc).splitlines()[0]}
        print(
            f"  !! {cfg.name} failed: {exc}\n  -- server log tail --\n{tail(logs / f'{cfg.name}_server.log')}",
            flush=True,
        )
        left = sum(point_cost(r, p, u) for u, r in points(cfg)[len(rows) :])
        left += 0.0 if ready is not None else start_cost(cfg, a.gpu)
        progress.step(left, f"{cfg.name}: skipped")
    finally:
        # uvicorn drains on SIGTERM; LitServe shuts down on Ctrl+C, that is SIGINT to its group
        if cfg.group == "peer":
            proc.stop(signal.SIGINT, group=True)
        else:
            proc.stop()
    return rows


def describe(r: dict[str, Any]) -> str:
    if not r.get("requests"):
        return f"{r['configuration']} u={r['users']}: no requests completed ({r.get('failures', 0):.0f} failures)"
    extra = f", batch {r['avg_batch_size']:.1f}" if r.get("avg_batch_size") else ""
    extra += f", padding eff {r['padding_efficiency']:.2f}" if r.get("padding_efficiency") else ""
    extra += f"; wrk {r['wrk_requests_per_s']:.1f} req/s, p99 {r['wrk_p99_ms']:.0f} ms" if r.get("wrk_p99_ms") else ""
    extra += f" -- TOO FEW ANSWERS ({answers(r):.0f} in {r['duration_s']:g} s)" if r.get("too_few_answers") else ""
    return (
        f"{r['configuration']} u={r['users']}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
        f"p99 {r['p99_ms']:.0f} ms, {r['failures']:.0f} failures{extra}"
    )


def model_limit(a: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    """Runs measure_model_limit in a subprocess, so its threads and memory are gone before servers start."""
    path, log = out / "model_limit.json", out / "logs" / "model_limit.log"
    p = PROFILES[a.profile_name]
    cmd = [sys.executable, "-m", "harness.limits", "--out", str(path), "--corpus", a.corpus]
    cmd += ["--sizes", ",".join(map(str, p.limit_batches)), "--budget-s", str(p.limit_s)]
    cmd += ["--gpu"] if a.gpu else []
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not path.exists():
        print(f"  !! model limit failed (exit {rc}):\n{tail(log)}", flush=True)
        return None
    return json.loads(path.read_text())


@contextmanager
def model_override(tiny: bool) -> Iterator[dict[str, str]]:
    """--tiny-model: the tiny model built into a temporary folder and set as MODEL_ID in os.environ for the
    run, so the model limit's subprocess and every server inherit it (and environment.json's env records
    it); yields what environment.json then says of the model instead of the servers' /ready ({} without
    the flag, which changes nothing)."""
    if not tiny:
        yield {}
        return
    from harness.fronts import tiny_model  # torch and transformers: only for this flag

    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        # no fallback: a folder that does not load must fail the run, not measure the stand-in
        model = {"MODEL_ID": tiny_model(Path(tmp) / "tiny"), "MODEL_FALLBACK": "0"}
        with mock.patch.dict(os.environ, model):
            yield {"model_id": TINY_MODEL, "model_source": "tiny"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test, under 2 minutes")
    ap.add_argument("--gpu", action="store_true", help="GPU profile: more users, Locust --processes")
    ap.add_argument("--peers", action="store_true", help="add peer rows (harness/peers/)")
    ap.add_argument(
        "--ops",
        action="store_true",
        help="add batched rows with keys, rate limit and JSON logs on "
        "and off, alternating (BENCH_REDIS_URL=redis://... shares the limit through Redis)",
    )
    ap.add_argument("--out", help="output folder (default results/<date>-<profile>)")
    ap.add_argument("--corpus", default="data/reviews.txt", help="one text a line (default %(default)s)")
    ap.add_argument("--only", help="comma-separated configuration names to run")
    ap.add_argument("--users", help="comma-separated user counts, instead of the profile's")
    ap.add_argument("--duration", type=float, help="seconds per measured run, instead of the profile's")
    ap.add_argument(
        "--min-answers",
        type=int,
        help=f"answers a row must hold, or it runs again for longer (default {MIN_ANSWERS}; --quick: fewer)",
    )
    ap.add_argument("--max-duration-s", type=float, help="longest run of a row (default 120 s; --quick: 10 s)")
    ap.add_argument("--wrk-users", type=int, help="rows at this user count also run wrk (default 32; 0: none)")
    ap.add_argument(
        "--tiny-model",
        action="store_true",
        help="every server (and the model limit) on the tests' tiny DistilBERT instead of MODEL_ID, so a row "
        "measures the transport and the front ends, not the model",
    )
    bench_groups.add_arguments(ap)  # --protocols, --cache and its settings
    a = ap.parse_args(argv)
    if a.min_answers is not None and a.min_answers < 0 or a.max_duration_s is not None and a.max_duration_s <= 0:
        ap.error("--min-answers must be 0 or more and --max-duration-s more than 0")
    a.profile_name = "quick" if a.quick else "gpu" if a.gpu else "cpu"
    a.corpus = corpus_path(ap, "--corpus", a.corpus)
    if a.cache:
        if a.cache_bytes <= 0:
            ap.error("--cache-bytes must be more than 0 (the cache-off rows are CACHE_BYTES=0 already)")
        hint = "; make it with `python -m harness.zipf_corpus --out data/zipf.txt`"
        a.cache_corpus = corpus_path(ap, "--cache-corpus", a.cache_corpus, hint)
        a.cache_unique_corpus = corpus_path(ap, "--cache-unique-corpus", a.cache_unique_corpus)
    return a


def corpus_path(ap: argparse.ArgumentParser, flag: str, value: str, hint: str = "") -> str:
    """A corpus as subprocesses in the repository root name it: from there, or absolutely if outside it."""
    corpus = Path(value).resolve()
    if not corpus.is_file():
        ap.error(f"{flag}: no such file: {value}{hint}")
    return str(corpus.relative_to(ROOT)) if corpus.is_relative_to(ROOT) else str(corpus)


def select(a: argparse.Namespace) -> tuple[Profile, list[Config]]:
    """The profile with the command line's overrides, and the configurations to run."""
    p = PROFILES[a.profile_name]
    if a.users:
        users = tuple(int(u) for u in a.users.split(","))
        p = replace(p, users=users, bus_users=max(users))
    if a.duration:
        p = replace(p, duration_s=a.duration)
    for key in ("min_answers", "max_duration_s", "wrk_users"):
        if getattr(a, key) is not None:
            p = replace(p, **{key: getattr(a, key)})
    cache = (
        bench_groups.CacheRun(a.cache_corpus, a.cache_unique_corpus, a.cache_bytes)
        if getattr(a, "cache", False)
        else None
    )
    protocols = getattr(a, "protocols", False)
    cfgs = configurations(p, a.peers, a.ops, protocols, cache)
    if a.only:  # picks from every configuration, whatever the profile runs by default
        cfgs = pick(configurations(replace(p, configs=None), a.peers, a.ops, protocols, cache), a.only)
    # builds the peers' missing environments; one that fails stays in the run and is reported with its error
    for name, why in prepare_peers(c.name for c in cfgs if c.group == "peer").items():
        print(f"!! --peers: {name}: {why}", flush=True)
    return p, cfgs


def pick(cfgs: list[Config], only_csv: str) -> list[Config]:
    """The configurations --only names, in run order: by configuration, row or group name (naive, bus...)."""
    only = set(only_csv.split(","))
    if "cache" in only:  # the cache's goal is capped by the HTTP ceiling: measure it in the same run
        only.add("http-ceiling")
    rows = {r.name for c in cfgs for r in c.rows}
    unknown = only - {c.name for c in cfgs} - {c.group for c in cfgs} - rows
    if unknown:
        sys.exit(
            f"bench: unknown configuration {', '.join(sorted(unknown))}; known: "
            f"{', '.join([c.name for c in cfgs] + sorted(rows))} and the groups "
            f"{', '.join(sorted({c.group for c in cfgs}))}"
        )
    picked = {c.name: c for c in cfgs if c.name in only or c.group in only}
    for c in cfgs:  # a row named alone (--only proto-grpc) runs on its configuration's server, siblings not
        if c.name not in picked and any(r.name in only for r in c.rows):
            picked[c.name] = replace(c, rows=tuple(r for r in c.rows if r.name in only))
    return [picked[c.name] for c in cfgs if c.name in picked]


def run_settings(a: argparse.Namespace, p: Profile, cfgs: list[Config], load_at_start: float) -> dict[str, Any]:
    """What environment.json records of the run itself, beside the machine and the model."""
    return {
        "profile": a.profile_name,
        "corpus": a.corpus,
        "profile_settings": asdict(p),
        "load_average_at_start": load_at_start,
        "peers": describe_peers(c.name for c in cfgs if c.group == "peer"),
        "answers": {  # report.py's header says who lowered the bar, if anyone did
            "min_answers": p.min_answers,
            "max_duration_s": p.max_duration_s,
            "standard": MIN_ANSWERS,
            "set_by": "--min-answers" if a.min_answers is not None else f"the {a.profile_name} profile",
        },
        "wrk": {"users": p.wrk_users, "version": a.wrk_version},
        "configurations": bench_groups.describe(cfgs, a.corpus),  # each row's server settings, load and corpus
        "corpora": bench_groups.corpora(cfgs, a.corpus),  # lines, distinct lines, duplicate share
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    p, cfgs = select(a)
    with model_override(a.tiny_model) as model:
        return run_all(a, p, cfgs, model)


def run_all(a: argparse.Namespace, p: Profile, cfgs: list[Config], model: dict[str, str]) -> int:
    """The whole run: the model limit, every configuration, the report; `model` overrides what
    environment.json says of the model (model_override)."""
    out = Path(a.out or f"results/{datetime.now():%Y%m%d-%H%M%S}-{a.profile_name}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    limit_cost = 12.0 + 2 * len(p.limit_batches) * p.limit_s
    a.wrk_version = wrk.version()
    progress = Progress(
        limit_cost + sum(start_cost(c, a.gpu) + sum(point_cost(r, p, u) for u, r in points(c)) for c in cfgs)
    )
    print(
        f"bench: {len(cfgs)} configurations, corpus {a.corpus}, out {out}, about {fmt_s(progress.planned)} planned"
        + (f"; MODEL_ID={os.environ['MODEL_ID']} (--tiny-model)" if model else ""),
        flush=True,
    )
    load_at_start = os.getloadavg()[0]  # before any of our own work: what else is using the machine
    limit = model_limit(a, out)
    progress.step(
        limit_cost,
        "model limit: "
        + (
            f"{limit['bucketed']['samples_per_s']:.1f} samples/s length-bucketed "
            f"(batch {limit['bucketed']['batch_size']}), {limit['random']['samples_per_s']:.1f} random-padded "
            f"(batch {limit['random']['batch_size']})"
            if limit
            else "failed, see logs/model_limit.log"
        ),
    )
    rows: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    settings = run_settings(a, p, cfgs, load_at_start)
    for cfg in [None, *cfgs]:  # files are rewritten after each configuration: a stopped run keeps its rows
        rows += bench_config(cfg, p, a, out, progress, servers) if cfg else []
        write_summary(out / "summary.csv", add_ratios(rows, limit["bucketed"]["samples_per_s"] if limit else None))
        env = {**environment(settings, limit, servers), **model}
        env["versions"]["wrk"] = a.wrk_version  # a binary, not a Python package: environment() can not see it
        (out / "environment.json").write_text(json.dumps(env, indent=2))
    from harness import report  # matplotlib only now, after every measurement

    report.main([str(out)])
    print(f"bench: done in {fmt_s(time.monotonic() - progress.t0)}; see {out}/summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
