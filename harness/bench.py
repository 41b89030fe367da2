"""One command runs the whole comparison: every server configuration under Locust, two ceilings, a report.

    python -m harness.bench                          # CPU sweep, about 10 min on 2 cores -> results/<date>-cpu/
    python -m harness.bench --quick                  # smoke test, under 2 min (CI)
    python -m harness.bench --gpu --out results/h100 # user counts that saturate a GPU, Locust --processes 4
    python -m harness.bench --peers                  # + LitServe, Triton, Ray Serve and BentoML rows (harness/peers/;
                                                   # builds their environments in .peers/ first where missing)
    python -m harness.bench --peers --only peer,batched --corpus data/long.txt --out results/cpu-long
    python -m harness.bench --corpus data/short.txt --out results/cpu-short
    python -m harness.bench --only batched,naive-threadpool --users 8,32 --duration 15
    python -m harness.bench --ops --only ops --out results/cpu-2core-ops   # keys, rate limit, JSON logs: on vs off
    MODEL_ID=stand-in DTYPE=int8 python -m harness.bench   # server settings come from the environment
                                                   # (API_KEYS, RATE_LIMIT and REDIS_URL are left out)

For each configuration it starts `uvicorn <module>:app` on a free port with that configuration's
environment, waits for GET /ready, and for each user count warms up (unrecorded Locust load), runs
`locust --headless --csv` and reads the batch-size and padding counters from /metrics before and after.
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
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.launch import ROOT, Process, environ
from harness.limits import default_engine, engine_name, machine_engines
from harness.peers import describe as describe_peers
from harness.peers import launch as launch_peer
from harness.peers import peer_configs
from harness.peers import prepare as prepare_peers
from harness.references import create_ceiling_app, environment

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
    "avg_batch_size",
    "padding_efficiency",
    "rps_over_model_limit",
    "rps_over_http_ceiling",
    "max_batch_size",
    "batch_policy",
    "model_source",
    "locust_cpu_warning",
]


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
    scale_workers: tuple[int, ...] = ()  # uvicorn --workers N rows (one model replica per process)
    open_loop_rps: float = 0.0  # > 0: a batched row at this offered rate (open loop), to read its p99
    engine_users: tuple[int, ...] = (32,)  # user counts of the other engines' rows
    configs: tuple[str, ...] | None = None  # None = every configuration


PROFILES = {
    "cpu": Profile((1, 8, 32), 15, 3, (1, 16), 32, (2,), 10, 0, (8, 16, 32, 64), 4.0, engine_users=(1, 32)),
    "quick": Profile(
        (8,), 5, 2, (), 8, (2,), 5, 0, (16,), 2.0, configs=("http-ceiling", "naive-threadpool", "batched")
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
    workers: int = 1  # uvicorn --workers: one model replica each (metrics through PROMETHEUS_MULTIPROC_DIR)


def configurations(p: Profile, peers: bool, ops: bool = False) -> list[Config]:
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
    if peers:  # the registry in harness/peers/__init__.py: module, readiness, Locust protocol per peer
        cfgs += peer_configs(top, p.duration_s)  # the peers table compares them at the top user count
    return [c for c in cfgs if p.configs is None or c.name in p.configs or c.group == "ops"]


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
    """requests/s over the model limit and over the best HTTP-ceiling figure of the run."""
    ceiling = max((r.get("requests_per_s") or 0.0 for r in rows if r["configuration"] == "http-ceiling"), default=0.0)
    for r in rows:
        rps = r.get("requests_per_s") if r["group"] != "reference" else None  # a ceiling over itself says nothing
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
    # the comparison is of serving paths: keys and rate limits would only turn load into 401s and 429s
    env = environ(cfg.env, drop=("API_KEYS", "RATE_LIMIT", "REDIS_URL"))
    if cfg.group == "peer":  # in its own virtual environment (.peers/<name>/), stopped its own way
        return launch_peer(cfg.name, log_path, env)
    if cfg.workers > 1:  # every worker's counters in one scrape; the directory must start empty
        prom = log_path.parent / f"prometheus-{cfg.name}"
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    return Process.uvicorn(cfg.target, log_path, env, workers=cfg.workers)


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


def point_cost(cfg: Config, p: Profile) -> float:
    return p.warmup_s + cfg.duration_s + 4.0


def bench_config(
    cfg: Config, p: Profile, a: argparse.Namespace, out: Path, progress: Progress, servers: dict[str, Any]
) -> list[dict[str, Any]]:
    """Starts one configuration's server, measures each user count, stops it; [] if it never got ready."""
    logs = out / "logs"
    proc = launch(cfg, logs / f"{cfg.name}_server.log")
    url = proc.url
    rows: list[dict[str, Any]] = []
    ready: dict[str, Any] | None = None
    try:
        ready = proc.wait_ready(cfg.ready_path, timeout_s=300 if a.gpu else 180)
        servers[cfg.name] = ready
        progress.step(start_cost(cfg, a.gpu), f"{cfg.name}: ready at {url} (model {ready.get('model_source')})")
        for users in cfg.users:
            name = f"{cfg.name}_u{users}"
            run_locust(
                url, users, p.warmup_s, a.corpus, p.processes, logs / f"{name}_warmup.log", None, cfg.locust_args
            )
            before = proc.counters() if cfg.group == "peer" else scrape(url)  # a peer's from its log
            warn = run_locust(
                url,
                users,
                cfg.duration_s,
                a.corpus,
                p.processes,
                logs / f"{name}_locust.log",
                out / name,
                cfg.locust_args,
            )
            row = summary_row(
                cfg,
                users,
                read_locust_stats(out / name),
                metrics_delta(before, proc.counters() if cfg.group == "peer" else scrape(url)),
                ready,
                warn,
            )
            rows.append(row)
            progress.step(point_cost(cfg, p), describe(row))
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        servers[cfg.name] = {"error": str(exc).splitlines()[0]}
        print(
            f"  !! {cfg.name} failed: {exc}\n  -- server log tail --\n{tail(logs / f'{cfg.name}_server.log')}",
            flush=True,
        )
        left = (len(cfg.users) - len(rows)) * point_cost(cfg, p)
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
    a = ap.parse_args(argv)
    a.profile_name = "quick" if a.quick else "gpu" if a.gpu else "cpu"
    corpus = Path(a.corpus).resolve()
    if not corpus.is_file():
        ap.error(f"--corpus: no such file: {a.corpus}")
    # subprocesses run in the repository root: name the corpus from there, or absolutely if outside it
    a.corpus = str(corpus.relative_to(ROOT)) if corpus.is_relative_to(ROOT) else str(corpus)
    return a


