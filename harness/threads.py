"""How many intra-op threads each engine should have, measured served under load (wrk) on this machine.

    MODEL_ID=stand-in python -m harness.threads --corpus data/short.txt --out results/cpu-2core-threads
    python -m harness.threads --engines torch-bf16 --threads 1,2 --seconds 10

For each engine (BACKEND-DTYPE) and each ENGINE_THREADS, starts `uvicorn batched_server:app` with that
setting, warms it up with wrk, then measures it with wrk (32 connections by default, a C client whose
own CPU is small beside the server's) and reads, with psutil, how many cores the server's processes
used (front end and engine apart), and what the IPC hop to the engine added per request (the front
end's sentimentalyzer_engine_hop_seconds: time waiting on the engine less the time the engine held
the request). serving/cores.py's TWO_CORE_THREADS is what this says for a 2-core machine;
threads.json and threads.md record device, CPU flags, versions and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness import wrk
from harness.launch import Process, environ
from harness.limits import engine_name, machine_engines
from harness.references import command_line, cpu_info, git_state, read_corpus, versions


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure_one(backend: str, dtype: str, threads: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    row = served(
        f"{engine_name(backend, dtype)}-t{threads}",
        {"BACKEND": backend, "DTYPE": dtype, "ENGINE_THREADS": str(threads)},
        args,
        work,
    )
    return {"engine": engine_name(backend, dtype), "threads": threads, **row}


def served(
    name: str, settings: dict[str, str], args: argparse.Namespace, work: Path, workers: int = 1
) -> dict[str, Any]:
    """One batched server with these settings under wrk: answers, latency, cores used, batch and hop means."""
    env = environ({**settings, "ENGINE_SOCKET": str(work / f"{name}.sock")}, drop=("OMP_NUM_THREADS",))
    env.setdefault("MODEL_ID", "stand-in")
    if workers > 1:  # front-end counters summed over workers (prometheus-client's multiprocess mode)
        (work / f"{name}-prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(work / f"{name}-prom")
    else:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = Process.uvicorn("batched_server:app", work / f"{name}.log", env, workers=workers)
    try:
        ready = server.wait_ready(timeout_s=600)
        engine = psutil.Process(int(ready["engine_pid"]))
        url = f"{server.url}/predict"
        script = work / f"{name}.lua"
        script.write_text(wrk.lua_script(read_corpus(args.corpus)), encoding="utf-8")
        wrk.run(url, args.users, args.warmup_s, script, work / f"{name}-warmup.log")
        first = httpx.get(f"{server.url}/metrics", timeout=10).text
        tree0, engine0 = server.cpu_seconds(), cpu_seconds(engine)
        t0 = time.monotonic()
        result = wrk.run(url, args.users, args.seconds, script, work / f"{name}-wrk.log")
        wall = time.monotonic() - t0
        server_cores = (server.cpu_seconds() - tree0) / wall
        engine_cores = (cpu_seconds(engine) - engine0) / wall
        last = httpx.get(f"{server.url}/metrics", timeout=10).text
    except (RuntimeError, psutil.Error) as exc:
        return {"error": f"{exc}\n{server.tail()}"}
    finally:
        server.stop()
    return {
        "workers": workers,
        "engine_cores": ready.get("engine_cores"),
        **wrk.columns(result),
        "cores_front": round(server_cores - engine_cores, 3),
        "cores_engine": round(engine_cores, 3),
        "cores_server": round(server_cores, 3),
        "mean_batch": _mean(first, last, "sentimentalyzer_batch_size", 1),
        "hop_ms": _mean(first, last, "sentimentalyzer_engine_hop_seconds", 1000),
    }


def _mean(first: str, last: str, histogram: str, scale: float) -> float | None:
    """A histogram's mean over the measured run: (sum, count) after less before."""

    def read(text: str) -> tuple[float, float]:
        values = dict.fromkeys(("_sum", "_count"), 0.0)
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in (histogram + "_sum", histogram + "_count"):
                values[name.removeprefix(histogram)] = float(value)
        return values["_sum"], values["_count"]

    (s0, c0), (s1, c1) = read(first), read(last)
    return round((s1 - s0) / (c1 - c0) * scale, 3) if c1 > c0 else None


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["cpu"]
    lines = [
        "# Engine threads, served (wrk)",
        "",
        f"`{meta['command']}`: {meta['users']} connections, {meta['seconds']} s each after {meta['warmup_s']} s "
        f"of warm-up, corpus {meta['corpus']}, model {meta['model_id']}, commit {meta['git_commit']}"
        f"{' (dirty)' if meta['git_dirty'] else ''}.",
        f"CPU: {cpu['model_name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}.",
        "",
        "| engine | threads | req/s | p50 ms | p99 ms | errors | mean batch | hop ms | cores: front | engine "
        "| server |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['threads']} | failed: {r['error'].splitlines()[0]} |")
            continue
        lines.append(
            f"| {r['engine']} | {r['threads']} | {_f(r['wrk_requests_per_s'], 1)} | {_f(r['wrk_p50_ms'], 1)} "
            f"| {_f(r['wrk_p99_ms'], 1)} | {_f(r['wrk_errors'], 0)} | {_f(r['mean_batch'], 1)} | {_f(r['hop_ms'], 3)} "
            f"| {r['cores_front']:.2f} | {r['cores_engine']:.2f} | {r['cores_server']:.2f} |"
        )
    best = {}
    for r in rows:
        if r.get("wrk_requests_per_s") and r["wrk_requests_per_s"] > best.get(r["engine"], (0.0, 0))[0]:
            best[r["engine"]] = (r["wrk_requests_per_s"], r["threads"])
    lines += ["", "Fastest: " + ", ".join(f"{e} {t} thread(s)" for e, (_, t) in best.items()) + "."]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/short.txt")
    parser.add_argument("--engines", default="", help="e.g. torch-fp32,torch-bf16,onnx-int8 (default: all here)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--out", default="results/cpu-2core-threads")
    args = parser.parse_args()
    engines = [e for e in machine_engines() if not args.engines or engine_name(*e) in args.engines.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp:
        for backend, dtype in engines:
            for threads in (int(t) for t in args.threads.split(",")):
                rows.append(measure_one(backend, dtype, threads, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": command_line(),
        "corpus": args.corpus,
        "users": args.users,
        "seconds": args.seconds,
        "warmup_s": args.warmup_s,
        "model_id": os.environ.get("MODEL_ID", "stand-in"),
        "cpu": cpu_info(),
        "versions": {**versions("torch", "onnxruntime", "uvicorn", "pyzmq", "msgspec"), "wrk": wrk.version()},
        **git_state(),
    }
    (out / "threads.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "threads.md").write_text(report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
