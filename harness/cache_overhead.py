"""What the answer cache adds to a request's own path, in-process: microseconds a request, no server.

    python -m harness.cache_overhead --out results/cpu-avx512-cache-overhead
    python -m harness.cache_overhead --requests 2000 --rounds 3 --out /tmp/cache-overhead

One event loop, one request at a time (each in a task of its own, as the server runs it): `direct`
awaits a compute that answers at once (it yields to the loop once, as the engine's answer always comes
later), `miss` sends each text through serving.cache.AnswerCache.answer with the same compute (every
text new: key, LRU insert, counters, the in-flight future), `hit` sends the texts a miss round just
stored. Rounds alternate the order of the three, and the figures are each one's median microseconds a
request over the rounds, and the cache's cost: median miss - direct and hit - direct. Over a server,
the same cost is a share of the server's CPU an answer (the bench's `server_cpu_ms_per_answer`); on
fast engines that share is what the cache can cost at most, which a paired run of two servers
(harness.paired) measures only within its instance-to-instance noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness.references import command_line, cpu_info, git_state, versions
from serving.cache import AnswerCache, engine_identity
from serving.ops import Observability
from serving.settings import Settings
from serving.text import Prediction

ENGINE = {"weights": "overhead-0", "backend": "torch", "dtype": "fp32", "device": "cpu", "packed": True}
Send = Callable[[list[str]], Awaitable[list[Prediction]]]


async def compute(texts: list[str]) -> list[Prediction]:
    await asyncio.sleep(0)  # the engine answers later, never within the call
    return [Prediction("POSITIVE", 0.75, len(texts)) for _ in texts]


async def per_request_us(send: Send, texts: list[str]) -> tuple[float, dict[str, int]]:
    """Microseconds a request, and how the answers were marked (a check that each kind is what it says)."""
    marks: Counter[str] = Counter()
    start = time.perf_counter()
    for text in texts:
        (answer,) = await asyncio.ensure_future(send([text]))
        marks[answer.cache or "direct"] += 1
    return (time.perf_counter() - start) / len(texts) * 1e6, dict(marks)


async def rounds(n_requests: int, n_rounds: int, cache_bytes: int) -> list[dict[str, Any]]:
    cache = AnswerCache(
        Settings(cache_bytes=cache_bytes), Observability("batched", engine_side=False), lambda: engine_identity(ENGINE)
    )
    out = []
    for rnd in range(n_rounds):
        texts = [f"review {rnd}-{i}: the plot was thin but the acting carried it" for i in range(n_requests)]
        kinds: dict[str, tuple[Send, list[str]]] = {
            "direct": (compute, [t + " (direct)" for t in texts]),
            "miss": (lambda t: cache.answer(t, compute), texts),
            "hit": (lambda t: cache.answer(t, compute), texts),  # stored by this round's miss run
        }
        order = ["direct", "miss", "hit"] if rnd % 2 == 0 else ["miss", "hit", "direct"]  # hit after its miss
        row: dict[str, Any] = {}
        for kind in order:
            row[kind], row[f"{kind}_marks"] = await per_request_us(*kinds[kind])
        out.append(row)
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    med = {kind: statistics.median(r[kind] for r in rows) for kind in ("direct", "miss", "hit")}
    return {
        **{f"{k}_us": v for k, v in med.items()},
        "miss_cost_us": statistics.median(r["miss"] - r["direct"] for r in rows),
        "hit_cost_us": statistics.median(r["hit"] - r["direct"] for r in rows),
    }


def marks(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Each kind's answer marks summed over the rounds: direct all unmarked, miss all misses, hit all hits."""
    total: dict[str, Counter[str]] = {kind: Counter() for kind in ("direct", "miss", "hit")}
    for r in rows:
        for kind in total:
            total[kind].update(r[f"{kind}_marks"])
    return {kind: dict(c) for kind, c in total.items()}


def report(meta: dict[str, Any]) -> str:
    s, cpu = meta["summary"], meta["cpu"]
    return "\n".join(
        [
            "# The answer cache's cost on a request's own path (in-process)",
            "",
            f"`{meta['command']}`: {meta['requests']} requests a kind a round, {meta['rounds']} rounds, commit "
            f"{meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}; CPU {cpu['model_name']}, "
            f"{cpu['cores']} cores, flags {' '.join(cpu['flags'])}.",
            "",
            "| kind | median us a request |",
            "|---|---:|",
            *(f"| {k} | {s[f'{k}_us']:.1f} |" for k in ("direct", "miss", "hit")),
            "",
            f"Answers as marked, every round: {json.dumps(meta['marks'], sort_keys=True)}.",
            "",
            f"The cache adds **{s['miss_cost_us']:.1f} us** to a request whose text is new, and "
            f"{s['hit_cost_us']:+.1f} us to one it answers (against awaiting the compute directly).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-bytes", type=int, default=64_000_000)
    parser.add_argument("--out", default="results/cpu-2core-cache-overhead")
    args = parser.parse_args()
    rows = asyncio.run(rounds(args.requests, args.rounds, args.cache_bytes))
    meta = {
        "command": command_line(),
        "requests": args.requests,
        "rounds": args.rounds,
        "cache_bytes": args.cache_bytes,
        "cpu": cpu_info(),
        "versions": versions("prometheus-client"),
        **git_state(),
        "rows": rows,
        "marks": marks(rows),
        "summary": summary(rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "overhead.md").write_text(report(meta))
    print(report(meta))


if __name__ == "__main__":
    main()
