"""Where the time goes: py-spy on the batched server under Locust, the torch profiler on its batch function.

    python -m harness.profiling --out results/cpu-2core/profile                    # 32 users, mixed corpus, ~2 min
    python -m harness.profiling --corpus data/short.txt --out results/cpu-2core-short/profile
    MODEL_ID=stand-in MAX_WAIT_MS=10 python -m harness.profiling --seconds 60 --out /tmp/p   # settings from the env

Runs `py-spy record -- python -m uvicorn batched_server:app` (py-spy samples every Python thread of
the server: the event loop and the worker thread that owns the model), waits for /ready, drives it
with Locust (warm-up, then the measured run) and reads /metrics before and after. Then, with the
server gone, it profiles one taken batch in-process with torch.profiler. Writes to --out:

- profile.md: the per-request breakdown. Wall time: client latency, server latency, queue wait,
  compute of the batch it rode in. Thread time from py-spy's samples, by stage: HTTP parse and
  validation, response, logging and metrics, batcher and event loop, tokenization, forward.
- pyspy.txt: the collapsed stacks (flamegraph.pl and speedscope read them); torch_ops.txt: top ops.
Needs py-spy (requirements-test.txt); the process it launches is its own child, so no ptrace rights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from harness.bench import read_locust_stats, run_locust, scrape
from harness.launch import Process, free_port
from harness.references import RECORDED_ENV, command_line

STARTUP = ("<frozen importlib", "load_engine", "warmup (model.py", "resolve_source", "lifespan (batched_server")
# (stage, substrings of a frame): a sample belongs to the stage of its innermost frame that matches one,
# so the middleware every request passes through counts only for its own code
STAGES = (
    ("forward", ("torch/", "transformers/models/", "forward (model.py")),
    ("tokenization", ("tokeniz",)),
    ("grouping and result objects", ("model.py", "batched_server.py")),
    ("batcher and its worker thread", ("batcher.py", "concurrent/futures", "threading.py")),
    ("logging and metrics", ("ops.py", "prometheus_client", "logging/")),
    ("response: serialization and send", ("serialize_response", "jsonable_encoder", "responses.py", "json/")),
    (
        "HTTP parse, routing and validation",
        ("h11", "httptools", "uvicorn/", "fastapi/", "pydantic", "starlette/", "anyio/", "api.py", "guard.py"),
    ),
    ("event loop (uvloop: sockets, scheduling)", ("asyncio/", "uvloop")),
)


def stage_of(stack: str) -> str:
    if any(k in stack for k in STARTUP):
        return "startup and shutdown"
    for frame in reversed(stack.split(";")):
        for name, keys in STAGES:
            if any(k in frame for k in keys):
                return name
    return "other"


def read_pyspy(path: Path) -> Counter[str]:
    """Samples by stage from py-spy's raw (collapsed) output: `frame;frame;... count` per line."""
    by_stage: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            by_stage[stage_of(stack)] += int(count)
    return by_stage


def child_pid(pid: int, timeout_s: float = 30.0) -> int:
    """The server py-spy started (its first child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children()
        if kids:
            return kids[0].pid
        time.sleep(0.1)
    raise RuntimeError("py-spy did not start the server")


def profile_server(a: argparse.Namespace, out: Path) -> dict:
    port, rate = free_port(), 100
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "-o",
        str(out / "pyspy.txt"),
        "--",
        sys.executable,
        "-m",
        "uvicorn",
        "batched_server:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    spy = Process.start("py-spy", cmd, out / "server.log", url=url)
    server = child_pid(spy.popen.pid)
    try:
        spy.wait_ready(timeout_s=300)  # py-spy exits with the server it runs
        first = scrape(url)
        run_locust(url, a.users, a.warmup, a.corpus, 0, out / "locust_warmup.log", None)
        before, t0 = scrape(url), time.monotonic()
        run_locust(url, a.users, a.seconds, a.corpus, 0, out / "locust.log", out / "locust")
        after, wall = scrape(url), time.monotonic() - t0
    finally:
        os.kill(server, signal.SIGTERM)
        spy.popen.wait(timeout=60)
    return {
        "first": first,
        "before": before,
        "after": after,
        "wall_s": wall,
        "rate_hz": rate,
        "client": read_locust_stats(out / "locust"),
    }


def profile_batch(corpus: str, n: int, out: Path) -> dict:
    """torch.profiler over predict() on n random corpus texts: what one taken batch spends, op by op."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from harness.references import read_corpus
    from serving.model import load_engine
    from serving.settings import Settings

    engine = load_engine(Settings.from_env())
    engine.warmup()
    texts = random.Random(0).sample(read_corpus(corpus), n)
    engine.predict(texts)
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    ) as prof:
        passes: list = []
        engine.predict(texts, on_pass=passes.append)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (out / "torch_ops.txt").write_text(table)
    return {
        "texts": n,
        "passes": [p.items for p in passes],
        "torch_threads": torch.get_num_threads(),
        "table_head": table,
    }


