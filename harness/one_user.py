"""One user, naive against batched, interleaved: what batching costs when nobody shares a pass.

    MODEL_ID=stand-in python -m harness.one_user --out results/cpu-2core-one-user    # every engine here
    MODEL_ID=stand-in python -m harness.one_user --engines onnx-int8 --rounds 3 --out /tmp/u1

For each engine (BACKEND-DTYPE, default: every one harness.limits finds on this machine) both servers
run side by side (`uvicorn naive_server:app` with NAIVE_MODE=threadpool and `uvicorn
batched_server:app`, 127.0.0.1, same environment otherwise). One client, one keep-alive connection
to each, sends each text to one server and then the same text to the other, --requests texts a
round, for --rounds rounds, which server goes first swapped every round, after --warmup requests
each: both see the same texts (the corpus in a fixed order) milliseconds apart, so a drift of the
machine (a neighbour, a clock change) falls on both alike. Per round and server: requests/s (one
client: 1 / its mean latency) and the median latency. The verdicts take the median over rounds of the
batched/naive ratio of requests/s and of the difference of medians, against the goals (>= 0.98x,
median at most 1 ms higher). A Locust run at one user (harness.bench) is one draw per server, minutes
apart; this is the paired measurement. Writes summary.md and summary.json (figures and environment).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from harness.launch import Process, environ
from harness.limits import engine_name, machine_engines
from harness.references import command_line, cpu_info, git_state, read_corpus, versions

SERVERS = {"naive": "naive_server:app", "batched": "batched_server:app"}
RPS_GOAL, MEDIAN_GOAL_MS = 0.98, 1.0


def run_round(
    clients: dict[str, httpx.Client], order: list[str], texts: list[str], start: int, n: int
) -> dict[str, dict[str, float]]:
    """n texts from `start` on, each sent to every server in `order`, one after the other: per server,
    requests/s of one sequential client (1 / mean latency) and the median latency (ms)."""
    latencies: dict[str, list[float]] = {k: [] for k in order}
    for i in range(n):
        text = texts[(start + i) % len(texts)]
        for k in order:
            sent = time.perf_counter()
            clients[k].post("/predict", json={"text": text}).raise_for_status()
            latencies[k].append((time.perf_counter() - sent) * 1000)
    return {k: {"rps": 1000 * n / sum(v), "p50_ms": statistics.median(v)} for k, v in latencies.items()}


def compare(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per-round ratios and differences, their medians, and the verdicts against the goals."""
    ratios = [r["batched"]["rps"] / r["naive"]["rps"] for r in rounds]
    extra = [r["batched"]["p50_ms"] - r["naive"]["p50_ms"] for r in rounds]
    rps_ratio, extra_ms = statistics.median(ratios), statistics.median(extra)
    return {
        "rps_ratio_per_round": [round(x, 3) for x in ratios],
        "p50_extra_ms_per_round": [round(x, 2) for x in extra],
        "rps_ratio": round(rps_ratio, 3),
        "p50_extra_ms": round(extra_ms, 2),
        "verdicts": {
            f"requests/s >= {RPS_GOAL}x naive (median over rounds)": rps_ratio >= RPS_GOAL,
            f"median at most {MEDIAN_GOAL_MS:g} ms higher (median over rounds)": extra_ms <= MEDIAN_GOAL_MS,
        },
    }


def one_engine(name: str, env: dict[str, str], texts: list[str], a: argparse.Namespace, out: Path) -> dict[str, Any]:
    procs = {
        k: Process.uvicorn(mod, out / f"{name}-{k}.log", environ(env, drop=("API_KEYS", "RATE_LIMIT", "REDIS_URL")))
        for k, mod in SERVERS.items()
    }
    try:
        ready = {k: p.wait_ready(timeout_s=300) for k, p in procs.items()}
        clients = {k: httpx.Client(base_url=p.url, timeout=60) for k, p in procs.items()}
        run_round(clients, list(SERVERS), texts, 0, a.warmup)
        rounds = []
        for r in range(a.rounds):
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            rounds.append(run_round(clients, order, texts, r * a.requests, a.requests))
            print(f"{name} round {r + 1}: " + ", ".join(f"{k} {v['rps']:.1f}/s" for k, v in rounds[-1].items()))
        for c in clients.values():
            c.close()
    finally:
        for p in procs.values():
            p.stop()
    rounded = [{k: {m: round(x, 2) for m, x in v.items()} for k, v in r.items()} for r in rounds]
    return {"engine": name, "settings": env, "ready": ready, "rounds": rounded, **compare(rounds)}


def markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    cpu = env["cpu"]
    lines = [
        f"# One user, naive vs batched, {summary['when']}",
        "",
        f"`{summary['command']}` at git {(env['git']['git_commit'] or '?')[:10]}"
        f"{' (changed)' if env['git']['git_dirty'] else ''}; {cpu['model_name']} ({cpu['cores']} cores, "
        f"{' '.join(cpu['flags'])}); "
        f"Python {env['python']}, {', '.join(f'{k} {v}' for k, v in env['versions'].items())}.",
        "",
        f"{summary['args']['rounds']} rounds of {summary['args']['requests']} texts, each sent to both servers "
        f"in turn (which goes first swapped each round; {summary['args']['warmup']} warm-up texts), corpus "
        f"{summary['args']['corpus']}. Server columns: the median round; the last two: the median of the "
        "rounds' ratios and differences (what the verdicts take).",
        "",
        "| engine | model | naive req/s | batched req/s | naive p50 ms | batched p50 ms | batched / naive "
        "| batched p50 - naive |",
        "|---" * 8 + "|",
    ]
    for e in summary["engines"]:
        med = {k: {m: statistics.median(r[k][m] for r in e["rounds"]) for m in ("rps", "p50_ms")} for k in SERVERS}
        ready = e["ready"]["batched"]
        lines.append(
            f"| {e['engine']} | {ready.get('model_source')} ({ready.get('device')}, {ready.get('dtype')}) "
            f"| {med['naive']['rps']:.1f} | {med['batched']['rps']:.1f} | {med['naive']['p50_ms']:.2f} "
            f"| {med['batched']['p50_ms']:.2f} | {e['rps_ratio']:.3f} | {e['p50_extra_ms']:+.2f} ms |"
        )
    for e in summary["engines"]:
        lines += [
            "",
            f"## {e['engine']}",
            "",
            f"batched/naive requests/s per round {e['rps_ratio_per_round']}; batched - naive median per round "
            f"(ms) {e['p50_extra_ms_per_round']}; batching settings {e['ready']['batched'].get('batching')}.",
            "",
            *(f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in e["verdicts"].items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", help="comma-separated BACKEND-DTYPE, e.g. torch-fp32,onnx-int8 (default: all here)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=400, help="per server per round")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--corpus", default="data/reviews.txt")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_corpus(a.corpus)
    engines = [engine_name(b, d) for b, d in machine_engines()]
    chosen = a.engines.split(",") if a.engines else engines
    unknown = set(chosen) - set(engines)
    if unknown:
        raise SystemExit(f"not an engine of this machine: {sorted(unknown)}; these are: {engines}")
    results = []
    for name in chosen:
        backend, dtype = name.split("-", 1)
        env = {"BACKEND": backend, "DTYPE": dtype, "NAIVE_MODE": "threadpool"}
        results.append(one_engine(name, env, texts, a, out))
    summary = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "args": vars(a),
        "environment": {
            "cpu": cpu_info(),
            "git": git_state(),
            "python": platform.python_version(),
            "versions": versions("torch", "transformers", "onnxruntime", "fastapi", "uvicorn", "httpx"),
        },
        "engines": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(f"one_user: wrote {out / 'summary.md'}")
    return 0 if all(all(e["verdicts"].values()) for e in results) else 1


if __name__ == "__main__":
    sys.exit(main())
