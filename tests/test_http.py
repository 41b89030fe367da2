"""Both servers in-process (httpx ASGITransport + lifespan) on a tiny DistilBERT: every endpoint and error row.

pytest tests/test_http.py -q
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

import batched_server
import naive_server
from serving.model import STAND_IN, resolve_source, standin_tokenizer_dir
from serving.settings import Settings, SettingsError
from tests.conftest import serving

pytestmark = pytest.mark.anyio
SERVERS = {"naive": naive_server.create_app, "batched": batched_server.create_app}


@pytest.fixture(scope="module", params=["naive", "batched"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
async def client(kind: str, attached_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """One server per kind for the tests that need no settings of their own (each start costs seconds)."""
    async with serving(SERVERS[kind](attached_settings)) as c:
        yield c


def counted(metrics: str, endpoint: str, status: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "sentimentalyzer_requests_total" and sample.labels == {
                "endpoint": endpoint,
                "status": status,
            }:
                return sample.value
    return 0.0


async def test_predict_answers_per_the_contract(kind: str, client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", json={"text": "I loved it"})
    assert r.status_code == 200
    body = r.json()
    assert body["label"] in ("POSITIVE", "NEGATIVE") and 0.5 <= body["score"] <= 1.0
    assert body["latency_ms"] > 0
    assert ("batch_size" in body) == (kind == "batched")
    if kind == "batched":
        assert body["batch_size"] == 1 and r.headers["x-batch-size"] == "1"
        assert {"queue", "tokenize", "infer"} <= {
            p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")
        }


async def test_batch_endpoint_keeps_input_order(kind: str, client: httpx.AsyncClient) -> None:
    texts = ["great", "awful " * 50, "fine 🙂", "x"]
    singles = [(await client.post("/predict", json={"text": t})).json() for t in texts]
    r = await client.post("/predict/batch", json={"texts": texts})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [s["label"] for s in singles]
    assert [p["score"] for p in preds] == pytest.approx([s["score"] for s in singles], abs=1e-4)
    assert r.json()["latency_ms"] > 0


async def test_health_ready_and_metrics(kind: str, client: httpx.AsyncClient, attached_settings: Settings) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = (await client.get("/ready")).json()
    assert ready["model_source"] == "local" and ready["device"] == "cpu" and ready["dtype"] == "fp32"
    assert ready["model_id"] == attached_settings.model_id
    if kind == "batched":
        assert ready["batching"]["max_batch_size"] == attached_settings.max_batch_size
        assert ready["batching"]["max_wait_ms"] == attached_settings.max_wait_ms
    before = counted((await client.get("/metrics")).text, "/predict", "200")
    await client.post("/predict", json={"text": "a b c d"})
    metrics = (await client.get("/metrics")).text
    assert counted(metrics, "/predict", "200") == before + 1
    assert "sentimentalyzer_request_latency_seconds_bucket" in metrics
    for name in ("batch_size", "queue_wait_seconds", "queue_depth", "padding_efficiency"):
        assert f"sentimentalyzer_{name}" in metrics
    if kind == "batched":  # observed only behind a queue (results/overload shows it filled)
        assert "sentimentalyzer_admission_prediction_ratio_count " in metrics


async def test_ready_is_503_outside_the_lifespan(kind: str, settings: Settings) -> None:
    app = SERVERS[kind](settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/health")).status_code == 200
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        r = await c.post("/predict", json={"text": "hi"})
        assert r.status_code == 503 and "detail" in r.json()


BAD_BODIES = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"text": 5}', "wrong type"),
    (b'{"txt": "hello"}', "missing field"),
    (b'{"text": ""}', "empty text"),
    (b'{"text": "  \\n\\t "}', "whitespace only"),
    (b"[1, 2]", "not an object"),
]


@pytest.mark.parametrize("body,why", BAD_BODIES, ids=[w for _, w in BAD_BODIES])
async def test_client_errors_are_422_json(kind: str, client: httpx.AsyncClient, body: bytes, why: str) -> None:
    r = await client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, why
    assert "detail" in r.json()


async def test_limits_from_settings(kind: str, attached_settings: Settings) -> None:
    s = attached_settings.replace(max_text_chars=20, max_batch_items=3)
    async with serving(SERVERS[kind](s)) as c:
        assert (await c.post("/predict", json={"text": "x" * 21})).status_code == 422
        assert (await c.post("/predict", json={"text": "x" * 20})).status_code == 200
        assert (await c.post("/predict/batch", json={"texts": []})).status_code == 422
        assert (await c.post("/predict/batch", json={"texts": ["a"] * 4})).status_code == 422
        r = await c.post("/predict/batch", json={"texts": ["a", "x" * 21]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "texts", 1]
        assert (await c.post("/predict/batch", json={"texts": ["a"] * 3})).status_code == 200


async def test_body_over_1_mib_is_413_json(kind: str, client: httpx.AsyncClient) -> None:
    big = json.dumps({"text": "a" * (1 << 20)}).encode()
    r = await client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "detail" in r.json()

    async def chunks():  # no Content-Length: counted while streamed
        for _ in range(20):
            yield b"a" * 65536

    r = await client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "detail" in r.json()


async def test_texts_over_512_tokens_are_truncated_not_rejected(kind: str, client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", json={"text": "word " * 1500})
    assert r.status_code == 200


@pytest.mark.parametrize("mode", ["threadpool", "blocking", "on-demand"])
async def test_every_naive_mode_serves(settings: Settings, mode: str) -> None:
    async with serving(naive_server.create_app(settings.replace(naive_mode=mode))) as c:
        r = await c.post("/predict", json={"text": "I loved it"})
        assert r.status_code == 200
        assert (await c.get("/ready")).json()["naive_mode"] == mode


def test_standin_tokenizer_is_the_real_vocabulary() -> None:
    tok = AutoTokenizer.from_pretrained(standin_tokenizer_dir())
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert len(tok) == 30522


def test_unreachable_hub_falls_back_to_the_stand_in_loudly(monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SENTIMENTALYZER_CACHE", str(tmp_path))
    logger = logging.getLogger("sentimentalyzer.model")
    logger.addHandler(caplog.handler)  # our loggers do not propagate once an app configured logging
    try:
        source = resolve_source(Settings(model_id="no-such-org/no-such-model"))
    finally:
        logger.removeHandler(caplog.handler)
    assert source.kind == STAND_IN and "STAND-IN" in caplog.text
    cfg = json.loads((tmp_path / "stand-in-distilbert-sst2-v1" / "config.json").read_text())
    assert (cfg["n_layers"], cfg["dim"], cfg["id2label"]) == (6, 768, {"0": "NEGATIVE", "1": "POSITIVE"})


def test_no_fallback_fails_with_a_message_naming_model_id(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"MODEL_ID='no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        resolve_source(Settings(model_id="no-such-org/no-such-model", model_fallback=False))


def test_settings_validate_on_creation() -> None:
    with pytest.raises(SettingsError, match="MAX_BATCH_SIZE"):
        Settings.from_env({"MAX_BATCH_SIZE": "0"})
    with pytest.raises(SettingsError, match="NAIVE_MODE"):
        Settings.from_env({"NAIVE_MODE": "fast"})
    with pytest.raises(SettingsError, match="MAX_WAIT_MS"):
        Settings.from_env({"MAX_WAIT_MS": "soon"})
    s = Settings.from_env({"MAX_WAIT_MS": "5", "API_KEYS": "a, b", "MODEL_FALLBACK": "0", "RATE_LIMIT": "50/s"})
    assert (s.max_wait_s, s.api_keys, s.model_fallback, s.rate_limit_per_window) == (0.005, ("a", "b"), False, (50, 1))


def test_importing_the_servers_loads_no_model() -> None:
    assert not hasattr(batched_server.app.state, "engine")
    assert not hasattr(naive_server.app.state, "engine")
