"""summary.md's sections for the bench's protocol and cache groups (harness/bench_groups.py), from the rows.

    python -m harness.report results/cpu-avx2-protocols   # report.py calls section() for every run

Protocols: the three rows of one server, and the ratios gRPC / JSON and v2 / JSON of the median latency
at one user (what each protocol adds to a request) and of requests/s at the top user count (Locust's and,
for v2, wrk's). Cache: each row's corpus, its duplicate share, the hit share the server counted, and per
corpus the goal cache-on >= min(0.8 / (1 - hit share) x cache-off, HTTP ceiling). Every figure is read
from summary.csv and environment.json; a row with too few answers gives no figure.
"""

from __future__ import annotations

from typing import Any

GOAL_SHARE = 0.8  # of the ideal: a hit share h leaves 1 - h of the work, so at best 1 / (1 - h) x the rate
NO_WRK = "no wrk row: wrk speaks HTTP/1.1, gRPC runs on HTTP/2"


def _f(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def _row(rows: list[dict[str, Any]], name: str, users: int | None = None) -> dict[str, Any] | None:
    """The named row (at users), if it is a result: one with too few answers quotes nothing (its wrk
    figures are blanked by wrk_results when wrk's run held too few)."""
    return next(
        (
            r
            for r in rows
            if r["configuration"] == name
            and (users is None or r["users"] == users)
            and not r.get("too_few_answers")
            and r.get("requests_per_s") is not None
        ),
        None,
    )


def wrk_results(rows: list[dict[str, Any]], minimum: float) -> list[dict[str, Any]]:
    """The rows with wrk's figures blanked where wrk's run held fewer than minimum answers (report.py's rule)."""
    blank = dict.fromkeys(("wrk_requests_per_s", "wrk_p50_ms", "wrk_p95_ms", "wrk_p99_ms", "wrk_cache_hit_share"))
    return [r if (r.get("wrk_requests") or 0) >= minimum else {**r, **blank} for r in rows]


def grpc_rows(env: dict[str, Any]) -> set[str]:
    """Rows whose load is gRPC, from environment.json's record of each row's Locust arguments."""
    return {n for n, c in (env.get("configurations") or {}).items() if "grpc" in (c.get("locust_args") or [])}


def v2_rows(env: dict[str, Any]) -> set[str]:
    """The project's rows on the v2 protocol over HTTP (a peer's own protocol is the peer's business)."""
    configs = (env.get("configurations") or {}).items()
    return {n for n, c in configs if "kserve" in (c.get("locust_args") or []) and c.get("group") != "peer"}


def _ratio(x: float | None, base: float | None, unit: str = "", digits: int = 1) -> str:
    if x is None or not base:
        return "not measured"
    diff = f" ({x - base:+.{digits}f} {unit})" if unit else ""
    return f"{x / base:.2f}{diff}"


def protocol_section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    proto = [r for r in rows if r["group"] == "protocol"]
    if not proto:
        return []
    low, top = min(r["users"] for r in proto), max(r["users"] for r in proto)
    client = (env.get("configurations") or {}).get("proto-grpc", {}).get("locust_args", [])
    client_name = client[client.index("--grpc-client") + 1] if "--grpc-client" in client else "raw"
    out = [
        "## Protocols: one batched server, three ways in",
        "",
        "One server process (the run's engine, started with GRPC_PORT), each row in turn at each user count: "
        "proto-json POST /predict; proto-v2-http POST /v2/models/sentiment/infer (the Open Inference "
        f"Protocol's JSON); proto-grpc its ModelInfer over gRPC (Locust, {client_name} client, one connection "
        "a user).",
        "",
        "| row | users | req/s | p50 ms | p99 ms | failures | server CPU ms / answer | wrk req/s | wrk p50 ms "
        "| wrk p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in proto:
        if r.get("too_few_answers"):
            cells = ["too few answers", "", "", _f(r["failures"], 0), ""]
        else:
            cells = [_f(r["requests_per_s"]), _f(r["p50_ms"], 0), _f(r["p99_ms"], 0), _f(r["failures"], 0)]
            cells.append(_f(r.get("server_cpu_ms_per_answer"), 2))
        wrk = [_f(r["wrk_requests_per_s"]), _f(r["wrk_p50_ms"], 0), _f(r["wrk_p99_ms"], 0)]
        if r["configuration"] == "proto-grpc" and r["users"] == (env.get("wrk") or {}).get("users"):
            wrk = [NO_WRK, "", ""]
        out.append("| " + " | ".join([r["configuration"], str(r["users"]), *cells, *wrk]) + " |")
    return [*out, "", *protocol_ratios(rows, low, top), ""]


def protocol_ratios(rows: list[dict[str, Any]], low: int, top: int) -> list[str]:
    """gRPC / JSON and v2 / JSON: median latency at the fewest users, requests/s at the most."""

    def get(name: str, users: int, key: str) -> float | None:
        r = _row(rows, name, users)
        return r.get(key) if r else None

    json_p50, json_rps = get("proto-json", low, "p50_ms"), get("proto-json", top, "requests_per_s")
    json_wrk = get("proto-json", top, "wrk_requests_per_s")
    json_cpu = get("proto-json", top, "server_cpu_ms_per_answer")
    return [
        "| ratio to proto-json | gRPC / JSON | v2 / JSON |",
        "|---|---:|---:|",
        f"| median latency at {low} user{'s' if low > 1 else ''} (per-request overhead; difference in ms) "
        f"| {_ratio(get('proto-grpc', low, 'p50_ms'), json_p50, 'ms')} "
        f"| {_ratio(get('proto-v2-http', low, 'p50_ms'), json_p50, 'ms')} |",
        f"| requests/s at {top} users, Locust | {_ratio(get('proto-grpc', top, 'requests_per_s'), json_rps)} "
        f"| {_ratio(get('proto-v2-http', top, 'requests_per_s'), json_rps)} |",
        f"| requests/s at {top} users, wrk | {NO_WRK} "
        f"| {_ratio(get('proto-v2-http', top, 'wrk_requests_per_s'), json_wrk)} |",
        f"| the server's CPU per answer at {top} users, Locust (its own cost, whatever the client's) "
        f"| {_ratio(get('proto-grpc', top, 'server_cpu_ms_per_answer'), json_cpu, 'ms', 2)} "
        f"| {_ratio(get('proto-v2-http', top, 'server_cpu_ms_per_answer'), json_cpu, 'ms', 2)} |",
        "",
        "- gRPC has no wrk row: wrk speaks HTTP/1.1 only. Its Locust rows come from another client stack "
        "(gRPC's C core on gevent, against geventhttpclient for HTTP), whose cost per request shares the cores "
        "with the server on a CPU run: a ratio holds both the server's and the load generator's difference.",
        "- Locust keeps each response time to the millisecond below 100 ms and to 10 ms below 1 s, so medians "
        "differ in steps of that size.",
    ]


def cache_section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    cache = [r for r in rows if r["group"] == "cache"]
    if not cache:
        return []
    on_bytes = max((r.get("cache_bytes") or 0 for r in cache), default=0)
    out = [
        f"## Answer cache: CACHE_BYTES=0 against CACHE_BYTES={on_bytes:,.0f}",
        "",
        "Each row its own fresh batched server (the run's engine). duplicate share: 1 - distinct lines / lines "
        "of the corpus file; numbered: every request's text carries its own number, so none repeats. hit "
        "share: the server's cache hits over every text it looked up (hits, misses, coalesced) in the measured "
        "run, Locust's and wrk's each; blank: the server exposed no cache counters (read as 0 below).",
        "",
        "| row | corpus | duplicate share | texts | users | req/s | p99 ms | hit share | coalesced share "
        "| wrk req/s | wrk p99 ms | wrk hit share |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cache:
        few = bool(r.get("too_few_answers"))
        cells = [r["configuration"], str(r.get("corpus") or ""), _f(r.get("corpus_duplicate_share"), 3)]
        cells += ["numbered" if r.get("unique_texts") else "drawn at random", str(r["users"])]
        cells += ["too few answers", ""] if few else [_f(r["requests_per_s"]), _f(r["p99_ms"], 0)]
        cells += [_f(r.get("cache_hit_share"), 3), _f(r.get("cache_coalesced_share"), 3)]
        cells += [_f(r["wrk_requests_per_s"]), _f(r["wrk_p99_ms"], 0), _f(r.get("wrk_cache_hit_share"), 3)]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, "", *cache_goals(rows), ""]


def ceiling(rows: list[dict[str, Any]], key: str) -> float | None:
    """The best HTTP-ceiling figure of the run for one client's column (Locust's or wrk's)."""
    figures = [r[key] for r in rows if r["configuration"] == "http-ceiling" and not r.get("too_few_answers")]
    return max((f for f in figures if f), default=None)


def goal(off: float, on: float, hit_share: float, cap: float | None) -> tuple[float, bool]:
    """cache-on's goal, min(0.8 / (1 - h) x off, the HTTP ceiling), and whether on meets it."""
    ideal = GOAL_SHARE / (1 - hit_share) * off if hit_share < 1 else float("inf")
    target = min(ideal, cap) if cap else ideal
    return target, on >= target


def cache_goals(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        f"Goal: cache-on >= min({GOAL_SHARE} / (1 - hit share) x cache-off, HTTP ceiling), with cache-on's own "
        "hit share and each client's own ceiling (Locust's where wrk has none).",
        "",
        "| corpus | client | off req/s | on req/s | on / off | hit share | goal req/s | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    clients = (("Locust", "requests_per_s", "cache_hit_share"), ("wrk", "wrk_requests_per_s", "wrk_cache_hit_share"))
    for kind in ("dup", "unique"):
        off, on = _row(rows, f"batched-cache-off-{kind}"), _row(rows, f"batched-cache-on-{kind}")
        for client, key, share_key in clients:
            if not (off and on and off.get(key) and on.get(key) is not None):
                continue
            h = on.get(share_key)
            cap = ceiling(rows, key) or ceiling(rows, "requests_per_s")
            target, met = goal(off[key], on[key], h or 0.0, cap)
            capped = " (the ceiling)" if cap and target == cap else "" if cap else " (no ceiling in this run)"
            share = _f(h, 3) if h is not None else "0 (no counters)"
            out.append(
                f"| {on.get('corpus')} ({kind}) | {client} | {_f(off[key])} | {_f(on[key])} "
                f"| {on[key] / off[key]:.2f}x | {share} "
                f"| {_f(target)}{capped} | {'met' if met else '**not met**'} |"
            )
    return out if len(out) > 4 else [*out[:1], "", "No corpus has both a cache-off and a cache-on result in this run."]


def section(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """Both groups' sections (none where the run has neither); rows as report.load_rows reads them."""
    rows = wrk_results(rows, (env.get("answers") or {}).get("min_answers", 0))
    return [*protocol_section(rows, env), *cache_section(rows, env)]
