"""The peers' part of a bench run's summary.md and their plot; the README's table across corpora.

    python -m harness.peers.summary results/cpu-2core results/cpu-2core-short results/cpu-2core-long
    # prints one markdown table: each server's requests/s (and x the batched server) per corpus

harness/report.py calls `section` and `plot` for every run; rows are summary.csv's as report.load_rows
reads them, env is environment.json. A peer that did not run keeps its row, with the error it gave.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from harness.peers import reference_of

PROJECT = ("batched", "naive-threadpool")  # the project's rows each peer is shown beside


def _f(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def _find(rows: list[dict[str, Any]], name: str, users: int) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["configuration"] == name and r["users"] == users and r.get("requests_per_s") is not None),
        None,
    )


def peer_names(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """Every peer of the run: those with rows, and those environment.json says were meant to run."""
    names = [r["configuration"] for r in rows if r["group"] == "peer"]
    return list(dict.fromkeys([*(env.get("peers") or {}), *names]))


def peer_error(name: str, env: dict[str, Any]) -> str | None:
    server = (env.get("servers") or {}).get(name) or {}
    if "error" in server:
        return str(server["error"])
    problem = ((env.get("peers") or {}).get(name) or {}).get("environment_problem")
    return str(problem) if problem and name not in (env.get("servers") or {}) else None


def reference(name: str, peers: list[str]) -> str:
    """The batched row on the same engine: "batched" for naive-threadpool and the plain peers,
    "batched-torch-bf16" for "triton-torch-bf16" and for itself."""
    if name in peers:
        return reference_of(name)
    return name if name.startswith("batched") else "batched"


def project_rows(peers: list[str]) -> list[str]:
    """The project's rows shown beside the peers: batched, naive, and the batched row of each peer engine."""
    return list(dict.fromkeys([*PROJECT, *(reference_of(n) for n in peers)]))