def mean(m: dict, name: str) -> float | None:
    count = m.get(f"{name}_count", 0.0)
    return m.get(f"{name}_sum", 0.0) / count if count else None


def write_report(a: argparse.Namespace, out: Path, srv: dict, batch: dict) -> None:
    def delta(x: dict, y: dict) -> dict:
        return {k: y[k] - x.get(k, 0.0) for k in y}

    run, whole = delta(srv["before"], srv["after"]), delta(srv["first"], srv["after"])
    reqs_run = run.get("sentimentalyzer_requests_total", 0.0)
    reqs_whole = whole.get("sentimentalyzer_requests_total", 0.0)
    samples = read_pyspy(out / "pyspy.txt")
    serving = {k: v for k, v in samples.items() if k != "startup and shutdown"}
    total = sum(serving.values())
    c = srv["client"]
    items = run.get("sentimentalyzer_batch_size_sum", 0.0)
    env = {k: v for k, v in os.environ.items() if k in RECORDED_ENV}

    def ms(name: str) -> str:
        return f"{1000 * (mean(run, name) or 0):.1f}"

    lines = [
        f"# Where the time goes: batched server, {a.users} users, {a.corpus}",
        "",
        f"- command: `{command_line()}`; settings from the environment: {json.dumps(env)}",
        f"- measured run: {a.seconds:g} s, {reqs_run:.0f} requests, {reqs_run / srv['wall_s']:.1f} req/s; "
        f"{items / max(run.get('sentimentalyzer_batch_size_count', 1), 1):.1f} items per forward pass",
        "",
        "## Wall time of one request (means over the measured run)",
        "",
        "| stage | ms |",
        "|---|---:|",
        f"| client latency (Locust, median) | {c.get('p50_ms', float('nan')):.1f} |",
        f"| server latency (middleware in to out) | {ms('sentimentalyzer_request_latency_seconds')} |",
        f"| queue wait (enqueue to the start of its batch) | {ms('sentimentalyzer_queue_wait_seconds')} |",
        f"| compute of a taken batch (tokenize + every pass) | {ms('sentimentalyzer_compute_seconds')} |",
        "",
        "The rest of the server latency is the event loop: parsing, validation, response, and waiting "
        "its turn behind other requests' work.",
        "",
        "## Thread time by stage (py-spy, every Python thread, warm-up and measured run)",
        "",
        f"{total} samples at {srv['rate_hz']} Hz over {reqs_whole:.0f} requests; idle threads are not sampled.",
        "",
        "| stage | share of samples | ms per request |",
        "|---|---:|---:|",
    ]
    for stage, n in sorted(serving.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {n / total:.1%} | {1000 * n / srv['rate_hz'] / max(reqs_whole, 1):.2f} |")
    lines += [
        "",
        f"## One taken batch under torch.profiler ({batch['texts']} random corpus texts, passes of "
        f"{batch['passes']} items, {batch['torch_threads']} torch threads)",
        "",
        "```",
        batch["table_head"],
        "```",
    ]
    (out / "profile.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default="data/reviews.txt")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    srv = profile_server(a, out)
    batch = profile_batch(a.corpus, a.users, out)
    write_report(a, out, srv, batch)
    print((out / "profile.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
