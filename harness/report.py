"""Writes a bench run's summary.md and plots from its summary.csv and environment.json.

    python -m harness.report results/cpu-2core    # rewrites summary.md, throughput_vs_users.png,
                        # latency_vs_users.png, batch_size_tradeoff.png, engines.png (and peers.png)

harness/bench.py calls it at the end of a run; run it alone to redraw after editing this file. Every
number comes from the run's files: nothing here is typed in by hand.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from harness import engine_report, groups_report
from harness.peers import summary as peers_summary

NUMERIC = (
    "users",
    "requests_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "requests",
    "failures",
    "duration_s",
    "avg_batch_size",
    "padding_efficiency",
    "rps_over_model_limit",
    "rps_over_http_ceiling",
    "max_batch_size",
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
    "corpus_duplicate_share",
    "cache_bytes",
    "cache_hit_share",
    "cache_coalesced_share",
    "wrk_cache_hit_share",
)
NAIVE = ("naive-threadpool", "naive-blocking")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """summary.csv rows with numbers as floats (users and max_batch_size as ints), blanks as None."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in NUMERIC:
            v = r.get(k)
            r[k] = None if v in (None, "") else (int(float(v)) if k in ("users", "max_batch_size") else float(v))
        r["locust_cpu_warning"] = r.get("locust_cpu_warning") == "True"
        r["too_few_answers"] = r.get("too_few_answers") == "True"  # blank in runs from before the flag
        r["unique_texts"] = r.get("unique_texts") == "True"  # and these two in runs from before the groups
        r["corpus"] = r.get("corpus") or None
    return rows


