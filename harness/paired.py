"""Two configurations of the batched server, paired: side by side on one machine, alternating rounds.

    MODEL_ID=stand-in python -m harness.paired --out results/cpu-avx2-cache-cost     # the cache's cost
    MODEL_ID=stand-in python -m harness.paired --off BACKEND=torch --on BACKEND=torch,TORCH_COMPILE=1 \
        --corpus data/reviews.txt --out results/cpu-avx2-compile-served
    python -m harness.paired --tiny-model --pairs 4 --rounds 2 --out results/cpu-avx512-cache-cost-tiny
    python -m harness.paired --tiny-model --pairs 4 --rounds 2 --on CACHE_BYTES=0 --out results/cpu-avx512-aa-tiny
    python -m harness.paired --rounds 2 --seconds 10

Two servers run for the whole run, "off" and "on", each with its settings (--off, --on: NAME=value
pairs; by default CACHE_BYTES=0 against CACHE_BYTES=64000000, what the answer cache costs when
nothing repeats); only the one being measured gets traffic, the other idles (its heartbeats cost well
under 1% of a core). Each round drives both with wrk (32 connections, every request's text numbered
so nothing repeats: harness/wrk.py's unique scripts), in the order off-on, then on-off the next
round, so a drift of the machine falls on both. The verdict is the median of the rounds' on/off
ratios, beside every round's figures, the answer cache's counters and each server's /ready (engine,
batching, cores). Separate fresh servers per row (`harness.bench --cache`) mix a difference with a
server's start-to-start variation; this pairs them. --tiny-model runs both on the tests' tiny
DistilBERT (harness.bench's model_override), where the model costs next to nothing and any cost of
the setting on the request path shows in full.

Two servers of the very same settings can differ by 15% at such rates (an A/A run, `--on` equal to
`--off`, shows it: where a process's threads land, its memory layout), which rounds cannot pair away.
--pairs N starts N fresh pairs one after the other, the first started of each pair alternating, and
the verdict is the median over every pair's rounds; run the A/A beside it for the noise floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness import bench, wrk
from harness.launch import Process, environ
from harness.references import command_line, cpu_info, git_state, read_corpus, versions

COUNTERS = ("hits", "misses", "coalesced")


def pairs(text: str) -> dict[str, str]:
    """NAME=value,NAME=value as a dict; a part without "=" is refused."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.isupper():
            raise argparse.ArgumentTypeError(f"{part!r} is not NAME=value")
        out[name] = value
    return out


def counters(url: str) -> dict[str, float]:
    """The cache's counters from /metrics, summed over their labels (hits: by store); absent: 0."""
    values = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            name = sample.name.removeprefix("sentimentalyzer_cache_").removesuffix("_total")
            if sample.name.endswith("_total") and name in values:
                values[name] += sample.value
    return values


def measure(server: Process, name: str, args: argparse.Namespace, texts: list[str], work: Path) -> dict[str, Any]:
    before: dict[str, float] = {}
    url, cpu = server.url, bench.CpuWindow(server)

    def on_start() -> None:  # after wrk's warm-up: the measured run alone
        before.update(counters(url))
        cpu.start()

    result = wrk.measure(
        f"{url}/predict",
        args.users,
        args.seconds,
        texts,
        work / name,
        work / name,
        {},
        unique=True,
        on_start=on_start,
    )
    after, cols = counters(url), wrk.columns(result)
    return {
        **cols,
        **cpu.columns("server", cols["wrk_requests"]),
        **{f"cache_{k}": after[k] - before.get(k, 0.0) for k in COUNTERS},
    }


