"""The engine table and plot of a bench run: what batching buys at each engine the machine runs.

    python -m harness.report results/cpu-2core     # calls section() and plot() below

One line per engine (BACKEND-DTYPE): its in-process limit (one length per batch, and one text at a
time), the naive and the batched server at the same engine, their ratio, the batched server over
the limit, and how far the engine's scores are from torch fp32. The default engine's server rows are
`naive-threadpool` and `batched`; every other engine's are `naive-<engine>` and `batched-<engine>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt


def _find(rows: list[dict[str, Any]], name: str, users: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["configuration"] == name and r["users"] == users), None)


def _rps(row: dict[str, Any] | None) -> float | None:
    return row.get("requests_per_s") if row else None


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def server_names(engine: str, default: str) -> tuple[str, str]:
    """The (naive, batched) configurations that ran at this engine."""
    return ("naive-threadpool", "batched") if engine == default else (f"naive-{engine}", f"batched-{engine}")


def engine_rows(rows: list[dict[str, Any]], env: dict[str, Any], users: int) -> list[dict[str, Any]]:
    """Per engine: limits, server throughput at `users`, ratios and agreement (None where not measured)."""
    limit = env.get("model_limit") or {}
    default = limit.get("default_engine")
    out = []
    for engine, lim in (limit.get("engines") or {}).items():
        naive_name, batched_name = server_names(engine, default)
        naive, batched = _rps(_find(rows, naive_name, users)), _rps(_find(rows, batched_name, users))
        one_length = (lim.get("bucketed") or {}).get("samples_per_s")
        agree = lim.get("agreement_with_fp32") or {}
        out.append(
            {
                "engine": engine,
                "default": engine == default,
                "error": lim.get("error"),
                "limit": one_length,
                "limit_batch": (lim.get("bucketed") or {}).get("batch_size"),
                "limit_one": (lim.get("batch_of_one") or {}).get("samples_per_s"),
                "naive": naive,
                "batched": batched,
                "batched_over_naive": batched / naive if batched and naive else None,
                "batched_over_limit": batched / one_length if batched and one_length else None,
                "max_abs_diff": agree.get("max_abs_diff"),
                "mean_abs_diff": agree.get("mean_abs_diff"),
                "flips": agree.get("flips_outside_1e-2"),
            }
        )
    return out


def section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """The markdown section; [] when the run measured no engine limits."""
    top = max((r["users"] for r in rows if r["group"] in ("batched", "engine")), default=None)
    if top is None or not (env.get("model_limit") or {}).get("engines"):
        return []
    lines = [
        f"## Engines ({top} users; limits in-process, sequences/s)",
        "",
        "| engine | limit, one length per batch | limit, one at a time | naive req/s | batched req/s "
        "| batched / naive | batched / limit | max abs diff P vs torch fp32 | mean abs diff | label flips |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in engine_rows(rows, env, top):
        if e["error"]:
            lines.append(f"| {e['engine']} | not run: {e['error']} |" + " |" * 8)
            continue
        name = f"**{e['engine']}** (default)" if e["default"] else e["engine"]
        limit = f"{_f(e['limit'])} (batch {e['limit_batch']})" if e["limit"] else "-"
        lines.append(
            f"| {name} | {limit} | {_f(e['limit_one'])} | {_f(e['naive'])} | {_f(e['batched'])} "
            f"| {_f(e['batched_over_naive'], 2)}x | {_f(e['batched_over_limit'], 2)} "
            f"| {_f(e['max_abs_diff'], 4)} | {_f(e['mean_abs_diff'], 4)} | {_f(e['flips'], 0)} |"
        )
    best = max((e for e in engine_rows(rows, env, top) if e["batched"]), key=lambda e: e["batched"], default=None)
    base = next((e for e in engine_rows(rows, env, top) if e["engine"] == "torch-fp32" and e["batched"]), None)
    if best and base:
        lines += [
            "",
            f"Best engine here: {best['engine']}, batched {best['batched']:.1f} req/s = "
            f"{best['batched'] / base['batched']:.2f}x batched torch fp32 and "
            f"{best['batched'] / base['naive']:.2f}x naive torch fp32."
            if base["naive"]
            else "",
        ]
    ones = engine_rows(rows, env, 1)
    if any(e["naive"] and e["batched"] for e in ones):
        lines += ["", "One user at a time, per engine (batched / naive):", ""]
        lines += [
            f"- {e['engine']}: naive {e['naive']:.1f}, batched {e['batched']:.1f} req/s, {e['batched_over_naive']:.2f}x"
            for e in ones
            if e["naive"] and e["batched"] and e["batched_over_naive"] is not None
        ]
    return [*lines, ""]


def plot(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> bool:
    """engines.png: naive and batched requests/s per engine, at the top user count, limit marked."""
    top = max((r["users"] for r in rows if r["group"] in ("batched", "engine")), default=None)
    data = [e for e in engine_rows(rows, env, top) if e["naive"] or e["batched"]] if top else []
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = range(len(data))
    ax.bar([x - 0.2 for x in xs], [e["naive"] or 0 for e in data], 0.4, label="naive (threadpool)")
    ax.bar([x + 0.2 for x in xs], [e["batched"] or 0 for e in data], 0.4, label="batched")
    ax.scatter(list(xs), [e["limit"] or 0 for e in data], marker="_", s=900, color="black", label="in-process limit")
    ax.set_xticks(list(xs), [e["engine"] for e in data])
    ax.set(ylabel="requests/s", title=f"Naive and batched at each engine, {top} users ({env.get('model_source')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
