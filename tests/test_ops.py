"""Operations, in process: metrics, per-response headers, log lines, API keys and rate limits.

    pytest tests/test_ops.py -q          # a few seconds; tests/test_scaleout.py runs real processes

Apps are the real servers on the tiny model from conftest, driven through httpx's ASGI transport.
"""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import batched_server
import naive_server
from serving.guard import Guard, LocalLimiter
from serving.ops import forget_dead_workers
from serving.settings import Settings
from tests.conftest import serving

pytestmark = pytest.mark.anyio
KEY = "k-" + "x" * 30
GOOD = {"text": "I loved it"}


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, keyed by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_names(text: str) -> set[str]:
    """Every name a query may use: families with no samples yet (no drops so far) included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in text_string_to_metric_families(text) for s in suffixes.get(f.type, ("",))}


@pytest.mark.parametrize("server", [batched_server, naive_server])
async def test_metrics_count_requests_by_endpoint_and_status(server, attached_settings: Settings) -> None:
    async with serving(server.create_app(attached_settings)) as client:
        for _ in range(3):
            assert (await client.post("/predict", json=GOOD)).status_code == 200
        assert (await client.post("/predict/batch", json={"texts": ["a", "b c d"]})).status_code == 200
        assert (await client.post("/predict", json={"text": " "})).status_code == 422
        assert (await client.get("/nowhere/secret-id-123")).status_code == 404
        response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    m = scrape(response.text)
    assert sample(m, "sentimentalyzer_requests_total", endpoint="/predict", status="200") == 3
    assert sample(m, "sentimentalyzer_requests_total", endpoint="/predict", status="422") == 1
    assert sample(m, "sentimentalyzer_requests_total", endpoint="other", status="404") == 1  # bounded labels
    assert sample(m, "sentimentalyzer_request_latency_seconds_count", endpoint="/predict/batch") == 1
    assert sample(m, "sentimentalyzer_request_latency_seconds_bucket", endpoint="/predict", le="+Inf") == 4
    assert sample(m, "sentimentalyzer_batch_size_sum") >= 5  # warm-up passes may add more
    assert 0 < sample(m, "sentimentalyzer_padding_efficiency") <= 1
    assert sample(m, "sentimentalyzer_ready") == 1
    names = metric_names(response.text)
    for name in (
        "queue_wait_seconds_bucket",
        "compute_seconds_count",
        "queue_depth",
        "dropped_total",
        "real_tokens_total",
        "computed_tokens_total",
        "ratelimit_fallback_total",
    ):
        assert f"sentimentalyzer_{name}" in names
    if server is batched_server:
        assert sample(m, "sentimentalyzer_queue_wait_seconds_count") >= 5
        assert sample(m, "sentimentalyzer_compute_seconds_count") >= 1


async def test_batched_answers_carry_batch_size_timing_and_request_id(attached_settings: Settings) -> None:
    async with serving(batched_server.create_app(attached_settings)) as client:
        generated = await client.post("/predict", json=GOOD)
        echoed = await client.post("/predict", json=GOOD, headers={"X-Request-ID": "order-42.a:b"})
        replaced = await client.post("/predict", json=GOOD, headers={"X-Request-ID": "bad id\twith tab"})
    assert generated.headers["X-Batch-Size"] == str(generated.json()["batch_size"])
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", generated.headers["Server-Timing"]))
    assert set(timing) == {"queue", "tokenize", "infer"} and float(timing["infer"]) > 0
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    assert echoed.headers["X-Request-ID"] == "order-42.a:b"
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"])  # never echo junk into logs


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_one_log_line_per_request_carrying_its_id(
    log_format: str, attached_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    app = batched_server.create_app(attached_settings.replace(log_format=log_format, api_keys=(KEY,)))
    async with serving(app) as client:
        capsys.readouterr()
        await client.post("/predict", json=GOOD, headers={"X-Request-ID": "rid-ok", "X-API-Key": KEY})
        await client.post("/predict", json=GOOD, headers={"X-Request-ID": "rid-denied"})
        err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert [(r["request_id"], r["path"], r["status"]) for r in records] == [
            ("rid-ok", "/predict", 200),
            ("rid-denied", "/predict", 401),
        ]
        assert all(r["latency_ms"] >= 0 and r["level"] == "INFO" for r in records)
    else:
        assert "[rid-ok] POST /predict 200" in lines[0] and "[rid-denied] POST /predict 401" in lines[1]


def auth_cases() -> list[tuple[dict[str, str], int]]:
    return [
        ({}, 401),
        ({"X-API-Key": "wrong"}, 401),
        ({"Authorization": f"Bearer {KEY}x"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"X-API-Key": KEY[:-1]}, 401),
        ({"X-API-Key": KEY}, 200),
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer  {KEY} "}, 200),
        ({"X-API-Key": "other-key"}, 200),
        ({"Authorization": "Bearer wrong", "X-API-Key": KEY}, 200),
    ]


async def test_api_keys_guard_every_endpoint_but_probes(attached_settings: Settings) -> None:
    app = batched_server.create_app(attached_settings.replace(api_keys=(KEY, "other-key")))
    async with serving(app) as client:
        for headers, status in auth_cases():
            response = await client.post("/predict", json=GOOD, headers=headers)
            assert response.status_code == status, headers
            if status == 401:
                assert response.json()["detail"] and response.headers["WWW-Authenticate"].startswith("Bearer")
        for path in ("/metrics", "/docs", "/openapi.json", "/predict/batch", "/nowhere"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"X-API-Key": KEY})).status_code != 401, path
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_rate_limit_per_key_answers_429_with_retry_after(attached_settings: Settings) -> None:
    app = batched_server.create_app(attached_settings.replace(api_keys=(KEY, "other-key"), rate_limit="3/minute"))
    async with serving(app) as client:
        statuses = [
            (await client.post("/predict", json=GOOD, headers={"X-API-Key": KEY})).status_code for _ in range(4)
        ]
        limited = await client.get("/metrics", headers={"X-API-Key": KEY})
        other = await client.post("/predict", json=GOOD, headers={"X-API-Key": "other-key"})
        probes = [(await client.get("/health")).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429]
    assert limited.status_code == 429 and "rate limit" in limited.json()["detail"]
    assert 55 <= int(limited.headers["Retry-After"]) <= 60  # the oldest of the 3 leaves the minute then
    assert limited.headers["X-Request-ID"]
    assert other.status_code == 200 and probes == [200] * 5


async def test_without_keys_the_limit_is_per_client_address(attached_settings: Settings) -> None:
    app = batched_server.create_app(attached_settings.replace(rate_limit="2/s"))
    async with app.router.lifespan_context(app):

        async def statuses(address: str) -> list[int]:
            transport = httpx.ASGITransport(app=app, client=(address, 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return [(await client.post("/predict", json=GOOD)).status_code for _ in range(3)]

        assert await statuses("10.0.0.1") == [200, 200, 429]
        assert await statuses("10.0.0.2") == [200, 200, 429]


async def test_unreachable_redis_falls_back_to_limits_per_process(
    attached_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = "redis://127.0.0.1:1/0"  # port 1: connection refused at once
    app = batched_server.create_app(attached_settings.replace(rate_limit="2/minute", redis_url=closed))
    async with serving(app) as client:
        capsys.readouterr()
        statuses = [(await client.post("/predict", json=GOOD)).status_code for _ in range(3)]
        err = capsys.readouterr().err
        metrics = app.state.obs.exposition()[0].decode()
    assert statuses == [200, 200, 429]
    assert err.count("unreachable") == 1 and "limiting per process" in err  # once per outage, not per request
    assert sample(scrape(metrics), "sentimentalyzer_ratelimit_fallback_total") == 3


def test_guard_is_not_installed_when_access_control_is_off(settings: Settings) -> None:
    assert all(m.cls is not Guard for m in batched_server.create_app(settings).user_middleware)
    on = batched_server.create_app(settings.replace(rate_limit="5/s")).user_middleware
    assert [m.cls for m in on].count(Guard) == 1


@hsettings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 5), gaps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=40))
def test_sliding_log_admits_exactly_up_to_the_limit_in_any_window(limit: int, gaps: list[float]) -> None:
    window, now = 2.0, [0.0]
    limiter = LocalLimiter(limit, window, clock=lambda: now[0])
    admitted: list[float] = []
    for gap in gaps:
        now[0] += gap
        in_window = [t for t in admitted if t > now[0] - window]
        wait = limiter.acquire_now("k")
        if wait == 0:
            assert len(in_window) < limit  # never over the limit in the trailing window
            admitted.append(now[0])
        else:
            assert len(in_window) == limit  # never refused while there is room
            assert wait > 0 and wait == pytest.approx(in_window[0] + window - now[0], abs=1e-5)


def test_exposition_forgets_live_gauges_of_exited_workers(tmp_path) -> None:
    exited = subprocess.Popen(["true"])
    exited.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (exited.pid, live.pid):
            (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
        (tmp_path / f"counter_{exited.pid}.db").write_bytes(b"")
        forget_dead_workers(str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"counter_{exited.pid}.db", f"gauge_livesum_{live.pid}.db"]
        )  # counters outlive workers
    finally:
        live.kill()
        live.wait()