def _f(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def paired_ratios(rows: list[dict[str, Any]], key: str = "wrk_requests_per_s") -> list[float]:
    """Each round's on/off figure (throughput by default); a round where either side has none is left
    out, not 0."""
    by_round = {(r["round"], r["side"]): r.get(key) for r in rows}
    rounds = sorted({r["round"] for r in rows})
    return [
        by_round[(n, "on")] / by_round[(n, "off")]
        for n in rounds
        if by_round.get((n, "on")) and by_round.get((n, "off"))
    ]


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["cpu"]
    lines = [
        f"# Paired: on ({meta['on']}) against off ({meta['off']}), unique texts",
        "",
        f"`{meta['command']}`: {meta['users']} wrk connections, {meta['seconds']} s a row, corpus "
        f"{meta['corpus']} (every text numbered), model {meta['model_id']}, "
        f"commit {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}.",
        f"CPU: {cpu['model_name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}.",
        *(f"Server {name}: /ready {json.dumps(body, sort_keys=True)}" for name, body in meta["ready"].items()),
        "",
        "| pair | round | side | req/s | p50 ms | p99 ms | errors | server cores | server CPU ms / answer | hits "
        "| misses | coalesced |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('pair', 1)} | {r['round']} | {r['side']} | {r['wrk_requests_per_s'] or 0:.1f} "
            f"| {r['wrk_p50_ms'] or 0:.1f} | {r['wrk_p99_ms'] or 0:.1f} | {r['wrk_errors'] or 0:.0f} "
            f"| {_f(r.get('server_cores'), 2)} | {_f(r.get('server_cpu_ms_per_answer'), 3)} "
            f"| {r['cache_hits']:.0f} | {r['cache_misses']:.0f} | {r['cache_coalesced']:.0f} |"
        )
    ratios, cpu_ratios = meta["ratios"], paired_ratios(rows, "server_cpu_ms_per_answer")
    lines += ["", f"on/off per round: {', '.join(f'{x:.3f}' for x in ratios)}"]
    if ratios:
        lines.append(f"median on/off: **{statistics.median(ratios):.3f}** ({meta.get('pairs', 1)} pair(s) of servers)")
    if cpu_ratios:
        lines.append(
            f"server CPU an answer, on/off per round: {', '.join(f'{x:.3f}' for x in cpu_ratios)}; "
            f"median **{statistics.median(cpu_ratios):.3f}** (below 1: on spends less)"
        )
    return "\n".join(lines) + "\n"


def run_rounds(
    args: argparse.Namespace, servers: dict[str, Process], work: Path, first: int = 0
) -> list[dict[str, Any]]:
    texts = read_corpus(args.corpus)
    for name, server in servers.items():  # unrecorded warm-up of each, the measured rounds then follow
        warm = work / f"warm-{name}"
        wrk.measure(f"{server.url}/predict", args.users, args.warmup_s, texts, warm, warm, {})
    rows = []
    for rnd in range(first + 1, first + args.rounds + 1):
        for name in ("off", "on") if rnd % 2 else ("on", "off"):
            rows.append({"round": rnd, "side": name, **measure(servers[name], f"r{rnd}-{name}", args, texts, work)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_pair(args: argparse.Namespace, pair: int, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fresh pair of servers for args.rounds rounds (numbered on from the pairs before); the first
    started alternates from pair to pair."""
    work.mkdir(parents=True)
    servers: dict[str, Process] = {}
    ready: dict[str, Any] = {}
    order = (("off", args.off), ("on", args.on))
    try:
        for name, changes in order if pair % 2 else order[::-1]:
            env = environ({**changes, "ENGINE_SOCKET": str(work / f"{name}.sock")})
            env.setdefault("MODEL_ID", "stand-in")
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            servers[name] = Process.uvicorn("batched_server:app", work / f"{name}.log", env)
            # one at a time: two warm-ups would share the cores. /ready names engine, batching and cores
            ready[name] = servers[name].wait_ready(timeout_s=600)
        rows = run_rounds(args, {n: servers[n] for n in ("off", "on")}, work, first=(pair - 1) * args.rounds)
    finally:
        for proc in servers.values():
            proc.stop()
    return [{"pair": pair, **r} for r in rows], ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/short.txt")
    parser.add_argument("--rounds", type=int, default=4, help="a pair")
    parser.add_argument("--pairs", type=int, default=1, help="fresh server pairs, one after the other")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--off", type=pairs, default="CACHE_BYTES=0", help="settings of one: NAME=value,...")
    parser.add_argument("--on", type=pairs, default="CACHE_BYTES=64000000", help="and of the other")
    parser.add_argument("--tiny-model", action="store_true", help="both servers on the tests' tiny model")
    parser.add_argument("--out", default="results/cpu-2core-paired")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    ready: dict[str, Any] = {}
    with bench.model_override(args.tiny_model) as tiny, tempfile.TemporaryDirectory(prefix="paired-") as tmp:
        for pair in range(1, args.pairs + 1):
            pair_rows, pair_ready = run_pair(args, pair, Path(tmp) / f"pair{pair}")
            rows += pair_rows
            ready |= {name if pair == 1 else f"{name} (pair {pair})": body for name, body in pair_ready.items()}
        model_id = tiny.get("model_id", os.environ.get("MODEL_ID", "stand-in"))
    meta = {
        "command": command_line(),
        **{k: getattr(args, k) for k in ("corpus", "users", "seconds", "rounds", "pairs")},
        **{k: ",".join(f"{n}={v}" for n, v in getattr(args, k).items()) for k in ("off", "on")},
        "model_id": model_id,
        "cpu": cpu_info(),
        "versions": {**versions("torch", "uvicorn", "fastapi"), "wrk": wrk.version()},
        **git_state(),
        "ratios": paired_ratios(rows),
        "ready": ready,
    }
    (out / "paired.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "paired.md").write_text(report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
