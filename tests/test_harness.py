"""The measuring rig's arithmetic, table-driven: the figures the README publishes come from these functions.

    .venv/bin/python -m pytest tests/test_harness.py -q     # a few seconds: no servers, no model

Covers harness/bench.py (Locust CSV rows, /metrics deltas, ratios, summary.csv cells, configurations,
rows run again until they hold enough answers), harness/wrk.py (the Lua script, wrk's done() line, its
columns; one test runs the real wrk, a second or two, against a stdlib server), harness/report.py (the
summary.md table, ratio, loss and scaling lines, rows with too few answers, wrk beside Locust),
harness/one_user.py (paired rounds against the goals), harness/overload.py (percentiles, summaries,
soak windows, verdicts) and harness/references.py (corpus, length batches, machine info). Every
expected value below is worked out by hand from the small inputs beside it. The percentile boundary,
soak window and corpus line tests found bugs (fixed in the same change).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import csv
import json
import shutil
import socket
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from harness import bench, launch, one_user, overload, references, report, wrk
from tests.processes import StubRequest, stub_http

# ------------------------------------------------------------------------------------------ helpers

# Locust 2.x `--csv` header, as in results/cpu-2core/batched_u32_stats.csv
LOCUST_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
    "99.99%,100%"
)


def locust_line(type_: str, name: str, requests: int, failures: int, rps: float, p50: float, p95: float, p99: float):
    # Median, Average, Min, Max, Average Content Size; Requests/s, Failures/s; 50% 66% 75% 80% 90% 95% 98% 99% ...
    cells = [type_, name, requests, failures, p50, p50 + 1.5, 1, p99 + 10, 93.4, rps, 0.0]
    cells += [p50, p50, p50, p50, p95, p95, p99, p99, p99 + 10, p99 + 10, p99 + 10]
    return ",".join(str(c) for c in cells)


def write_stats(tmp_path: Path, *lines: str) -> Path:
    prefix = tmp_path / "run_u8"
    Path(f"{prefix}_stats.csv").write_text("\n".join([LOCUST_HEADER, *lines]) + "\n", encoding="utf-8")
    return prefix


def cfg(name: str = "batched", group: str = "batched") -> bench.Config:
    return bench.Config(name, group, "batched_server:app", (8,), 10)


def row(configuration: str, group: str, users: int, rps: float | None, **kw: Any) -> dict[str, Any]:
    """A summary row as report.load_rows returns it (every column present, blanks as None)."""
    r: dict[str, Any] = {k: None for k in report.NUMERIC}
    r.update(configuration=configuration, group=group, users=users, requests_per_s=rps, failures=0.0)
    r.update(batch_policy=None, model_source=None, locust_cpu_warning=False)
    r.update(kw)
    return r


# -------------------------------------------------------------------------- bench: Locust CSV rows


@pytest.mark.parametrize(
    "requests, failures, rps, expected_rps",
    [
        (100, 0, 50.0, 50.0),  # no failures: Locust's own figure
        (100, 25, 40.0, 30.0),  # a quarter failed: 40 x 75/100
        (200, 199, 100.0, 0.5),  # fast 503s do not look like throughput
        (10, 10, 80.0, 0.0),  # all failed: zero successes a second
    ],
)
def test_read_locust_stats_counts_successes_only(tmp_path, requests, failures, rps, expected_rps):
    prefix = write_stats(
        tmp_path,
        locust_line("POST", "/predict", requests, failures, rps, 900, 1600, 1800),
        locust_line("", "Aggregated", requests, failures, rps, 910, 1650, 1850),
    )
    assert bench.read_locust_stats(prefix) == {
        "requests": float(requests),
        "failures": float(failures),
        "requests_per_s": pytest.approx(expected_rps),
        "p50_ms": 910.0,  # the Aggregated row's, not the first row's
        "p95_ms": 1650.0,
        "p99_ms": 1850.0,
    }


def test_read_locust_stats_sums_endpoints_through_aggregated_row(tmp_path):
    # two endpoints: only the Aggregated row counts, whatever order the rows come in
    prefix = write_stats(
        tmp_path,
        locust_line("POST", "/predict", 60, 6, 30.0, 100, 200, 300),
        locust_line("", "Aggregated", 100, 10, 50.0, 120, 220, 320),
        locust_line("GET", "/ready", 40, 4, 20.0, 5, 9, 12),
    )
    stats = bench.read_locust_stats(prefix)
    assert stats["requests"] == 100.0 and stats["failures"] == 10.0
    assert stats["requests_per_s"] == pytest.approx(45.0)
    assert (stats["p50_ms"], stats["p95_ms"], stats["p99_ms"]) == (120.0, 220.0, 320.0)


def test_read_locust_stats_on_real_run_file():
    # a real Locust file, kept as test data (results/cpu-2core/batched_u32 of commit 2886fe2)
    prefix = Path(__file__).resolve().parent / "data" / "locust_batched_u32"
    stats = bench.read_locust_stats(prefix)
    assert stats["requests"] == 657.0 and stats["failures"] == 0.0
    assert stats["requests_per_s"] == pytest.approx(33.41979934642109)
    assert (stats["p50_ms"], stats["p95_ms"], stats["p99_ms"]) == (910.0, 1600.0, 1800.0)


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([], {"requests": 0.0, "failures": 0.0}),  # header only: Locust never wrote a row
        ([locust_line("POST", "/predict", 5, 0, 1.0, 1, 2, 3)], {"requests": 0.0, "failures": 0.0}),  # no Aggregated
        ([locust_line("", "Aggregated", 0, 0, 0.0, 0, 0, 0)], {"requests": 0.0, "failures": 0.0}),  # no requests
    ],
)
def test_read_locust_stats_without_requests_has_counts_only(tmp_path, lines, expected):
    assert bench.read_locust_stats(write_stats(tmp_path, *lines)) == expected


# ----------------------------------------------------------------------------- bench: /metrics


def test_parse_metrics_sums_label_sets():
    text = "\n".join(
        [
            "# HELP sentimentalyzer_requests_total HTTP requests by endpoint and status",
            "# TYPE sentimentalyzer_requests_total counter",
            'sentimentalyzer_requests_total{endpoint="/predict",status="200"} 7.0',
            'sentimentalyzer_requests_total{endpoint="/predict",status="503"} 3.0',
            'sentimentalyzer_requests_total{endpoint="/ready",status="200"} 2.0',
            "# HELP sentimentalyzer_batch_size items per forward pass",
            "# TYPE sentimentalyzer_batch_size histogram",
            'sentimentalyzer_batch_size_bucket{le="1.0"} 1.0',
            'sentimentalyzer_batch_size_bucket{le="+Inf"} 4.0',
            "sentimentalyzer_batch_size_count 4.0",
            "sentimentalyzer_batch_size_sum 22.0",
            "",
        ]
    )
    m = bench.parse_metrics(text)
    assert m["sentimentalyzer_requests_total"] == 12.0
    assert m["sentimentalyzer_batch_size_count"] == 4.0
    assert m["sentimentalyzer_batch_size_sum"] == 22.0
    assert m["sentimentalyzer_batch_size_bucket"] == 5.0  # summed over le too (never read)


COUNT, SUM, REAL, COMPUTED = (
    "sentimentalyzer_batch_size_count",
    "sentimentalyzer_batch_size_sum",
    "sentimentalyzer_real_tokens_total",
    "sentimentalyzer_computed_tokens_total",
)


@pytest.mark.parametrize(
    "before, after, expected",
    [
        # 10 passes carrying 80 items over the run; 3000 of 4000 computed tokens were real
        (
            {COUNT: 5, SUM: 20, REAL: 1000, COMPUTED: 1000},
            {COUNT: 15, SUM: 100, REAL: 4000, COMPUTED: 5000},
            {"avg_batch_size": 8.0, "padding_efficiency": 0.75},
        ),
        # an empty scrape before (server just started): the run's own counters
        ({}, {COUNT: 4, SUM: 6, REAL: 50, COMPUTED: 200}, {"avg_batch_size": 1.5, "padding_efficiency": 0.25}),
        # no forward pass during the run: nothing to average, not a division by zero
        (
            {COUNT: 3, SUM: 9, REAL: 10, COMPUTED: 10},
            {COUNT: 3, SUM: 9, REAL: 10, COMPUTED: 10},
            dict.fromkeys(("avg_batch_size", "padding_efficiency")),
        ),
        # a server without these counters (naive, ceiling, a failed scrape)
        ({}, {}, {"avg_batch_size": None, "padding_efficiency": None}),
        # counters that went backwards (a restarted server): no figure rather than a negative one
        (
            {COUNT: 10, SUM: 50, REAL: 9, COMPUTED: 9},
            {COUNT: 2, SUM: 4, REAL: 1, COMPUTED: 1},
            dict.fromkeys(("avg_batch_size", "padding_efficiency")),
        ),
    ],
)
def test_metrics_delta(before, after, expected):
    assert bench.metrics_delta(before, after) == pytest.approx(expected)


# -------------------------------------------------------------------- bench: rows, ratios, cells


def test_summary_row_merges_stats_delta_and_ready():
    stats = {"requests": 100.0, "failures": 0.0, "requests_per_s": 33.5, "p50_ms": 900.0, "p95_ms": 1.0, "p99_ms": 2.0}
    delta = {"avg_batch_size": 7.5, "padding_efficiency": 0.9}
    ready = {"model_source": "stand-in", "batching": {"max_batch_size": 16, "batch_policy": "length"}}
    r = bench.summary_row(cfg("batched-b16", "bus"), 32, stats, delta, ready, True)
    assert r == {
        "configuration": "batched-b16",
        "group": "bus",
        "users": 32,
        **stats,
        **delta,
        "max_batch_size": 16,
        "batch_policy": "length",
        "model_source": "stand-in",
        "locust_cpu_warning": True,
    }
    # a server with no batching block (naive, ceiling): blanks, not a KeyError
    r = bench.summary_row(cfg("naive-threadpool", "naive"), 8, {"requests": 0.0, "failures": 0.0}, {}, {}, False)
    assert (r["max_batch_size"], r["batch_policy"], r["model_source"]) == (None, None, None)
    assert "requests_per_s" not in r


def ratio_rows() -> list[dict[str, Any]]:
    return [
        {"configuration": "http-ceiling", "group": "reference", "requests_per_s": 1000.0},
        {"configuration": "http-ceiling", "group": "reference", "requests_per_s": 1250.0},  # the best one counts
        {"configuration": "naive-threadpool", "group": "naive", "requests_per_s": 25.0},
        {"configuration": "batched", "group": "batched", "requests_per_s": 100.0},
        {"configuration": "batched-b1", "group": "bus"},  # no request completed: no requests_per_s
    ]


@pytest.mark.parametrize(
    "model_limit, expected",
    [
        # (over model limit, over HTTP ceiling) per row, in row order; references get neither
        (200.0, [(None, None), (None, None), (0.125, 0.02), (0.5, 0.08), (None, None)]),
        (None, [(None, None), (None, None), (None, 0.02), (None, 0.08), (None, None)]),  # model limit failed
        (0.0, [(None, None), (None, None), (None, 0.02), (None, 0.08), (None, None)]),  # not a division by zero
    ],
)
def test_add_ratios(model_limit, expected):
    rows = bench.add_ratios(ratio_rows(), model_limit)
    assert [(r["rps_over_model_limit"], r["rps_over_http_ceiling"]) for r in rows] == expected


def test_add_ratios_without_ceiling_row():
    rows = bench.add_ratios([r for r in ratio_rows() if r["group"] != "reference"], 50.0)
    assert [(r["rps_over_model_limit"], r["rps_over_http_ceiling"]) for r in rows] == [
        (0.5, None),
        (2.0, None),
        (None, None),
    ]


@pytest.mark.parametrize(
    "value, expected",
    [
        (657.0, 657),  # counts stay counts
        (0.0, 0),
        (33.41979934642109, 33.4198),  # rates keep 6 significant digits
        (0.123456789, 0.123457),
        (1234567.89, 1234570.0),
        (0.000123456789, 0.000123457),
        (None, ""),  # blanks
        (True, True),  # the CPU-warning flag, not 1
        (32, 32),
        ("length", "length"),
    ],
)
def test_cell(value, expected):
    got = bench._cell(value)
    assert got == expected and type(got) is type(expected)


def test_summary_round_trip_through_report(tmp_path):
    """read_locust_stats -> summary_row -> add_ratios -> write_summary -> report.load_rows keeps the figures."""
    prefix = write_stats(tmp_path, locust_line("", "Aggregated", 400, 100, 40.0, 950, 1500, 1900))
    stats = bench.read_locust_stats(prefix)
    delta = bench.metrics_delta({}, {COUNT: 10, SUM: 75, REAL: 600, COMPUTED: 700})
    ready = {"model_source": "stand-in", "batching": {"max_batch_size": 64, "batch_policy": "length"}}
    wrk_result = {"requests": 600, "duration_us": 10_000_000, "errors": {"status": 60, "timeout": 2}}
    wrk_result["latency_ms"] = {"p50": 80.5, "p95": 120.0, "p99": 150.25}
    rows = [
        bench.summary_row(cfg("http-ceiling", "reference"), 32, {**stats, "requests_per_s": 900.0}, {}, {}, False),
        {
            **bench.summary_row(cfg(), 8, stats, delta, ready, True),
            "duration_s": 10.0,
            "too_few_answers": False,
            **wrk.columns(wrk_result),
            "server_cores": 1.75,
            "server_cpu_ms_per_answer": 12.5,
            "wrk_server_cores": 1.9,
        },
    ]
    bench.write_summary(tmp_path / "summary.csv", bench.add_ratios(rows, 120.0))
    with open(tmp_path / "summary.csv", newline="") as f:
        assert next(csv.reader(f)) == bench.SUMMARY_FIELDS
    ceiling, batched = report.load_rows(tmp_path / "summary.csv")
    assert ceiling["rps_over_model_limit"] is None and ceiling["rps_over_http_ceiling"] is None
    assert batched == {
        "configuration": "batched",
        "group": "batched",
        "users": 8,
        "requests_per_s": 30.0,  # 40 x 300/400
        "p50_ms": 950.0,
        "p95_ms": 1500.0,
        "p99_ms": 1900.0,
        "requests": 400.0,
        "failures": 100.0,
        "duration_s": 10.0,
        "too_few_answers": False,
        "avg_batch_size": 7.5,
        "padding_efficiency": 0.857143,  # 600/700 at 6 digits
        "rps_over_model_limit": 0.25,
        "rps_over_http_ceiling": 0.0333333,  # 30/900 at 6 digits
        "max_batch_size": 64,
        "batch_policy": "length",
        "model_source": "stand-in",
        "locust_cpu_warning": True,
        "wrk_requests_per_s": 54.0,  # (600 - 60 non-2xx) / 10 s
        "wrk_p50_ms": 80.5,
        "wrk_p95_ms": 120.0,
        "wrk_p99_ms": 150.25,
        "wrk_requests": 540.0,
        "wrk_errors": 62.0,  # 60 status + 2 timeouts
        "server_cores": 1.75,
        "server_cpu_ms_per_answer": 12.5,
        "wrk_server_cores": 1.9,
        "wrk_server_cpu_ms_per_answer": None,  # not measured: blank, not 0
        # the protocol and cache groups' columns (tests/test_harness_groups.py): blank on a row without them
        "corpus": None,
        "corpus_duplicate_share": None,
        "unique_texts": False,
        "cache_bytes": None,
        "cache_hit_share": None,
        "cache_coalesced_share": None,
        "wrk_cache_hit_share": None,
    }


# ------------------------------------------------------------------------- bench: configurations


def namespace(profile: str = "cpu", **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "profile_name": profile,
            "users": None,
            "duration": None,
            "peers": False,
            "ops": False,
            "only": None,
            "min_answers": None,
            "max_duration_s": None,
            "wrk_users": None,
            **kw,
        }
    )


def test_configurations_quick_profile():
    names = [c.name for c in bench.configurations(bench.PROFILES["quick"], peers=False)]
    assert names == ["http-ceiling", "naive-threadpool", "batched"]


def test_configurations_references_first_and_names_unique():
    for profile in bench.PROFILES.values():
        cfgs = bench.configurations(profile, peers=False, ops=True)
        assert cfgs[0].name == "http-ceiling" and cfgs[0].group == "reference"
        assert cfgs[0].users == (max(profile.users),)  # the ceiling at the top user count only
        assert len({c.name for c in cfgs}) == len(cfgs)


def test_configurations_gpu_open_loop_paces_each_user():
    p = bench.PROFILES["gpu"]
    (open_cfg,) = [c for c in bench.configurations(p, peers=False) if c.locust_args]
    assert open_cfg.name == "batched-open2000"
    assert open_cfg.locust_args == ("--target-rps-per-user", "3.90625")  # 2000/s over 512 users
    assert open_cfg.users == (512,)


def test_configurations_ops_alternate():
    ops = [c for c in bench.configurations(bench.PROFILES["quick"], peers=False, ops=True) if c.group == "ops"]
    assert [c.name for c in ops] == ["batched-ops-off-1", "batched-ops-on-1", "batched-ops-off-2", "batched-ops-on-2"]
    assert [c.locust_args for c in ops] == [(), ("--api-key", "bench-key"), (), ("--api-key", "bench-key")]


@pytest.mark.parametrize(
    "kw, names",
    [
        ({"only": "bus"}, ["batched-b1", "batched-b16"]),  # a group name
        ({"only": "batched,http-ceiling"}, ["http-ceiling", "batched"]),  # names, in run order
        ({"profile": "quick", "only": "naive-blocking"}, ["naive-blocking"]),  # beyond the profile's own list
    ],
)
def test_select_only(kw, names):
    _, cfgs = bench.select(namespace(**kw))
    assert [c.name for c in cfgs] == names


def test_select_users_and_duration_override():
    p, cfgs = bench.select(namespace(users="4,16", duration=7.5))
    assert (p.users, p.bus_users, p.duration_s) == ((4, 16), 16, 7.5)
    by_name = {c.name: c for c in cfgs}
    assert by_name["http-ceiling"].users == (16,)
    assert by_name["batched"].users == (4, 16) and by_name["batched"].duration_s == 7.5
    assert by_name["batched-b16"].users == (16,)


def test_select_unknown_name_exits():
    with pytest.raises(SystemExit, match="unknown configuration nope"):
        bench.select(namespace(only="batched,nope"))


# --------------------------------------------------------------- bench: enough answers in every row


@pytest.mark.parametrize(
    "seconds, got, min_answers, max_s, expected",
    [
        (15, 150, 200, 120, 30),  # 150 in 15 s projects 300 in 30 s: one doubling
        (15, 75, 200, 120, 60),  # 75 in 15 s: 200 takes 40 s, 50 with the margin: 30 is short, 60 is not
        (10, 95, 200, 120, 40),  # 21 s needed, 26.3 with the margin: past 20
        (15, 0, 200, 120, 120),  # nothing answered: no rate to project, straight to the cap
        (80, 10, 200, 120, 120),  # twice 80 is past the cap: the cap
        (5, 60, 100, 10, 10),  # the --quick preset's cap
        (15, 199, 200, 120, 30),  # one short: still a doubling, never less
    ],
)
def test_longer(seconds, got, min_answers, max_s, expected):
    assert bench.longer(seconds, got, min_answers, max_s) == expected


class FakeRows:
    """A row runner whose server answers `rate` requests/s (or the counts given, one per call) and fails
    `failures`; remembers the durations it was asked for."""

    def __init__(self, rate: float = 0.0, counts: tuple[float, ...] = (), failures: float = 0.0) -> None:
        self.rate, self.counts, self.failures = rate, list(counts), failures
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> dict[str, Any]:
        self.calls.append(seconds)
        answered = self.counts.pop(0) if self.counts else self.rate * seconds
        total = answered + self.failures
        return {
            "configuration": "naive-on-demand",
            "users": 2,
            "requests": total,
            "failures": self.failures,
            "requests_per_s": answered / seconds,
        }


@pytest.mark.parametrize(
    "runner, first_s, calls, too_few",
    [
        (FakeRows(rate=20.0), 15, [15], False),  # 300 at once: one run
        (FakeRows(rate=5.0), 15, [15, 60], False),  # 75, then 300
        (FakeRows(counts=(150, 190, 250)), 15, [15, 30, 60], False),  # doubling twice
        (FakeRows(rate=1.0), 15, [15, 120], True),  # 15 projects 250 s: the cap, 120 answers, flagged
        (FakeRows(counts=(0, 0)), 15, [15, 120], True),  # nothing completed: the cap, still nothing
        (FakeRows(rate=0.0, failures=40.0), 15, [15], True),  # failing, not slow: no longer run
        (FakeRows(rate=1.0), 150, [150], True),  # a row planned past the cap runs once
        (FakeRows(counts=(100, 200)), 15, [15, 60], False),  # exactly enough (200 in 60 s)
    ],
)
def test_enough_answers(runner, first_s, calls, too_few):
    said: list[str] = []
    row = bench.enough_answers(runner, first_s, 200, 120, say=said.append)
    assert runner.calls == calls
    assert row["duration_s"] == calls[-1] and row["too_few_answers"] is too_few
    assert len(said) == len(calls) - 1  # one line each time it ran again


def test_enough_answers_keeps_the_last_run_and_says_why():
    said: list[str] = []
    row = bench.enough_answers(FakeRows(counts=(75, 310)), 15, 200, 120, say=said.append)
    assert row == {
        "configuration": "naive-on-demand",
        "users": 2,
        "requests": 310,
        "failures": 0.0,
        "requests_per_s": 310 / 60,  # the 60 s run's figures, not the 15 s run's
        "duration_s": 60,
        "too_few_answers": False,
    }
    assert said == ["  naive-on-demand u=2: 75 answers in 15 s, fewer than 200: again for 60 s"]


def test_enough_answers_counts_successes_only():
    # 300 requests, 250 of them failures: 50 answers, too few; the rate comes from the answers
    row = bench.enough_answers(FakeRows(rate=50 / 15, failures=250.0), 15, 200, 120, say=lambda _: None)
    assert row["duration_s"] == 120 and row["too_few_answers"] is False  # 400 answers in 120 s


@pytest.mark.parametrize(
    "config, expected",
    [
        (bench.Config("batched", "batched", "batched_server:app", (32,), 15), {}),
        (bench.Config("http-ceiling", "reference", "harness.bench:ceiling_app", (32,), 15), {}),
        (
            bench.Config("batched-ops-on-1", "ops", "batched_server:app", (32,), 15, locust_args=("--api-key", "k1")),
            {"Authorization": "Bearer k1"},
        ),
        # open loop: wrk can not pace its connections; a peer speaks its own protocol
        (bench.Config("open", "policy", "b:app", (32,), 15, locust_args=("--target-rps-per-user", "2")), None),
        (bench.Config("triton", "peer", "harness.peers.triton", (32,), 15), None),
    ],
)
def test_wrk_headers(config, expected):
    assert bench.wrk_headers(config) == expected


def test_profiles_answers_and_wrk_settings():
    cpu, quick, gpu = (bench.PROFILES[k] for k in ("cpu", "quick", "gpu"))
    assert (cpu.min_answers, cpu.max_duration_s, cpu.wrk_users) == (200, 120.0, 32)
    assert (gpu.min_answers, gpu.max_duration_s, gpu.wrk_users) == (200, 120.0, 32)
    assert gpu.wrk_users in gpu.users and cpu.wrk_users in cpu.users  # the 32 of each sweep
    # the smoke test lowers the bar (its summary says so) and runs wrk at its only user count
    assert (quick.min_answers, quick.max_duration_s, quick.wrk_users) == (100, 10.0, 8)
    assert quick.wrk_users in quick.users


def test_select_answers_and_wrk_overrides():
    p, _ = bench.select(namespace(profile="quick", min_answers=300, max_duration_s=60.0, wrk_users=0))
    assert (p.min_answers, p.max_duration_s, p.wrk_users) == (300, 60.0, 0)
    p, _ = bench.select(namespace(profile="quick"))
    assert (p.min_answers, p.max_duration_s, p.wrk_users) == (100, 10.0, 8)


def test_parse_args_answers_and_wrk_flags():
    corpus = str(references.ROOT / "data" / "reviews.txt")
    a = bench.parse_args(["--corpus", corpus, "--min-answers", "200", "--max-duration-s", "120", "--wrk-users", "32"])
    assert (a.min_answers, a.max_duration_s, a.wrk_users) == (200, 120.0, 32)
    a = bench.parse_args(["--corpus", corpus])
    assert (a.min_answers, a.max_duration_s, a.wrk_users) == (None, None, None)  # the profile decides
    for bad in (["--min-answers", "-1"], ["--max-duration-s", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--corpus", corpus, *bad])


def test_point_cost_counts_wrk_at_its_user_count():
    p, batched = bench.PROFILES["cpu"], bench.Config("batched", "batched", "batched_server:app", (8, 32), 15)
    peer = bench.Config("triton", "peer", "harness.peers.triton", (32,), 15)
    assert bench.point_cost(batched, p, 8) == 3 + 15 + 4
    assert bench.point_cost(batched, p, 32) == 3 + 15 + 4 + 15 + 3  # wrk runs as long as Locust did
    assert bench.point_cost(peer, p, 32) == 3 + 15 + 4


def test_describe_flags_too_few_answers_and_shows_wrk():
    r = {"configuration": "batched", "users": 32, "requests": 60.0, "failures": 3.0, "requests_per_s": 0.5}
    r.update(p50_ms=900.0, p99_ms=2000.0, duration_s=120, too_few_answers=True)
    assert bench.describe(r).endswith("3 failures -- TOO FEW ANSWERS (57 in 120 s)")
    r.update(too_few_answers=False, wrk_requests_per_s=61.25, wrk_p99_ms=800.4)
    assert bench.describe(r).endswith("3 failures; wrk 61.2 req/s, p99 800 ms")


def test_add_ratios_ignores_rows_with_too_few_answers():
    rows = [
        {"configuration": "http-ceiling", "group": "reference", "requests_per_s": 9000.0, "too_few_answers": True},
        {"configuration": "http-ceiling", "group": "reference", "requests_per_s": 1000.0},
        {"configuration": "batched", "group": "batched", "requests_per_s": 100.0},
        {"configuration": "naive-on-demand", "group": "naive", "requests_per_s": 1.0, "too_few_answers": True},
    ]
    got = [(r["rps_over_model_limit"], r["rps_over_http_ceiling"]) for r in bench.add_ratios(rows, 200.0)]
    assert got == [(None, None), (None, None), (0.5, 0.1), (None, None)]  # 100 over 1000, not over 9000


# ---------------------------------------------------------------------------- report: summary.md


def report_rows() -> list[dict[str, Any]]:
    return [
        row("http-ceiling", "reference", 32, 1500.4, p50_ms=10.0, p95_ms=20.0, p99_ms=30.0),
        row("naive-threadpool", "naive", 8, 40.0, p50_ms=180.0, p95_ms=250.0, p99_ms=300.0),
        row("naive-blocking", "naive", 8, 20.0, p50_ms=390.0, p95_ms=500.0, p99_ms=600.0),
        row(
            "batched",
            "batched",
            8,
            80.0,
            p50_ms=95.0,
            p95_ms=120.0,
            p99_ms=150.0,
            avg_batch_size=7.5,
            padding_efficiency=0.8567,
            rps_over_model_limit=0.5,
            rps_over_http_ceiling=0.05332,
            max_batch_size=64,
            batch_policy="length",
        ),
        row("batched", "batched", 1, 10.0, p50_ms=100.0, p95_ms=110.0, p99_ms=1234.7),  # no naive row at 1 user
        row(
            "batched-b1",
            "bus",
            8,
            30.0,
            p50_ms=260.0,
            p95_ms=300.0,
            p99_ms=320.0,
            failures=3.0,
            max_batch_size=1,
            batch_policy="length",
            locust_cpu_warning=True,
        ),
        row("batched-x2", "scale", 8, 150.0, p50_ms=50.0, p95_ms=60.0, p99_ms=70.0),
    ]


def test_table_formats_each_column():
    lines = report.table(report_rows())
    assert lines[0].startswith("| configuration | users | req/s |") and lines[1].startswith("|---|---:|")
    assert len(lines) == 2 + len(report_rows())
    assert lines[2] == "| http-ceiling | 32 | 1,500.4 | 10 | 20 | 30 | 0 |  |  |  |  |"
    assert lines[5] == "| batched | 8 | 80.0 | 95 | 120 | 150 | 0 | 7.5 | 0.86 | 0.50 | 0.053 |"
    assert lines[6] == "| batched | 1 | 10.0 | 100 | 110 | 1,235 | 0 |  |  |  |  |"
    assert lines[7] == "| batched-b1 | 8 | 30.0 | 260 | 300 | 320 | 3 |  |  |  |  |"


def test_ratios_batched_over_each_naive_mode():
    assert report.ratios(report_rows())[2:] == [
        "| 8 | naive-threadpool | 2.00x | 0.50 |",  # 80/40, 150/300
        "| 8 | naive-blocking | 4.00x | 0.25 |",  # 80/20, 150/600
    ]


RATIO_HEAD = ["| users | versus | throughput ratio | p99 ratio (batched / other) |", "|---:|---|---:|---:|"]
NO_RATIO = ["No user count has both a batched and a naive row in this run."]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([row("batched", "batched", 8, 80.0, p99_ms=1.0)], NO_RATIO),
        # a naive row that served nothing (0 req/s) gives no ratio rather than a division by zero
        (
            [row("batched", "batched", 8, 80.0, p99_ms=1.0), row("naive-blocking", "naive", 8, 0.0, p99_ms=5.0)],
            NO_RATIO,
        ),
        # a naive row with no requests completed (blank req/s) is not found at all
        ([row("batched", "batched", 8, 80.0, p99_ms=1.0), row("naive-blocking", "naive", 8, None)], NO_RATIO),
        (
            [row("batched", "batched", 4, 30.0, p99_ms=90.0), row("litserve", "peer", 4, 20.0, p99_ms=120.0)],
            [*RATIO_HEAD, "| 4 | litserve | 1.50x | 0.75 |"],
        ),
    ],
)
def test_ratios_edge_cases(rows, expected):
    assert report.ratios(rows) == expected


def test_losses_on_report_rows():
    assert report.losses(report_rows()) == [
        "batched-b1 (MAX_BATCH_SIZE 1, policy length) at 8 users served fewer requests/s than naive-threadpool: "
        "30.0 vs 40.0.",
        "batched-b1 at 8 users had 3 failed requests (see batched-b1_u8_failures.csv).",
    ]


NAIVE_1 = row("naive-threadpool", "naive", 1, 12.0, p50_ms=80.0)


@pytest.mark.parametrize(
    "rows, expected",
    [
        # batched loses on both throughput and median latency at 1 user
        (
            [NAIVE_1, row("batched", "batched", 1, 10.0, p50_ms=100.4)],
            [
                "At 1 user the batched server served fewer requests/s than naive-threadpool: 10.0 vs 12.0.",
                "At 1 user its median latency was higher than naive-threadpool's: 100 ms vs 80 ms.",
            ],
        ),
        # compared, and batched did not lose
        (
            [NAIVE_1, row("batched", "batched", 1, 12.0, p50_ms=80.0)],
            ["In this run the batched server did not lose to a naive mode on throughput or median latency"],
        ),
        # no shared user count
        (
            [NAIVE_1, row("batched", "batched", 8, 5.0, p50_ms=900.0)],
            ["No batched row shares a user count with a naive row in this run: nothing to compare."],
        ),
        # a policy row compared with a naive row counts as a comparison even without a batched row
        (
            [NAIVE_1, row("batched-pad", "policy", 1, 20.0, p50_ms=50.0)],
            ["In this run the batched server did not lose to a naive mode on throughput or median latency"],
        ),
    ],
)
def test_losses(rows, expected):
    got = report.losses(rows)
    assert len(got) == len(expected)
    assert all(g.startswith(e) for g, e in zip(got, expected, strict=True))


def test_scaling_line():
    assert report.scaling(report_rows()) == [
        "## Several processes (uvicorn --workers N, one model replica each)",
        "",
        "- 2 processes at 8 users: 150.0 req/s = 0.94 x 2 x one process (80.0 req/s)",  # 150 / (2 x 80)
        "",
    ]
    assert report.scaling([r for r in report_rows() if r["group"] != "scale"]) == []


ENV = {
    "profile": "cpu",
    "date": "2024-05-01",
    "command": "python -m harness.bench",
    "device": "cpu",
    "dtype": "fp32",
    "cpu": {"model_name": "Test CPU", "cores": 2, "flags": ["avx2", "fma"]},
    "model_id": "distilbert-sst2",
    "model_source": "hub",
    "corpus": "data/reviews.txt",
    "batching": {"max_batch_size": 64},
    "git_commit": "abc123",
    "git_dirty": True,
    "model_limit": {
        "texts": 300,
        "mean_tokens": 42.3,
        "by_batch_size": {"8": {}, "16": {}},
        "bucketed": {"samples_per_s": 160.0, "batch_size": 16},
        "random": {"samples_per_s": 120.5, "batch_size": 8},
    },
    "load_average_at_start": 1.25,
    "servers": {"batched": {"model_source": "hub"}, "litserve": {"error": "never got ready"}},
}


def test_markdown_on_hand_built_rows():
    md = report.markdown(report_rows(), ENV)
    lines = md.splitlines()
    assert lines[0] == "# Benchmark: cpu profile, 2024-05-01"
    for expected in [
        "- device: cpu, dtype fp32; CPU: Test CPU, 2 cores, flags avx2 fma",
        "- git: abc123 (dirty)",
        "- model limit (in-process tokenize + forward, no HTTP; corpus of 300 texts, mean 42.3 tokens; best of "
        "batch sizes 8, 16): 160.0 samples/s length-bucketed (batch 16), 120.5 samples/s random-padded (batch 8)",
        "- HTTP ceiling (no-model endpoint, same FastAPI + uvicorn stack): 1,500 req/s",
        "| batched | 8 | 80.0 | 95 | 120 | 150 | 0 | 7.5 | 0.86 | 0.50 | 0.053 |",
        "- 2 processes at 8 users: 150.0 req/s = 0.94 x 2 x one process (80.0 req/s)",
        "| 8 | naive-threadpool | 2.00x | 0.50 |",
        "- batched-b1 at 8 users had 3 failed requests (see batched-b1_u8_failures.csv).",
        "- configuration that did not run: litserve: never got ready",
    ]:
        assert expected in lines
    assert any(line.startswith("- The machine's 1-minute load average was 1.25 (2 cores)") for line in lines)
    assert any(line.startswith("- Locust warned that its CPU was above 90% in: batched-b1 u=8;") for line in lines)
    order = [lines.index(h) for h in ("## Results", "## Batched versus naive", "## Where batching loses")]
    assert order == sorted(order) and md.endswith("\n")


def test_markdown_without_ceiling_or_limit():
    rows = [r for r in report_rows() if r["group"] != "reference"]
    md = report.markdown(rows, {**ENV, "model_limit": None, "load_average_at_start": 0.2})
    assert "- HTTP ceiling: not measured in this run" in md.splitlines()
    assert "- model limit: not measured in this run (see logs/model_limit.log)" in md.splitlines()
    assert "load average" not in md


# ------------------------------------------------------------- report: too few answers, wrk beside


def thin_rows() -> list[dict[str, Any]]:
    """report_rows plus rows that stayed short of the run's 200 answers at the 120 s cap."""
    short = {"too_few_answers": True, "duration_s": 120.0, "p50_ms": 9876.0, "p95_ms": 9543.0, "p99_ms": 9321.0}
    return [
        *report_rows(),
        row("naive-on-demand", "naive", 2, 3.21, requests=150.0, failures=6.0, **short),
        # were they results, batched would lose to naive-threadpool at 32 users: neither may be compared
        row("naive-threadpool", "naive", 32, 99.9, requests=120.0, **short),
        row("batched", "batched", 32, 6.54, requests=60.0, **short),
    ]