def select(a: argparse.Namespace) -> tuple[Profile, list[Config]]:
    """The profile with the command line's overrides, and the configurations to run."""
    p = PROFILES[a.profile_name]
    if a.users:
        users = tuple(int(u) for u in a.users.split(","))
        p = replace(p, users=users, bus_users=max(users))
    if a.duration:
        p = replace(p, duration_s=a.duration)
    cfgs = configurations(p, a.peers, a.ops)
    if a.only:  # picks from every configuration, whatever the profile runs by default
        cfgs = configurations(replace(p, configs=None), a.peers, a.ops)
        only = set(a.only.split(","))  # configuration names or group names (naive, bus, policy, ops...)
        unknown = only - {c.name for c in cfgs} - {c.group for c in cfgs}
        if unknown:
            sys.exit(
                f"bench: unknown configuration {', '.join(sorted(unknown))}; known: "
                f"{', '.join(c.name for c in cfgs)} and the groups {', '.join(sorted({c.group for c in cfgs}))}"
            )
        cfgs = [c for c in cfgs if c.name in only or c.group in only]
    # builds the peers' missing environments; one that fails stays in the run and is reported with its error
    for name, why in prepare_peers(c.name for c in cfgs if c.group == "peer").items():
        print(f"!! --peers: {name}: {why}", flush=True)
    return p, cfgs


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    p, cfgs = select(a)
    out = Path(a.out or f"results/{datetime.now():%Y%m%d-%H%M%S}-{a.profile_name}")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    limit_cost = 12.0 + 2 * len(p.limit_batches) * p.limit_s
    progress = Progress(limit_cost + sum(start_cost(c, a.gpu) + len(c.users) * point_cost(c, p) for c in cfgs))
    print(
        f"bench: {len(cfgs)} configurations, corpus {a.corpus}, out {out}, about {fmt_s(progress.planned)} planned",
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
    run = {
        "profile": a.profile_name,
        "corpus": a.corpus,
        "profile_settings": asdict(p),
        "load_average_at_start": load_at_start,
        "peers": describe_peers(c.name for c in cfgs if c.group == "peer"),
    }
    for cfg in [None, *cfgs]:  # files are rewritten after each configuration: a stopped run keeps its rows
        rows += bench_config(cfg, p, a, out, progress, servers) if cfg else []
        write_summary(out / "summary.csv", add_ratios(rows, limit["bucketed"]["samples_per_s"] if limit else None))
        (out / "environment.json").write_text(json.dumps(environment(run, limit, servers), indent=2))
    from harness import report  # matplotlib only now, after every measurement

    report.main([str(out)])
    print(f"bench: done in {fmt_s(time.monotonic() - progress.t0)}; see {out}/summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