def table(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """One row per server and user count: the project's batched (and naive) rows, then each peer's; a peer
    that did not run gets one row with its error."""
    peers = peer_names(rows, env)
    info = env.get("peers") or {}
    out = [
        "| server | version | batching | users | req/s | p50 ms | p99 ms | avg batch | padding eff. "
        "| / model limit | x batched |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shown = [*project_rows(peers), *peers]
    users = sorted({r["users"] for r in rows if r["configuration"] in shown})
    for u in users:
        for name in shown:
            # a row without requests/s is kept: a peer that answered nothing in the run says so
            r = next((r for r in rows if r["configuration"] == name and r["users"] == u), None)
            if r is None:
                continue
            meta = info.get(name) or {}
            version = meta.get("version") or ""
            settings = meta.get("settings") or ("the project's" if name not in peers else "")
            if r.get("requests_per_s") is None:
                failures = int(r.get("failures") or 0)
                out.append(
                    f"| {name} | {version} | {settings} | {u} | no answer completed in the run "
                    f"({failures} failures) | | | | | | |"
                )
                continue
            b = _find(rows, reference(name, peers), u)
            ratio = r["requests_per_s"] / b["requests_per_s"] if b and b["requests_per_s"] else None
            out.append(
                f"| {name} | {version} | {settings} | {u} | {_f(r['requests_per_s'])} | {_f(r['p50_ms'], 0)} "
                f"| {_f(r['p99_ms'], 0)} | {_f(r.get('avg_batch_size'))} | {_f(r.get('padding_efficiency'), 2)} "
                f"| {_f(r.get('rps_over_model_limit'), 2)} | {_f(ratio, 2)} |"
            )
    for name in peers:
        why = peer_error(name, env)
        if why is not None and not any(r["configuration"] == name and r.get("requests_per_s") for r in rows):
            meta = info.get(name) or {}
            cell = why.replace("|", "\\|")[:300]
            version, settings = meta.get("version") or "", meta.get("settings") or ""
            out.append(f"| {name} | {version} | {settings} | | did not run: {cell} | | | | | | |")
    return out


def wins(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """Plain statements of every place a peer beat the batched server on its engine (throughput or p99)."""
    out: list[str] = []
    compared = 0
    for name in peer_names(rows, env):
        ref = reference_of(name)
        server = "the batched server" + ("" if ref == "batched" else f" ({ref})")
        for r in (r for r in rows if r["configuration"] == name and r.get("requests_per_s") is not None):
            b = _find(rows, ref, r["users"])
            if b is None:
                continue
            compared += 1
            if r["requests_per_s"] > b["requests_per_s"]:
                out.append(
                    f"At {r['users']} users {name} served more requests/s than {server}: "
                    f"{r['requests_per_s']:.1f} vs {b['requests_per_s']:.1f}."
                )
            if r.get("p99_ms") is not None and b.get("p99_ms") is not None and r["p99_ms"] < b["p99_ms"]:
                out.append(
                    f"At {r['users']} users {name}'s p99 was lower than {server}'s: "
                    f"{r['p99_ms']:.0f} ms vs {b['p99_ms']:.0f} ms."
                )
    if not compared:
        return ["No peer row shares a user count with a batched row in this run: nothing to compare."]
    return out or ["No peer beat the batched server on requests/s or p99 at any user count measured."]


def section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """summary.md's peers section ([] when the run had no peers)."""
    if not peer_names(rows, env):
        return []
    return [
        "## Peers: the same model in other servers",
        "",
        f"Corpus {env.get('corpus')}; every server loads the same model and engine (serving.model.load_engine, "
        "same MODEL_ID, DEVICE and DTYPE); each peer's batch function is one forward pass padded to its "
        "longest text, as its users write it. Locust validates every answer (Triton's through KServe v2, "
        "BentoML's from its batchable API). "
        "x batched: requests/s over the batched server's at the same user count and engine.",
        "",
        *table(rows, env),
        "",
        "Where a peer wins:",
        "",
        *[f"- {line}" for line in wins(rows, env)],
        "",
    ]


def plot(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> bool:
    """requests/s and p99 against users for the project's rows and every peer; False when no peer row ran."""
    peers = [n for n in peer_names(rows, env) if any(r["configuration"] == n and r.get("requests_per_s") for r in rows)]
    if not peers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in (*project_rows(peers), *peers):
        pts = sorted(
            (r["users"], r["requests_per_s"], r["p99_ms"])
            for r in rows
            if r["configuration"] == name and r.get("requests_per_s") is not None
        )
        if not pts:
            continue
        style = {"lw": 2.5} if name == "batched" else {"ls": "--"} if name in PROJECT else {}
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=name, **style)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=name, **style)
    limit = ((env.get("model_limit") or {}).get("bucketed") or {}).get("samples_per_s")
    if limit:
        axes[0].axhline(limit, ls=":", color="grey", label=f"model limit {limit:,.0f}/s")
    users = sorted({r["users"] for r in rows if r["configuration"] in (*project_rows(peers), *peers)})
    axes[0].set(xscale="log", xlabel="concurrent users", ylabel="requests/s", ylim=(0, None), title="Throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent users", ylabel="ms", title="p99 latency")
    for ax in axes:
        ax.set_xticks(users, [str(u) for u in users])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Peers on {env.get('corpus')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- across runs (README)


def _load(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with open(run / "summary.csv", newline="", encoding="utf-8") as f:
        # a row with too few answers is no result: it is not quoted across runs either
        rows: list[dict[str, Any]] = [r for r in csv.DictReader(f) if r.get("too_few_answers") != "True"]
    for r in rows:
        r["users"] = int(float(r["users"]))
        for k in ("requests_per_s", "p50_ms", "p99_ms"):
            r[k] = float(r[k]) if r.get(k) else None
    env_path = run / "environment.json"
    return rows, json.loads(env_path.read_text()) if env_path.exists() else {}


def field_table(runs: list[Path]) -> list[str]:
    """Per server, each run's requests/s and p99 at that run's largest user count, and x batched."""
    loaded = [(run, *_load(run)) for run in runs]
    names: list[str] = list(PROJECT)
    for _, rows, env in loaded:
        names += [n for n in peer_names(rows, env) if n not in names]
    head = " | ".join(f"{env.get('corpus', run.name)}" for run, _, env in loaded)
    out = [f"| server | {head} |", "|---|" + "---:|" * len(loaded)]
    for name in names:
        cells = []
        for _, rows, env in loaded:
            users = max((r["users"] for r in rows if r["configuration"] == "batched"), default=None)
            r = _find(rows, name, users) if users is not None else None
            b = _find(rows, "batched", users) if users is not None else None
            if r is None:
                ran = any(x["configuration"] == name and x["users"] == users for x in rows)
                cells.append("no answer completed" if ran else "did not run" if peer_error(name, env) else "")
                continue
            ratio = f" ({r['requests_per_s'] / b['requests_per_s']:.2f}x)" if b and name != "batched" else ""
            cells.append(f"{r['requests_per_s']:.1f}{ratio}, p99 {r['p99_ms']:.0f} ms @ {users} users")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__.strip().splitlines()[2])
        return 2
    print("\n".join(field_table([Path(a) for a in args])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