THIN_ENV = {**ENV, "answers": {"min_answers": 200, "max_duration_s": 120.0, "standard": 200, "set_by": "x"}}


def test_table_lists_a_row_with_too_few_answers_without_figures():
    lines = report.table(thin_rows())
    assert len(lines) == 2 + len(thin_rows())
    assert lines[-3] == "| naive-on-demand | 2 | too few answers (144 in 120 s) |  |  |  | 6 |  |  |  |  |"
    assert lines[-1] == "| batched | 32 | too few answers (60 in 120 s) |  |  |  | 0 |  |  |  |  |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_markdown_quotes_no_figure_of_a_row_with_too_few_answers():
    md = report.markdown(thin_rows(), THIN_ENV)
    for figure in ("3.2", "99.9", "6.5", "9,876", "9876", "9,543", "9,321"):
        assert figure not in md  # not in a table, a ratio, a loss, a scaling line
    assert "| naive-on-demand | 2 | too few answers (144 in 120 s) |" in md
    assert (
        "- Fewer than 200 answers even at the longest run, so no result: naive-on-demand u=2: too few answers "
        "(144 in 120 s); naive-threadpool u=32: too few answers (120 in 120 s); batched u=32: too few answers "
        "(60 in 120 s). Their figures stay in summary.csv (too_few_answers True) and nowhere above."
    ) in md.splitlines()

    # between the table and the caveats the report is what it is without them
    def middle(text: str) -> str:
        return text.split("## Batched versus naive")[1].split("## Caveats")[0]

    assert middle(md) == middle(report.markdown(report_rows(), THIN_ENV))


