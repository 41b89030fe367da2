"""Front ends on one engine: N uvicorn workers against one, with a model so small that HTTP is the cost.

    python -m harness.fronts --out results/cpu-2core-fronts          # workers 1 and 2, twice each, alternating
    python -m harness.fronts --workers 1,2,4 --rounds 1 --seconds 10

With the tests' tiny DistilBERT (2 layers, dim 32, the real tokenizer; built into a temporary folder
here) a forward pass costs well under a millisecond, so what a batched server serves is what its
front ends (HTTP, JSON, tokenizing, the hop) can push: `uvicorn batched_server:app --workers N` gives
N front ends on one engine process, and this measures what that buys under wrk (harness/threads.py's
`served`: answers, latency, cores of the front ends and of the engine). Rounds alternate the worker
counts so a drift of the machine falls on all of them; the verdict takes the median per count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from harness.references import command_line, cpu_info, git_state, versions
from harness.threads import served
from harness.wrk import version as wrk_version


def tiny_model(path: Path) -> str:
    """The tests' tiny model (tests/conftest.py), saved like any hub model."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    from serving.model import standin_tokenizer_dir

    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(1)
    DistilBertForSequenceClassification(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(standin_tokenizer_dir()).save_pretrained(path)
    return str(path)


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cpu = meta["cpu"]
    lines = [
        "# Front ends on one engine (tiny model: HTTP is the cost)",
        "",
        f"`{meta['command']}`: {meta['users']} wrk connections, {meta['seconds']} s a row after "
        f"{meta['warmup_s']} s of warm-up, corpus {meta['corpus']}, commit {meta['git_commit']}"
        f"{' (dirty)' if meta['git_dirty'] else ''}.",
        f"CPU: {cpu['model_name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}.",
        "",
        "| round | workers | req/s | p50 ms | p99 ms | errors | mean batch | hop ms | cores: front ends | engine "
        "| server |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['round']} | {r['workers']} | failed: {r['error'].splitlines()[0]} |")
            continue
        lines.append(
            f"| {r['round']} | {r['workers']} | {r['wrk_requests_per_s']:.0f} | {r['wrk_p50_ms']:.1f} "
            f"| {r['wrk_p99_ms']:.1f} | {r['wrk_errors']:.0f} | {r['mean_batch']} | {r['hop_ms']} "
            f"| {r['cores_front']:.2f} | {r['cores_engine']:.2f} | {r['cores_server']:.2f} |"
        )
    medians = meta["median_requests_per_s"]
    if medians:
        one = medians.get("1")
        lines += ["", "Median req/s per worker count: " + ", ".join(f"{w}: {v:.0f}" for w, v in medians.items())]
        if one:
            lines.append("Over one front end: " + ", ".join(f"{w}: {v / one:.2f}x" for w, v in medians.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/short.txt")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--out", default="results/cpu-2core-fronts")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fronts-") as tmp:
        settings = {"MODEL_ID": tiny_model(Path(tmp) / "tiny"), "MODEL_FALLBACK": "0", "DTYPE": "fp32"}
        for rnd in range(1, args.rounds + 1):
            for workers in counts if rnd % 2 else counts[::-1]:
                row = served(f"w{workers}-r{rnd}", settings, args, Path(tmp), workers=workers)
                rows.append({"round": rnd, **row, "workers": workers})
                print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if "error" not in r and r.get("wrk_requests_per_s")]
    meta = {
        "command": command_line(),
        "corpus": args.corpus,
        "users": args.users,
        "seconds": args.seconds,
        "warmup_s": args.warmup_s,
        "model": "tiny DistilBERT (2 layers, dim 32, seed 1), real uncased tokenizer",
        "cpu": cpu_info(),
        "versions": {**versions("torch", "uvicorn", "fastapi", "pyzmq", "msgspec"), "wrk": wrk_version()},
        **git_state(),
        "median_requests_per_s": {
            str(w): statistics.median(r["wrk_requests_per_s"] for r in ok if r["workers"] == w)
            for w in counts
            if any(r["workers"] == w for r in ok)
        },
    }
    (out / "fronts.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / "fronts.md").write_text(report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