def results(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are results: a row with too few answers is listed as such, never compared or drawn."""
    return [r for r in rows if not r.get("too_few_answers")]


def too_few(r: dict[str, Any]) -> str:
    answers = (r["requests"] or 0.0) - (r["failures"] or 0.0)
    return f"too few answers ({answers:,.0f} in {_f(r['duration_s'], 0) or '?'} s)"


def find(rows: list[dict[str, Any]], name: str, users: int) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["configuration"] == name and r["users"] == users and r["requests_per_s"] is not None),
        None,
    )


def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _f(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| configuration | users | req/s | p50 ms | p95 ms | p99 ms | failures | avg batch | padding eff. "
        "| / model limit | / HTTP ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("too_few_answers"):
            cells = [r["configuration"], str(r["users"]), too_few(r), "", "", "", _f(r["failures"], 0), *[""] * 4]
            out.append("| " + " | ".join(cells) + " |")
            continue
        out.append(
            f"| {r['configuration']} | {r['users']} | {_f(r['requests_per_s'])} | {_f(r['p50_ms'], 0)} "
            f"| {_f(r['p95_ms'], 0)} | {_f(r['p99_ms'], 0)} | {_f(r['failures'], 0)} "
            f"| {_f(r['avg_batch_size'])} | {_f(r['padding_efficiency'], 2)} "
            f"| {_f(r['rps_over_model_limit'], 2)} | {_f(r['rps_over_http_ceiling'], 3)} |"
        )
    return out


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Batched over each naive mode (and peer), per user count both were measured at."""
    out = ["| users | versus | throughput ratio | p99 ratio (batched / other) |", "|---:|---|---:|---:|"]
    for users in sorted({r["users"] for r in rows if r["configuration"] == "batched"}):
        b = find(rows, "batched", users)
        for other in (*NAIVE, *dict.fromkeys(r["configuration"] for r in rows if r["group"] == "peer")):
            o = find(rows, other, users)
            if b and o and o["requests_per_s"] and o["p99_ms"]:
                out.append(
                    f"| {users} | {other} | {b['requests_per_s'] / o['requests_per_s']:.2f}x "
                    f"| {b['p99_ms'] / o['p99_ms']:.2f} |"
                )
    return out if len(out) > 2 else ["No user count has both a batched and a naive row in this run."]


def losses(rows: list[dict[str, Any]]) -> list[str]:
    """Plain statements of every place the batched server did worse, computed from the rows."""
    out, compared = [], 0
    for users in sorted({r["users"] for r in rows if r["configuration"] == "batched"}):
        b = find(rows, "batched", users)
        for other in NAIVE:
            o = find(rows, other, users)
            if not (b and o):
                continue
            compared += 1
            if b["requests_per_s"] < o["requests_per_s"]:
                out.append(
                    f"At {_users(users)} the batched server served fewer requests/s than {other}: "
                    f"{b['requests_per_s']:.1f} vs {o['requests_per_s']:.1f}."
                )
            if b["p50_ms"] > o["p50_ms"]:
                out.append(
                    f"At {_users(users)} its median latency was higher than {other}'s: "
                    f"{b['p50_ms']:.0f} ms vs {o['p50_ms']:.0f} ms."
                )
    for r in rows:
        if r["group"] in ("bus", "policy") and r["requests_per_s"] is not None:
            for other in NAIVE:
                o = find(rows, other, r["users"])
                compared += o is not None
                if o and r["requests_per_s"] < o["requests_per_s"]:
                    out.append(
                        f"{r['configuration']} (MAX_BATCH_SIZE {r['max_batch_size']}, policy "
                        f"{r['batch_policy']}) at {_users(r['users'])} served fewer requests/s than {other}: "
                        f"{r['requests_per_s']:.1f} vs {o['requests_per_s']:.1f}."
                    )
        if r["failures"]:
            out.append(
                f"{r['configuration']} at {_users(r['users'])} had {r['failures']:.0f} failed requests "
                f"(see {r['configuration']}_u{r['users']}_failures.csv)."
            )
    if not out and not compared:
        return ["No batched row shares a user count with a naive row in this run: nothing to compare."]
    return out or [
        "In this run the batched server did not lose to a naive mode on throughput or median latency "
        "at any user count measured, and no request failed."
    ]


def header(env: dict[str, Any]) -> list[str]:
    cpu, limit = env.get("cpu") or {}, env.get("model_limit")
    source = env.get("model_source")
    lines = [
        f"# Benchmark: {env.get('profile', '?')} profile, {env.get('date', '?')}",
        "",
        f"- command: `{env.get('command')}`",
        f"- device: {env.get('device')}"
        + (f" ({env['gpu_name']})" if env.get("gpu_name") else "")
        + f", dtype {env.get('dtype')}; CPU: {cpu.get('model_name')}, {cpu.get('cores')} cores, "
        f"flags {' '.join(cpu.get('flags') or []) or 'unknown'}",
        f"- model: {env.get('model_id')} (source: {source})"
        + (
            ". The stand-in has the real architecture and tokenizer but random weights: its labels mean "
            "nothing, its cost per request is the real model's."
            if source == "stand-in"
            else ". The tests' tiny model (--tiny-model): its forward pass costs well under a millisecond, so the "
            "rows measure the transport and the front ends, not the model."
            if source == "tiny"
            else ""
        ),
        f"- corpus: {env.get('corpus')}; batching settings: {json.dumps(env.get('batching'))}",
        f"- git: {env.get('git_commit') or 'no commit'}{' (dirty)' if env.get('git_dirty') else ''}",
        *answers_rule(env),
    ]
    if limit:
        b, r = limit["bucketed"], limit["random"]
        sizes = ", ".join(limit.get("by_batch_size", {}))
        lines.append(
            f"- model limit (in-process tokenize + forward, no HTTP; corpus of {limit['texts']} texts, mean "
            f"{limit['mean_tokens']:.1f} tokens; best of batch sizes {sizes}): {b['samples_per_s']:.1f} "
            f"samples/s length-bucketed (batch {b['batch_size']}), {r['samples_per_s']:.1f} samples/s "
            f"random-padded (batch {r['batch_size']})"
        )
        agree = limit.get("int8_agreement")
        if agree:
            lines.append(
                f"- int8 (dynamic quantization) against fp32 on the corpus's {agree['texts']} texts: P(positive) "
                f"max abs diff {agree['max_abs_diff']:.4f}, mean {agree['mean_abs_diff']:.4f}; labels agree on "
                f"{agree['label_agreement']:.1%}, {agree['flips_outside_1e-2']} flips where fp32 was not within "
                "1e-2 of 0.5"
                + (
                    " (random stand-in weights: a lower bound, re-check with the real model)"
                    if source == "stand-in"
                    else ""
                )
            )
    else:
        lines.append("- model limit: not measured in this run (see logs/model_limit.log)")
    return lines


def answers_rule(env: dict[str, Any]) -> list[str]:
    """The least answers a row held to count as a result, and who lowered it below the standard."""
    rule = env.get("answers")
    if not rule:  # a run from before the rule
        return []
    n, cap, standard = rule["min_answers"], rule["max_duration_s"], rule["standard"]
    line = (
        f"- every result holds at least {n} answers (successful responses): a row with fewer ran again for "
        f"longer, up to {cap:g} s; one still short is listed as too few answers, with no figure quoted"
    )
    if n < standard:
        line += f". {n} is below the standard {standard}, set by {rule['set_by']}: a smoke test, not a measurement"
    return [line]


def _wrk_line(r: dict[str, Any], minimum: int) -> str:
    """One configuration's Locust and wrk figures; either side with too few answers quotes none."""
    locust = not r.get("too_few_answers")
    wrk = r["wrk_requests"] is not None and r["wrk_requests"] >= minimum  # the same rule as Locust's rows
    ratio = r["wrk_requests_per_s"] / r["requests_per_s"] if wrk and locust and r["requests_per_s"] else None
    if wrk:
        wrk_rps = _f(r["wrk_requests_per_s"])
    elif r["wrk_requests"] is None:
        wrk_rps = "no wrk result"
    else:
        wrk_rps = too_few({**r, "requests": r["wrk_requests"], "failures": 0.0})
    cells = [r["configuration"], _f(r["requests_per_s"]) if locust else too_few(r), wrk_rps, _f(ratio, 2)]
    for key in ("p50_ms", "p99_ms"):
        cells += [_f(r[key], 0) if locust else "", _f(r[f"wrk_{key}"], 0) if wrk else ""]
    cpu = [_f(r.get("wrk_server_cores"), 2), _f(r.get("wrk_server_cpu_ms_per_answer"), 2)] if wrk else ["", ""]
    return "| " + " | ".join([*cells, _f(r["wrk_errors"], 0), *cpu]) + " |"


def wrk_section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """Locust's figures beside wrk's, on the rows at wrk's user count."""
    w = env.get("wrk")
    if not w or not w.get("users"):  # a run from before wrk, or --wrk-users 0
        return []
    head = [f"## Locust beside wrk ({_users(w['users'])}, POST /predict, closed loop)", ""]
    if not w.get("version"):
        return [*head, "wrk not installed: no wrk figures in this run.", ""]
    grpc = groups_report.grpc_rows(env)
    rows = [r for r in rows if r["configuration"] not in grpc]
    out = [
        "| configuration | Locust req/s | wrk req/s | wrk / Locust | Locust p50 ms | wrk p50 ms | Locust p99 ms "
        "| wrk p99 ms | wrk errors | server cores (wrk) | server CPU ms / answer (wrk) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    minimum = (env.get("answers") or {}).get("min_answers", 0)
    out += [_wrk_line(r, minimum) for r in rows if r["users"] == w["users"] and r["group"] != "peer"]
    v2 = sorted(groups_report.v2_rows(env))
    note = [f"- {', '.join(v2)}: wrk posts the v2 body to /v2/models/sentiment/infer, as Locust does."] if v2 else []
    note += [f"- {', '.join(sorted(grpc))}: {groups_report.NO_WRK}."] if grpc else []
    note += [""] if note else []
    return [*head, *(out if len(out) > 2 else [f"No row at {_users(w['users'])} in this run."]), "", *note]


def scaling(rows: list[dict[str, Any]]) -> list[str]:
    """uvicorn --workers N rows against N x the one-process batched row at the same user count."""
    out = []
    for r in (r for r in rows if r["group"] == "scale" and r["requests_per_s"]):
        one = next(
            (b for b in rows if b["configuration"] == "batched" and b["users"] == r["users"] and b["requests_per_s"]),
            None,
        )
        n = int(r["configuration"].rsplit("x", 1)[1])
        if one:
            out.append(
                f"- {n} processes at {r['users']} users: {r['requests_per_s']:.1f} req/s = "
                f"{r['requests_per_s'] / (n * one['requests_per_s']):.2f} x {n} x one process "
                f"({one['requests_per_s']:.1f} req/s)"
            )
    return ["## Several processes (uvicorn --workers N, one model replica each)", "", *out, ""] if out else []


def markdown(all_rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    rows = results(all_rows)  # the table lists every row; the rest reads results only
    ceiling = [r for r in rows if r["configuration"] == "http-ceiling" and r["requests_per_s"]]
    ceil_line = (
        f"- HTTP ceiling (no-model endpoint, same FastAPI + uvicorn stack): "
        f"{max(r['requests_per_s'] for r in ceiling):,.0f} req/s"
        if ceiling
        else "- HTTP ceiling: not measured in this run"
    )
    parts = [
        *header(env),
        ceil_line,
        "",
        "## Results",
        "",
        *table(all_rows),
        "",
        *wrk_section(all_rows, env),
        *scaling(rows),
        *groups_report.section(all_rows, env),
        "## Batched versus naive",
        "",
        *ratios(rows),
        "",
        *engine_report.section(rows, env),
        *peers_summary.section(rows, env),
        "## Where batching loses",
        "",
        *[f"- {line}" for line in losses(rows)],
        "",
        *caveats(all_rows, env),
    ]
    return "\n".join(parts) + "\n"


def caveats(all_rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    parts = [
        "## Caveats",
        "",
        "- Locust's CSV is a snapshot written once a second: the last second of each run is not in it.",
        "- On CPU runs Locust shares the cores with the server it drives.",
    ]
    load, cores = env.get("load_average_at_start"), (env.get("cpu") or {}).get("cores")
    if load is not None and load > 0.5:
        parts.append(
            f"- The machine's 1-minute load average was {load:.2f} ({cores} cores) before the run started: "
            "other work was competing for the CPU, so these figures understate what it can do."
        )
    warned = sorted({f"{r['configuration']} u={r['users']}" for r in results(all_rows) if r["locust_cpu_warning"]})
    if warned:
        parts.append(
            f"- Locust warned that its CPU was above 90% in: {', '.join(warned)}; those figures may be "
            "limited by the load generator rather than the server."
        )
    short = [f"{r['configuration']} u={r['users']}: {too_few(r)}" for r in all_rows if r.get("too_few_answers")]
    if short:
        n = (env.get("answers") or {}).get("min_answers")
        parts.append(
            f"- Fewer than {n} answers even at the longest run, so no result: {'; '.join(short)}. "
            "Their figures stay in summary.csv (too_few_answers True) and nowhere above."
        )
    failed = [f"{n}: {s['error']}" for n, s in (env.get("servers") or {}).items() if "error" in s]
    return parts + [f"- configuration that did not run: {f}" for f in failed]


def _user_ticks(ax: Any, rows: list[dict[str, Any]]) -> None:
    users = sorted({r["users"] for r in rows if r["group"] != "reference"})
    ax.set_xticks(users, [str(u) for u in users])
    ax.minorticks_off()


def plot_throughput(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 0.0
    for name in dict.fromkeys(r["configuration"] for r in rows if r["group"] in ("naive", "batched", "peer")):
        pts = sorted(
            (r["users"], r["requests_per_s"])
            for r in rows
            if r["configuration"] == name and r["requests_per_s"] is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            top = max(top, max(y for _, y in pts))
    limit = (env.get("model_limit") or {}).get("bucketed", {}).get("samples_per_s")
    if limit:
        ax.axhline(limit, ls="--", color="grey", label=f"model limit {limit:,.0f}/s")
        top = max(top, limit)
    ceiling = max(
        (r["requests_per_s"] for r in rows if r["configuration"] == "http-ceiling" and r["requests_per_s"]),
        default=None,
    )
    if ceiling and ceiling < 3 * max(top, 1e-9):
        ax.axhline(ceiling, ls=":", color="black", label=f"HTTP ceiling {ceiling:,.0f}/s")
    elif ceiling:  # drawn to scale it would flatten every other line
        ax.plot([], [], ls=":", color="black", label=f"HTTP ceiling {ceiling:,.0f}/s (off scale)")
    ax.set(
        xscale="log",
        xlabel="concurrent users (closed loop)",
        ylabel="requests/s",
        ylim=(0, 1.15 * top or 1),
        title="Throughput vs users",
    )
    _user_ticks(ax, rows)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for name in dict.fromkeys(r["configuration"] for r in rows if r["group"] in ("naive", "batched", "peer")):
            pts = sorted((r["users"], r[key]) for r in rows if r["configuration"] == name and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="concurrent users", title=key.replace("_ms", " latency (ms)"))
        _user_ticks(ax, rows)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("ms")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bus(rows: list[dict[str, Any]], path: Path) -> bool:
    """Throughput and p99 against MAX_BATCH_SIZE at the bus user count; False when under 2 sizes ran."""
    bus = [r for r in rows if r["group"] == "bus" and r["requests_per_s"] is not None]
    users = bus[0]["users"] if bus else None
    pts = sorted(
        {
            r["max_batch_size"]: r
            for r in [*bus, *[r for r in rows if r["configuration"] == "batched" and r["users"] == users]]
        }.items()
    )
    if len(pts) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [k for k, _ in pts]
    ax.plot(xs, [r["requests_per_s"] for _, r in pts], marker="o", color="tab:blue", label="requests/s")
    ax.set(
        xscale="log",
        xlabel="MAX_BATCH_SIZE",
        ylabel="requests/s",
        ylim=(0, None),
        title=f"Batch-size trade-off at {users} users",
    )
    ax.set_xticks(xs, [str(x) for x in xs])
    ax2 = ax.twinx()
    ax2.plot(xs, [r["p99_ms"] for _, r in pts], marker="s", color="tab:red", label="p99 ms")
    ax2.set(ylabel="p99 latency (ms)", ylim=(0, None))
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2])
        return 2
    run = Path(args[0])
    all_rows = load_rows(run / "summary.csv")
    env_path = run / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    (run / "summary.md").write_text(markdown(all_rows, env), encoding="utf-8")
    rows = results(all_rows)  # a row with too few answers is not drawn
    plot_throughput(rows, env, run / "throughput_vs_users.png")
    plot_latency(rows, run / "latency_vs_users.png")
    if not plot_bus(rows, run / "batch_size_tradeoff.png"):
        print("report: fewer than 2 MAX_BATCH_SIZE values in this run, no batch_size_tradeoff.png")
    engine_report.plot(rows, env, run / "engines.png")  # only when engine limits were measured
    peers_summary.plot(rows, env, run / "peers.png")  # only when a peer ran
    print(f"report: wrote {run}/summary.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