def test_markdown_a_ceiling_with_too_few_answers_is_no_ceiling():
    rows = [row("http-ceiling", "reference", 32, 900.0, requests=150.0, too_few_answers=True, duration_s=120.0)]
    assert "- HTTP ceiling: not measured in this run" in report.markdown(rows, THIN_ENV).splitlines()


@pytest.mark.parametrize(
    "answers, expected",
    [
        (None, []),  # a run from before the rule
        (
            {"min_answers": 200, "max_duration_s": 120.0, "standard": 200, "set_by": "the cpu profile"},
            [
                "- every result holds at least 200 answers (successful responses): a row with fewer ran again for "
                "longer, up to 120 s; one still short is listed as too few answers, with no figure quoted"
            ],
        ),
        (
            {"min_answers": 100, "max_duration_s": 10.0, "standard": 200, "set_by": "the quick profile"},
            [
                "- every result holds at least 100 answers (successful responses): a row with fewer ran again for "
                "longer, up to 10 s; one still short is listed as too few answers, with no figure quoted. 100 is "
                "below the standard 200, set by the quick profile: a smoke test, not a measurement"
            ],
        ),
    ],
)
def test_answers_rule_in_the_header(answers, expected):
    env = {**ENV, "answers": answers}
    assert report.answers_rule(env) == expected
    assert all(line in report.markdown(report_rows(), env).splitlines() for line in expected)


WRK_HEAD = [
    "## Locust beside wrk (32 users, POST /predict, closed loop)",
    "",
    "| configuration | Locust req/s | wrk req/s | wrk / Locust | Locust p50 ms | wrk p50 ms | Locust p99 ms "
    "| wrk p99 ms | wrk errors | server cores (wrk) | server CPU ms / answer (wrk) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def wrk_row(name: str, rps: float, wrk_rps: float | None, wrk_requests: float | None, **kw: Any) -> dict[str, Any]:
    r = row(name, "batched", 32, rps, p50_ms=50.0, p99_ms=120.0, requests=900.0, duration_s=15.0)
    r.update(wrk_requests_per_s=wrk_rps, wrk_requests=wrk_requests, wrk_p50_ms=30.0, wrk_p99_ms=95.6, wrk_errors=2.0)
    return {**r, **kw}


@pytest.mark.parametrize(
    "rows, wrk_env, expected",
    [
        ([wrk_row("batched", 60.0, 90.0, 1800.0)], None, []),  # a run from before wrk
        ([wrk_row("batched", 60.0, 90.0, 1800.0)], {"users": 0, "version": "wrk 4.1.0"}, []),  # --wrk-users 0
        (
            [wrk_row("batched", 60.0, None, None)],
            {"users": 32, "version": None},
            [*WRK_HEAD[:2], "wrk not installed: no wrk figures in this run.", ""],
        ),
        (
            [
                wrk_row("batched", 60.0, 90.0, 1800.0, wrk_server_cores=1.834, wrk_server_cpu_ms_per_answer=20.38),
                wrk_row("batched", 20.0, 40.0, 800.0, users=8),  # not wrk's user count
                wrk_row("litserve", 10.0, None, None, group="peer"),  # wrk does not speak a peer's protocol
                wrk_row("batched-b1", 30.0, None, None, wrk_errors=None),  # wrk failed
                wrk_row("batched-pad", 5.0, 4.0, 150.0),  # wrk's answers short of the run's minimum
                wrk_row("naive-blocking", 1.0, 80.0, 1600.0, too_few_answers=True, requests=120.0, duration_s=120.0),
            ],
            {"users": 32, "version": "wrk 4.1.0 [epoll]"},
            [
                *WRK_HEAD,
                "| batched | 60.0 | 90.0 | 1.50 | 50 | 30 | 120 | 96 | 2 | 1.83 | 20.38 |",
                "| batched-b1 | 30.0 | no wrk result |  | 50 |  | 120 |  |  |  |  |",
                "| batched-pad | 5.0 | too few answers (150 in 15 s) |  | 50 |  | 120 |  | 2 |  |  |",
                "| naive-blocking | too few answers (120 in 120 s) | 80.0 |  |  | 30 |  | 96 | 2 |  |  |",
                "",
            ],
        ),
        (
            [wrk_row("batched", 20.0, 40.0, 800.0, users=8)],
            {"users": 32, "version": "wrk 4.1.0"},
            [*WRK_HEAD[:2], "No row at 32 users in this run.", ""],
        ),
    ],
)
def test_wrk_section(rows, wrk_env, expected):
    env = {**THIN_ENV, "wrk": wrk_env}
    assert report.wrk_section(rows, env) == expected
    md = report.markdown(rows, env).splitlines()
    assert all(line in md for line in expected if line)


def test_report_main_on_a_run_with_too_few_answers(tmp_path):
    """bench's summary.csv and environment.json of a run with a short row -> summary.md and plots without it."""
    ready = {"model_source": "stand-in", "batching": {"max_batch_size": 64, "batch_policy": "length"}}
    stats = {"requests": 900.0, "failures": 0.0, "requests_per_s": 60.0, "p50_ms": 50.0, "p95_ms": 90.0}
    rows = [
        {**bench.summary_row(cfg(), 32, {**stats, "p99_ms": 120.0}, {}, ready, False), "duration_s": 15.0},
        {**bench.summary_row(cfg("naive-threadpool", "naive"), 32, {**stats, "requests": 150.0}, {}, {}, False)},
    ]
    done = {"requests": 1500, "duration_us": 15e6, "errors": {}, "latency_ms": {"p50": 20, "p95": 30, "p99": 40}}
    rows[0].update(too_few_answers=False, **wrk.columns(done))
    rows[1].update(duration_s=120.0, too_few_answers=True, **wrk.columns(None))
    bench.write_summary(tmp_path / "summary.csv", bench.add_ratios(rows, 100.0))
    env = {**THIN_ENV, "wrk": {"users": 32, "version": "wrk 4.1.0"}, "servers": {}, "load_average_at_start": 0.0}
    (tmp_path / "environment.json").write_text(json.dumps(env))
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "| naive-threadpool | 32 | too few answers (150 in 120 s) |" in md
    assert "| batched | 60.0 | 100.0 |" in md  # 1500 answers over 15 s beside Locust's 60.0
    assert (tmp_path / "throughput_vs_users.png").stat().st_size > 0


# ------------------------------------------------------------------------------ overload: pct, ms

ONE_TO_TEN = [float(v) for v in range(1, 11)]


@pytest.mark.parametrize(
    "values, q, expected",
    [
        ([], 50, None),  # nothing measured
        ([], 99, None),
        ([7.0], 0, 7.0),  # one item is every percentile
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([7.0], 100, 7.0),
        ([3.0, 1.0, 2.0], 50, 2.0),  # unsorted input: the median of 1, 2, 3
        ([5.0, 5.0, 5.0, 1.0], 99, 5.0),
        (ONE_TO_TEN, 0, 1.0),  # the least value
        (ONE_TO_TEN, 100, 10.0),  # the greatest, not an IndexError
        (ONE_TO_TEN, 99, 10.0),  # 9.9 values at or below: the 10th
        (ONE_TO_TEN, 95, 10.0),
        (ONE_TO_TEN, 55, 6.0),  # 5.5 values: the 6th
        (ONE_TO_TEN, 15, 2.0),
        (list(reversed(ONE_TO_TEN)), 85, 9.0),
    ],
)
def test_pct(values, q, expected):
    before = list(values)
    assert overload.pct(values, q) == expected
    assert values == before  # sorts a copy


ONE_TO_HUNDRED = [float(v) for v in range(1, 101)]


@pytest.mark.parametrize(
    "values, q, expected",
    [
        (ONE_TO_HUNDRED, 99, 99.0),  # 99 of 100 values are at or below 99
        (ONE_TO_HUNDRED, 50, 50.0),
        (ONE_TO_TEN, 50, 5.0),  # 5 of 10 at or below 5
        (ONE_TO_TEN, 90, 9.0),
        ([1.0, 2.0], 50, 1.0),  # half the values at or below 1
        ([1.0, 2.0, 3.0, 4.0], 25, 1.0),
    ],
)
def test_pct_exact_quantile_boundaries(values, q, expected):
    assert overload.pct(values, q) == expected


def test_pct_is_monotone_and_hits_every_rank():
    got = [overload.pct(ONE_TO_HUNDRED, q) for q in range(1, 100)]
    assert len(set(got)) == len(got)  # one rank per whole percent on 100 distinct values


@pytest.mark.parametrize("seconds, expected", [(None, None), (0.0, 0.0), (0.0123456, 12.3), (1.25, 1250.0)])
def test_ms(seconds, expected):
    assert overload.ms(seconds) == expected


# --------------------------------------------------------------------------- overload: summaries


def flood_run() -> dict[str, Any]:
    return {
        "results": [  # (sent at, latency, status or error name, Retry-After, the server's latency of a 200)
            (0.00, 0.010, 200, None, 0.008),
            (0.05, 0.030, 200, None, 0.012),
            (0.10, 0.020, 200, None, 0.004),
            (0.20, 0.001, 503, "2", None),
            (0.25, 0.004, 503, "3", None),
            (0.30, 0.002, 503, "3", None),
            (0.35, 0.005, 503, "soon", None),  # not a number of seconds: left out of the Retry-After figures
            (0.40, 0.003, 503, None, None),
            (0.50, 0.500, "ReadTimeout", None, None),
        ],
        "not_sent": 4,
        "ended_s": 0.6,
        "drained_s": 0.2,
        "recovered_s": 0.3,
        "probe_counts": {"200": 3},
        "probes": [],
    }


def test_summarize_flood():
    samples = [{"t": float(t), "rss_mb": mb} for t, mb in enumerate([100.0, 101.0, 102.0, 103.0, 250.0])]
    served = {
        "requests:/predict,200": 6.0,  # 3 flood answers + 3 probes
        "requests:/predict,503": 5.0,
        "requests:/ready,200": 40.0,  # the watcher's polls: not /predict
        "dropped:queue_full": 5.0,
        "passes:sum": 0.5,  # four forward passes took half a second in all
        "passes:count": 4.0,
        # admission's accuracy, cumulative by bound: 2 answered by 0.75 of the prediction, 6 by 1.0...
        "admission:0.75": 2.0,
        "admission:1": 6.0,
        "admission:1.5": 9.0,
        "admission:inf": 10.0,
    }
    s = overload.summarize(flood_run(), samples, 3.0, served)
    assert s == {
        "admission": {
            "admitted_behind_a_queue": 10,
            "later_than_predicted_pct": 40.0,  # 4 of 10 above 1.0
            "ratio_p50_at_most": 1.0,
            "ratio_p90_at_most": 1.5,
        },
        "sent": 9,
        "not_sent_client_cap": 4,
        "status_counts": {"200": 3, "503": 5, "ReadTimeout": 1},
        "only_200_503_504": False,  # the client's timeout is not one of the three
        "ok_per_s": 1.0,  # 3 over 3 s
        "latency_ms": {
            "200": {"p50": 20.0, "p99": 30.0, "max": 30.0},
            "503": {"p50": 3.0, "p99": 5.0, "max": 5.0},
            "ReadTimeout": {"p50": 500.0, "p99": 500.0, "max": 500.0},
        },
        "server_latency_ms_200": {"p50": 8.0, "p99": 12.0},  # the 200s' own figures, not the client's
        "passes": 4,
        "pass_ms_mean": 125.0,
        "retry_after_counts": {2: 1, 3: 2},
        "retry_after_median": 3,
        "answered_s": 0.4,  # last answer at 0.5 + 0.5, the flood ended at 0.6
        "server_minus_client": {"200": 0, "503": 0, "ReadTimeout": -1},
        "rss_mb": {"first_third_max": 100.0, "last_third_max": 103.0, "peak": 103.0},  # samples up to t = 3 s
        "ended_s": 0.6,
        "drained_s": 0.2,
        "recovered_s": 0.3,
        "probe_counts": {"200": 3},
        "probes": [],
    }


def test_summarize_all_allowed_statuses():
    run = flood_run()
    run["results"] = [r for r in run["results"] if r[2] != "ReadTimeout"] + [(0.55, 2.0, 504, None, None)]
    s = overload.summarize(run, [], 2.0, {})
    assert s["only_200_503_504"] is True
    assert s["answered_s"] == 1.95  # 0.55 + 2.0 - 0.6
    assert s["rss_mb"] == {"first_third_max": None, "last_third_max": None, "peak": None}
    assert s["server_minus_client"] == {"200": -6, "503": -5, "504": -1}  # counted by no server
    assert s["admission"] is None  # nothing admitted behind a queue: no prediction to judge


def test_admission_accuracy_reads_the_bucket_holding_each_quantile() -> None:
    late = {"admission:1": 1.0, "admission:2": 2.0, "admission:inf": 10.0}  # most beyond 2x the prediction
    assert overload.admission_accuracy(late) == {
        "admitted_behind_a_queue": 10,
        "later_than_predicted_pct": 90.0,
        "ratio_p50_at_most": float("inf"),
        "ratio_p90_at_most": float("inf"),
    }
    on_time = {"admission:0.5": 9.0, "admission:0.75": 9.0, "admission:inf": 9.0}  # 0.25 unchanged: absent
    assert overload.admission_accuracy(on_time) == {
        "admitted_behind_a_queue": 9,
        "later_than_predicted_pct": 0.0,
        "ratio_p50_at_most": 0.5,
        "ratio_p90_at_most": 0.5,
    }


def soak_results() -> list[tuple]:
    return [
        (0.0, 0.100, 200, None),
        (5.0, 0.300, 200, None),
        (7.0, 0.200, 200, None),
        (9.99, 0.200, 503, "1"),  # a failure: counted, not in the latency figures
        (10.0, 0.400, 200, None),  # on a window boundary: the later window
        (25.0, 0.050, "ReadTimeout", None),
        (59.9, 0.700, 200, None),
    ]


def soak_samples() -> list[dict[str, Any]]:
    return [{"t": t, "rss_mb": 500.0 + t} for t in (0.0, 9.0, 10.0, 31.0, 59.0, 60.0)]


def test_soak_windows_short_run():
    # under 180 s: six windows of seconds / 6 = 10 s
    assert overload.soak_windows(soak_results(), soak_samples(), 60.0) == [
        {"from_s": 0, "requests": 4, "failures": 1, "p50_ms": 200.0, "p99_ms": 300.0, "rss_mb": 509.0},
        {"from_s": 10, "requests": 1, "failures": 0, "p50_ms": 400.0, "p99_ms": 400.0, "rss_mb": 510.0},
        {"from_s": 20, "requests": 1, "failures": 1, "p50_ms": None, "p99_ms": None, "rss_mb": None},
        {"from_s": 30, "requests": 0, "failures": 0, "p50_ms": None, "p99_ms": None, "rss_mb": 531.0},
        {"from_s": 40, "requests": 0, "failures": 0, "p50_ms": None, "p99_ms": None, "rss_mb": None},
        {"from_s": 50, "requests": 1, "failures": 0, "p50_ms": 700.0, "p99_ms": 700.0, "rss_mb": 559.0},
    ]


@pytest.mark.parametrize(
    "seconds, width",
    [
        (60.0, 10.0),  # short runs: six windows
        (120.0, 20.0),
        (180.0, 60.0),  # from 180 s on: one a minute
        (600.0, 60.0),
        (650.0, 60.0),  # a last, partial window from 600 s
        (200.0, 60.0),  # round(200 / 60) windows once dropped [180, 200)
        (630.0, 60.0),
    ],
)
def test_soak_windows_cover_the_whole_run(seconds, width):
    """Every request sent during the run lands in exactly one window, and windows start `width` apart."""
    results = [(t / 4, 0.010, 200 if t % 7 else 503, None) for t in range(int(seconds * 4))]
    windows = overload.soak_windows(results, [], seconds)
    assert [w["from_s"] for w in windows] == [round(i * width) for i in range(len(windows))]
    assert sum(w["requests"] for w in windows) == len(results)
    assert sum(w["failures"] for w in windows) == sum(1 for r in results if r[2] != 200)


# -------------------------------------------------------------------------- overload: verdicts

FLOOD_CHECKS = [
    "only 200, 503 and 504",
    "at most 1 % of answers are 504 (refused at the door instead)",
    "503s at once (median < 50 ms)",
    "every answer the server counted reached a client",
    "503s in milliseconds (p99 < 50 ms)",
    "Retry-After tracks the drain (median within 1 s of the last flood answer)",
    "p99 of 200s under REQUEST_TIMEOUT_MS",
    "p99 of 200s within REQUEST_TIMEOUT_MS + one pass (the flood's mean pass)",
    "normal answers within 1 s of the flood's end",
    "memory flat (last third <= first third + 5 %)",
]


def good_flood() -> dict[str, Any]:
    return {
        "only_200_503_504": True,
        "status_counts": {"200": 500, "503": 495, "504": 5},
        "server_minus_client": {"200": 0, "503": 0},
        "latency_ms": {"200": {"p99": 1500.0}, "503": {"p50": 2.0, "p99": 3.0}},
        "pass_ms_mean": 100.0,
        "retry_after_median": 2,
        "answered_s": 1.5,
        "recovered_s": 0.8,
        "rss_mb": {"first_third_max": 200.0, "last_third_max": 209.0},
    }


def test_flood_verdicts_all_pass():
    v = overload.verdicts(good_flood(), soak=False, timeout_ms=2000.0)
    assert list(v) == FLOOD_CHECKS and all(v[k] is True for k in FLOOD_CHECKS)


def _set(path: str, value: Any):
    def change(r: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            r = r[p]
        if value is KeyError:
            del r[last]
        else:
            r[last] = value

    return change


@pytest.mark.parametrize(
    "change, timeout_ms, failing",
    [
        (_set("only_200_503_504", False), 2000.0, FLOOD_CHECKS[0]),
        (_set("status_counts.504", 11), 2000.0, FLOOD_CHECKS[1]),  # 11 of 1006 answers: over 1 %
        (_set("status_counts", {}), 2000.0, FLOOD_CHECKS[1]),  # no answer at all
        (_set("latency_ms.503.p50", 50.0), 2000.0, FLOOD_CHECKS[2]),  # 50 is not under 50
        (_set("server_minus_client.503", 1), 2000.0, FLOOD_CHECKS[3]),  # an answer lost on the way
        (_set("server_minus_client.200", -1), 2000.0, FLOOD_CHECKS[3]),  # one the server never counted
        (_set("latency_ms.503.p99", 50.0), 2000.0, FLOOD_CHECKS[4]),  # 50 is not under 50
        (_set("retry_after_median", None), 2000.0, FLOOD_CHECKS[5]),
        (_set("retry_after_median", 3), 2000.0, FLOOD_CHECKS[5]),  # 1.5 s from 1.5
        (_set("retry_after_median", 0), 2000.0, FLOOD_CHECKS[5]),
        (_set("latency_ms.200.p99", 2000.0), 2000.0, FLOOD_CHECKS[6]),  # at the timeout, not under
        (_set("latency_ms.200.p99", 2100.0), 2000.0, FLOOD_CHECKS[6]),  # timeout + one pass: that bound holds
        (_set("latency_ms.200.p99", 2100.1), 2000.0, FLOOD_CHECKS[6:8]),  # and past it
        (_set("pass_ms_mean", None), 2000.0, FLOOD_CHECKS[7]),  # no pass measured: no bound to hold
        (_set("latency_ms.200", KeyError), 2000.0, FLOOD_CHECKS[6:8]),  # no 200 at all
        (_set("latency_ms.200.p99", 1.0), None, FLOOD_CHECKS[6:8]),  # no timeout to compare with
        (_set("recovered_s", None), 2000.0, FLOOD_CHECKS[8]),  # never recovered
        (_set("recovered_s", 1.01), 2000.0, FLOOD_CHECKS[8]),
        (_set("rss_mb.last_third_max", 211.0), 2000.0, FLOOD_CHECKS[9]),  # 5.5 % up
    ],
)
def test_flood_verdicts_each_check_fails_alone(change, timeout_ms, failing):
    r = copy.deepcopy(good_flood())
    change(r)
    v = overload.verdicts(r, soak=False, timeout_ms=timeout_ms)
    failing = {failing} if isinstance(failing, str) else set(failing)
    assert v == {k: k not in failing for k in FLOOD_CHECKS}


@pytest.mark.parametrize(
    "change",
    [
        _set("retry_after_median", 2.5),  # exactly 1 s from the last answer
        _set("retry_after_median", 0.5),
        _set("recovered_s", 1.0),  # exactly 1 s
        _set("rss_mb.last_third_max", 150.0),  # memory went down
        _set("latency_ms.200.p99", 1999.9),
        _set("status_counts.504", 10),  # 10 of 1005 answers: under 1 %
    ],
)
def test_flood_verdicts_boundaries_that_pass(change):
    r = copy.deepcopy(good_flood())
    change(r)
    assert all(overload.verdicts(r, soak=False, timeout_ms=2000.0).values())


SOAK_CHECKS = [
    "zero failures",
    "p99 flat (every window <= 1.5x the median window)",
    "memory flat (RSS of the last window within 2 % of the first)",
]


def soak(p99s: list[float | None], rss: list[float], failures: int = 0, not_sent: int = 0) -> dict[str, Any]:
    return {
        "windows": [{"p99_ms": p, "rss_mb": m} for p, m in zip(p99s, rss, strict=True)],
        "failures": failures,
        "not_sent": not_sent,
    }


@pytest.mark.parametrize(
    "r, expected",
    [
        (soak([100.0, 110.0, 120.0], [500.0, 505.0, 508.0]), (True, True, True)),
        (soak([100.0, 110.0, 165.0], [500.0, 505.0, 508.0]), (True, True, True)),  # 1.5 x the median 110
        (soak([100.0, 110.0, 165.1], [500.0, 505.0, 508.0]), (True, False, True)),
        (soak([300.0, 110.0, 100.0], [500.0, 505.0, 508.0]), (True, False, True)),  # a slow first window too
        (soak([100.0, 110.0, 120.0, 130.0], [500.0, 500.0, 500.0, 500.0]), (True, True, True)),  # median 120
        (soak([100.0, 110.0, 120.0], [500.0, 505.0, 510.0]), (True, True, True)),  # 2 % up: the bound
        (soak([100.0, 110.0, 120.0], [500.0, 505.0, 510.5]), (True, True, False)),  # 2.1 % up
        (soak([100.0, 110.0, 120.0], [500.0, 495.0, 489.5]), (True, True, False)),  # 2.1 % down: not flat either
        (soak([100.0, 110.0, 120.0], [500.0, 900.0, 495.0]), (True, True, True)),  # first and last only
        (soak([100.0, 110.0, 120.0, None], [500.0, 505.0, 508.0, 900.0]), (True, True, True)),  # empty window
        (soak([100.0, 110.0, 120.0], [500.0, 505.0, 508.0], failures=1), (False, True, True)),
        (soak([100.0, 110.0, 120.0], [500.0, 505.0, 508.0], not_sent=2), (False, True, True)),
        (soak([None, None], [500.0, 500.0]), (True, False, False)),  # no 200 in any window: nothing to judge
    ],
)
def test_soak_verdicts(r, expected):
    v = overload.verdicts(r, soak=True, timeout_ms=None)
    assert list(v) == SOAK_CHECKS
    assert tuple(v.values()) == expected


def test_overload_markdown_lists_verdicts():
    r = {
        "ready": {"model_id": "m", "model_source": "stand-in", "device": "cpu", "dtype": "fp32", "batching": {}},
        "settings": {"MAX_QUEUE": "64"},
        "capacity_per_s": 50.0,
        "target_per_s": 400.0,
        "generator_cpu_s": 3.5,
        "windows": [{"from_s": 0, "requests": 9, "failures": 0, "p50_ms": 1.5, "p99_ms": 2.5, "rss_mb": 300.0}],
        "verdicts": {"zero failures": True, "memory flat": False},
    }
    env = {
        "date": "2024-05-01",
        "command": "python -m harness.overload --soak",
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "cpu": {"model_name": "Test CPU", "cores": 2, "flags": ["avx2"]},
        "python": "3.11.9",
        "versions": {"torch": "2.3.0"},
    }
    md = overload.markdown({"soak": True, "seconds": 60.0, "args": {}, "environment": env, "servers": {"batched": r}})
    lines = md.splitlines()
    assert lines[0] == "# Soak run, 2024-05-01"
    assert "at git 0123456789; Test CPU (2 cores, avx2); Python 3.11.9, torch 2.3.0." in lines[2]
    assert "| 0 | 9 | 0 | 1.5 | 2.5 | 300.0 |" in lines
    assert "- PASS: zero failures" in lines and "- FAIL: memory flat" in lines


# ----------------------------------------------------------------------------- references: corpus


@pytest.mark.parametrize(
    "content, expected",
    [
        ("one\ntwo\n", ["one", "two"]),
        ("one\ntwo", ["one", "two"]),  # no final newline
        ("\n\none\n\n\ntwo\n\n", ["one", "two"]),  # blank lines anywhere
        ("  one  \n\ttwo\t\n   \n\t\n", ["one", "two"]),  # surrounding whitespace; whitespace-only lines
        ("one\r\ntwo\r\n", ["one", "two"]),  # Windows line ends
        ("a  b\tc\n", ["a  b\tc"]),  # inner whitespace kept
        ("Très bon film 🎬\n日本語のレビュー\nnaïve café\n", ["Très bon film 🎬", "日本語のレビュー", "naïve café"]),
        ("\u00a0padded\u00a0\n\u3000\n", ["padded"]),  # non-breaking and ideographic spaces count as blank
        ("", []),
    ],
)
def test_read_corpus(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content.encode("utf-8"))
    assert references.read_corpus(str(path)) == expected


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\x0c"])
def test_read_corpus_one_text_a_line(tmp_path, separator):
    path = tmp_path / "corpus.txt"
    path.write_bytes(f"first half{separator}second half\nnext\n".encode())
    assert references.read_corpus(str(path)) == [f"first half{separator}second half", "next"]


# -------------------------------------------------------------------------- references: batches

LENGTHS = [5, 3, 9, 1, 7, 2, 8]  # sorted by length the indices run 3, 5, 1, 0, 4, 6, 2


@pytest.mark.parametrize(
    "lengths, size, expected",
    [
        (LENGTHS, 3, {(3, 5, 1), (0, 4, 6), (2,)}),
        (LENGTHS, 7, {(3, 5, 1, 0, 4, 6, 2)}),
        (LENGTHS, 10, {(3, 5, 1, 0, 4, 6, 2)}),  # one batch, smaller than the size
        (LENGTHS, 1, {(i,) for i in range(7)}),
        ([4, 4, 2, 4, 2], 2, {(2, 4), (0, 1), (3,)}),  # ties keep corpus order
        ([], 4, set()),
    ],
)
def test_length_batches_bucketed(lengths, size, expected):
    batches = references.length_batches(lengths, size, bucketed=True)
    assert {tuple(b) for b in batches} == expected
    assert len(batches) == len(expected)


@pytest.mark.parametrize("bucketed", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n, size", [(50, 8), (64, 16), (5, 2)])
def test_length_batches_properties(bucketed, seed, n, size):
    lengths = [(i * 37) % 23 + 1 for i in range(n)]  # a fixed spread of lengths 1..23, with ties
    batches = references.length_batches(lengths, size, bucketed, seed)
    assert sorted(i for b in batches for i in b) == list(range(n))  # every index exactly once
    assert [len(b) for b in batches if len(b) != size] in ([], [n % size])  # full batches, one remainder
    assert batches == references.length_batches(lengths, size, bucketed, seed)  # deterministic for a seed
    if bucketed:
        for b in batches:
            assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
        # cut from the length-sorted order: no two batches' length ranges overlap
        spans = sorted((lengths[b[0]], lengths[b[-1]]) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


def test_length_batches_seed_and_mode_matter():
    lengths = [(i * 37) % 23 + 1 for i in range(200)]
    a, b = (references.length_batches(lengths, 8, True, seed) for seed in (0, 1))
    assert a != b  # the batch order is shuffled per seed
    assert {tuple(x) for x in a} == {tuple(x) for x in b}  # the batches themselves are not


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens computed for padding: each batch padded to its longest text."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_batches_bucketed_pads_nothing_random_does():
    lengths = [i % 4 + 1 for i in range(32)]  # 8 texts each of 1, 2, 3 and 4 tokens, interleaved
    bucketed = references.length_batches(lengths, 8, True)
    assert {tuple(b) for b in bucketed} == {tuple(range(k, 32, 4)) for k in range(4)}  # one length each
    assert padding(lengths, bucketed) == 0
    shuffled = references.length_batches(lengths, 8, False)
    assert sorted(i for b in shuffled for i in b) == list(range(32))
    assert padding(lengths, shuffled) > 0  # mixed lengths in some batch (seed 0)


# --------------------------------------------------------------------------- references: machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 f16c sse4_2 avx
bogomips\t: 4000.00

processor\t: 1
model name\t: Some Other CPU
flags\t\t: fpu avx
"""


class FakePath:
    def __init__(self, text: str | None) -> None:
        self.text = text

    def __call__(self, path: str) -> FakePath:
        assert path == "/proc/cpuinfo"
        return self

    def read_text(self) -> str:
        if self.text is None:
            raise OSError("no /proc here")
        return self.text


def test_cpu_info_reads_first_cpu(monkeypatch):
    monkeypatch.setattr(references, "Path", FakePath(CPUINFO))
    monkeypatch.setattr(references.os, "cpu_count", lambda: 2)
    assert references.cpu_info() == {
        "cores": 2,
        "model_name": "Intel(R) Xeon(R) Platinum 8480+",
        "flags": ["amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512f", "f16c", "fma"],
    }


def test_cpu_info_without_proc(monkeypatch):
    monkeypatch.setattr(references, "Path", FakePath(None))
    monkeypatch.setattr(references.os, "cpu_count", lambda: 16)
    assert references.cpu_info() == {"cores": 16, "model_name": None, "flags": []}


def test_versions():
    assert references.versions("pytest", "no-such-package-sentimentalyzer") == {
        "pytest": pytest.__version__,
        "no-such-package-sentimentalyzer": None,
    }


def test_flood_client_retries_a_reused_connection_the_server_closed() -> None:
    """A keep-alive connection closed by the server while idle (uvicorn after 5 s) is the pool's to
    retry on a fresh one, not a failure of the server: the reset or EOF comes before any byte."""

    async def scenario() -> list[int]:
        served = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            await reader.readexactly(length)
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            # drop the connection without saying so, with a reset (linger 0), as a close that crosses
            # the client's next request on the wire does
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conns = overload.Connections(port, timeout_s=5)
        try:
            statuses = [(await conns.post(b"{}"))[0] for _ in range(3)]
        finally:
            conns.close()
            server.close()
            await server.wait_closed()
        assert served == 3
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200]


# -------------------------------------------------------------------------- one user: paired rounds


def test_one_user_compare_takes_medians_over_rounds_against_the_goals():
    rounds = [
        {"naive": {"rps": 100.0, "p50_ms": 10.0}, "batched": {"rps": 99.0, "p50_ms": 10.5}},
        {"naive": {"rps": 100.0, "p50_ms": 10.0}, "batched": {"rps": 90.0, "p50_ms": 12.0}},  # one bad round
        {"naive": {"rps": 80.0, "p50_ms": 12.0}, "batched": {"rps": 80.0, "p50_ms": 12.2}},  # a slow machine
    ]
    c = one_user.compare(rounds)
    assert c["rps_ratio_per_round"] == [0.99, 0.9, 1.0] and c["p50_extra_ms_per_round"] == [0.5, 2.0, 0.2]
    assert (c["rps_ratio"], c["p50_extra_ms"]) == (0.99, 0.5)
    assert list(c["verdicts"].values()) == [True, True]
    rounds[0]["batched"] = {"rps": 97.0, "p50_ms": 11.1}  # now the median round is 0.97x, +1.1 ms
    assert list(one_user.compare(rounds)["verdicts"].values()) == [False, False]


# ------------------------------------------------------------------------------- wrk: script, output

WRK_OUTPUT = """Running 15s test @ http://127.0.0.1:8001/predict
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   520.11ms  102.52ms   1.21s    70.02%
  Latency Distribution
     50%  510.00ms
     99%  900.00ms
  912 requests in 15.02s, 120.33KB read
  Non-2xx or 3xx responses: 12
Requests/sec:     60.72
{"requests": 912, "duration_us": 15020000, "errors": {"status": 12, "connect": 0, "read": 1, "write": 0, \
"timeout": 3}, "latency_ms": {"p50": 510.000, "p95": 780.500, "p99": 900.000}}
"""


@pytest.mark.parametrize(
    "text, literal",
    [
        ("plain text", '"plain text"'),
        ('say "hi"', '"say \\"hi\\""'),  # a quote would end the Lua string
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\ttab", '"line\\010break\\009tab"'),  # a raw newline is a syntax error in Lua
        ("café", '"caf\\195\\169"'),  # UTF-8 bytes, as decimal escapes
        ("]]==]] -- [[", '"]]==]] -- [["'),  # long-bracket and comment markers mean nothing in a "..." string
        ("", '""'),
    ],
)
def test_lua_string(text, literal):
    assert wrk.lua_string(text) == literal


def lua_unquote(literal: str) -> str:
    """The inverse of wrk.lua_string, as Lua reads a double-quoted literal with these escapes."""
    assert literal[0] == literal[-1] == '"'
    out, body, i = bytearray(), literal[1:-1], 0
    while i < len(body):
        if body[i] == "\\" and body[i + 1].isdigit():
            out.append(int(body[i + 1 : i + 4]))
            i += 4
        elif body[i] == "\\":
            out += body[i + 1].encode()
            i += 2
        else:
            assert body[i] != '"', "an unescaped quote ends the string early"
            out += body[i].encode()
            i += 1
    return out.decode("utf-8")


def test_lua_script_bodies_are_the_corpus_as_json():
    texts = ['a "quoted" review', "back\\slash \\n not a newline", "naïve 😀", "two\nlines", "}, {"]
    script = wrk.lua_script(texts)
    table = script.split("local bodies = {\n", 1)[1].split("\n}\n", 1)[0]
    literals = [line.strip().removesuffix(",") for line in table.splitlines()]
    bodies = [lua_unquote(lit) for lit in literals]
    assert [json.loads(b) for b in bodies] == [{"text": t} for t in texts]  # valid JSON, in corpus order
    assert bodies == [json.dumps({"text": t}) for t in texts]  # the bytes Locust's json= sends


def test_lua_script_posts_json_cycles_and_reports():
    script = wrk.lua_script(["one"], {"Authorization": "Bearer k1"})
    lines = script.splitlines()
    for expected in [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        'wrk.headers["Authorization"] = "Bearer k1"',
        "  i = i % #bodies + 1",  # 1, 2, ..., n, 1, ...: Lua tables count from 1
        "  return wrk.format(nil, nil, nil, bodies[i])",
        "done = function(summary, latency, requests)",
    ]:
        assert expected in lines
    for field in ("summary.requests", "summary.duration", "e.status", "e.timeout", "latency:percentile(99)"):
        assert field in script
    with pytest.raises(ValueError):
        wrk.lua_script([])


def test_parse_wrk_done_line():
    assert wrk.parse(WRK_OUTPUT.replace("\\\n", "")) == {
        "requests": 912,
        "duration_us": 15020000,
        "errors": {"status": 12, "connect": 0, "read": 1, "write": 0, "timeout": 3},
        "latency_ms": {"p50": 510.0, "p95": 780.5, "p99": 900.0},
    }


@pytest.mark.parametrize(
    "output",
    [
        "",
        "unable to connect to 127.0.0.1:1 Connection refused\n",
        '{"requests": 3\n',  # cut short: not JSON
        '{"some": "other json"}\n',
    ],
)
def test_parse_wrk_without_done_line(output):
    assert wrk.parse(output) is None


def test_parse_wrk_takes_the_last_done_line():
    got = wrk.parse('{"requests": 1, "duration_us": 1}\nnoise\n{"requests": 2, "duration_us": 2}\n{broken\n')
    assert got is not None and got["requests"] == 2


def test_wrk_columns():
    got = wrk.columns(wrk.parse(WRK_OUTPUT.replace("\\\n", "")))
    assert got == pytest.approx(
        {
            "wrk_requests_per_s": 900 / 15.02,  # successes only, as Locust's: 912 less 12 non-2xx
            "wrk_p50_ms": 510.0,
            "wrk_p95_ms": 780.5,
            "wrk_p99_ms": 900.0,
            "wrk_requests": 900.0,
            "wrk_errors": 16.0,  # 12 status + 1 read + 3 timeouts
        }
    )
    assert set(got) == set(bench.SUMMARY_FIELDS) & set(got)  # every one a summary.csv column
    nothing = {"requests": 0, "duration_us": 1_000_000, "errors": {"connect": 32}, "latency_ms": {"p50": 0.0}}
    assert wrk.columns(nothing) == {
        "wrk_requests_per_s": 0.0,
        "wrk_p50_ms": None,  # wrk's percentile of no sample is 0, not a latency
        "wrk_p95_ms": None,
        "wrk_p99_ms": None,
        "wrk_requests": 0.0,
        "wrk_errors": 32.0,
    }
    assert set(wrk.columns(None).values()) == {None}


@pytest.mark.parametrize("seconds, flag", [(15, "-d15s"), (7.5, "-d8s"), (0.2, "-d1s"), (120.0, "-d120s")])
def test_wrk_command(seconds, flag):
    script = Path("/tmp/x.lua")
    assert wrk.command("http://127.0.0.1:9/predict", 32, seconds, script) == [
        "wrk",
        "-t1",  # one thread, one Lua state
        "-c32",  # one connection a user
        flag,  # whole seconds, rounded up
        "--latency",
        "--timeout",
        "60s",  # Locust's FastHttpUser timeout, not wrk's 2 s
        "-s",
        "/tmp/x.lua",
        "http://127.0.0.1:9/predict",
    ]


class FakeRun:
    def __init__(self, stdout: str) -> None:
        self.stdout, self.stderr, self.returncode = stdout, "", 1


def test_wrk_version(monkeypatch):
    monkeypatch.setattr(wrk.shutil, "which", lambda name: None)
    assert wrk.version() is None  # not installed: the run says so, the wrk columns stay blank
    monkeypatch.setattr(wrk.shutil, "which", lambda name: "/usr/bin/wrk")
    out = "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer\nUsage: wrk <options> <url>\n"
    monkeypatch.setattr(wrk.subprocess, "run", lambda *a, **kw: FakeRun(out))
    assert wrk.version() == "wrk debian/4.1.0-3+b2 [epoll]"


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (.ci/run installs it)")
def test_wrk_measures_a_local_server(tmp_path):
    """The generated script run by the real wrk: every body arrives as JSON, non-2xx are counted, done() parses."""
    texts = ['say "hi"', "back\\slash", "café ☕", "fail me"]
    seen: list[tuple[Any, ...]] = []
    failed = [0]

    def answer(request: StubRequest) -> tuple[int, bytes]:
        text = json.loads(request.body)["text"]
        seen.append((text, request.headers["Content-Type"], request.headers["Authorization"]))
        status = 503 if text == "fail me" else 200
        failed[0] += status == 503
        return status, b'{"label": "POSITIVE", "score": 0.9}'

    with stub_http(answer) as base:
        prefix = tmp_path / "x_u4"
        result = wrk.measure(f"{base}/predict", 4, 1, texts, prefix, prefix, {"Authorization": "Bearer k"})
    assert result is not None and result["requests"] > len(texts)  # round the corpus more than once
    assert {s[0] for s in seen} == set(texts) and {s[1:] for s in seen} == {("application/json", "Bearer k")}
    assert 0 < result["errors"]["status"] <= failed[0]  # the measured run's 503s, not the warm-up's
    cols = wrk.columns(result)
    assert cols["wrk_requests"] == result["requests"] - result["errors"]["status"]
    p50, p99 = cols["wrk_p50_ms"], cols["wrk_p99_ms"]
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    assert json.loads((tmp_path / "x_u4_wrk.json").read_text()) == result
    assert (tmp_path / "x_u4_wrk.lua").read_text() == wrk.lua_script(texts, {"Authorization": "Bearer k"})
    assert (tmp_path / "x_u4_wrk_warmup.log").exists() and (tmp_path / "x_u4_wrk.log").exists()


# ------------------------------------------------- the server's CPU over a row (Process.cpu_seconds)

SPIN_CHILD = """
import subprocess, sys, time
if sys.argv[1] == "parent":  # idles; its child spins until it has used 0.4 s of CPU, then idles too
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[3]])
    time.sleep(120)
else:
    while time.process_time() < 0.4:
        pass
    open(sys.argv[2], "w").close()
    time.sleep(120)
"""


def test_cpu_seconds_count_the_processes_under_the_server(tmp_path):
    """A parent that idles and a child that spends 0.4 s of CPU: the child's seconds are the server's."""
    done = tmp_path / "spun"
    args = [sys.executable, "-c", SPIN_CHILD, "parent", SPIN_CHILD, str(done)]
    proc = launch.Process.start("spin", args, tmp_path / "spin.log")
    try:
        deadline = time.monotonic() + 60
        while not done.exists() and proc.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists(), proc.text()
        assert 0.4 <= proc.cpu_seconds() < 5  # the child's spin, its start-up and the parent's
    finally:
        proc.stop(grace_s=1)
    assert proc.cpu_seconds() == 0.0  # gone: nothing to count, no error


def test_cpu_window_gives_cores_and_milliseconds_an_answer(monkeypatch):
    cpu, clock = iter([10.0, 11.5]), iter([100.0, 102.0])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    window = bench.CpuWindow(types.SimpleNamespace(cpu_seconds=lambda: next(cpu)))
    assert window.columns("server", 300) == {"server_cores": 0.75, "server_cpu_ms_per_answer": 5.0}
    cpu, clock = iter([0.0, 1.0]), iter([0.0, 1.0])
    assert bench.CpuWindow(types.SimpleNamespace(cpu_seconds=lambda: next(cpu))).columns("x", 0) == {
        "x_cores": 1.0,
        "x_cpu_ms_per_answer": None,  # no answer: no per-answer figure, not a division by zero
    }
