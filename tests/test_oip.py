"""The Open Inference Protocol over HTTP (serving/oip.py) on both servers, in-process and with tritonclient.

    pytest tests/test_oip.py -q      # ~40 s: in-process per server, then both under real uvicorn

The in-process tests send the protocol's JSON and its binary tensor extension by hand and check every
error form; the uvicorn tests drive the servers with the real `tritonclient.http`, as a Triton user would,
and check that its answers equal /predict's for the same texts.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import batched_server
import naive_server
from serving.settings import Settings
from tests.conftest import serving
from tests.processes import start_uvicorn, wait_until_ok

TEXTS = ["I loved it", "dull and far too long", "It was fine, I guess"]
INFER = "/v2/models/sentiment/infer"
APPS = {"naive": naive_server.create_app, "batched": batched_server.create_app}


def body(texts: list[str]) -> dict[str, object]:
    return {"id": "r1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]}


def binary_body(texts: list[str]) -> tuple[bytes, dict[str, str]]:
    """The binary tensor extension, as tritonclient sends it: JSON header, then length-prefixed elements."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [len(texts), 1],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "score"}],
    }
    encoded = json.dumps(head).encode()
    return encoded + raw, {"Inference-Header-Content-Length": str(len(encoded))}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", APPS)
async def test_infer_answers_what_predict_answers(attached_settings: Settings, kind: str) -> None:
    async with serving(APPS[kind](attached_settings)) as client:
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2/models/sentiment/ready")).json() == {"name": "sentiment", "ready": True}
        meta = (await client.get("/v2/models/sentiment")).json()
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
        assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("label", "BYTES"), ("score", "FP32")]
        answer = (await client.post(INFER, json=body(TEXTS))).json()
        fresh = (await client.post("/predict/batch", json={"texts": TEXTS})).json()["predictions"]
        content, headers = binary_body(TEXTS)
        packed = await client.post(INFER, content=content, headers=headers)
    assert answer["id"] == "r1" and answer["model_name"] == "sentiment"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["label"]["shape"] == [3, 1] and outputs["score"]["datatype"] == "FP32"
    assert outputs["label"]["data"] == [p["label"] for p in fresh]
    assert outputs["score"]["data"] == pytest.approx([p["score"] for p in fresh], abs=1e-4)

    cut = int(packed.headers["inference-header-content-length"])
    head, tail = json.loads(packed.content[:cut]), packed.content[cut:]
    label_out, score_out = head["outputs"]
    labels, at = [], 0
    for _ in TEXTS:  # the label tensor is binary: 4-byte lengths, each followed by its bytes
        (n,) = struct.unpack_from("<I", tail, at)
        labels.append(tail[at + 4 : at + 4 + n].decode())
        at += 4 + n
    assert at == label_out["parameters"]["binary_data_size"] == len(tail)
    assert labels == [p["label"] for p in fresh] and score_out["data"] == outputs["score"]["data"]


BAD = [  # (body, what the error names): every one a 422 in the protocol's form
    ({"inputs": "text"}, "inputs"),
    ({"inputs": [{"name": "words", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}, "named `text`"),
    ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}, "BYTES"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]}, "shape"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["a"]}]}, "2 strings"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0, 1], "data": []}]}, "N >= 1"),
    (body(["   "]), "empty"),
    (body(["x" * 10_001]), "MAX_TEXT_CHARS"),
    (body(["a"] * 65), "MAX_BATCH_ITEMS"),
    ({**body(["a"]), "outputs": [{"name": "logits"}]}, "unknown output"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", APPS)
async def test_every_error_is_in_the_protocols_form(attached_settings: Settings, kind: str) -> None:
    keyed = attached_settings.replace(api_keys=("k1",))
    async with serving(APPS[kind](keyed)) as client:
        auth = {"X-API-Key": "k1"}
        for bad, names in BAD:
            r = await client.post(INFER, json=bad, headers=auth)
            assert r.status_code == 422 and names in r.json()["error"], (bad, r.text)
        r = await client.post(INFER, content=b"{not json", headers=auth)
        assert r.status_code == 422 and "JSON" in r.json()["error"]
        content, headers = binary_body(["a", "b"])
        r = await client.post(INFER, content=content[:-1], headers={**auth, **headers})
        assert r.status_code == 422 and "binary" in r.json()["error"]
        r = await client.post(INFER, json=body(["a"]))
        assert r.status_code == 401 and set(r.json()) == {"error"}
        r = await client.post(INFER, content=b"x" * (2 << 20), headers=auth)
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        assert (await client.post("/predict", json={"text": ""}, headers=auth)).json()["detail"]  # /predict unchanged


@pytest.mark.anyio
async def test_a_full_queue_is_503_with_retry_after(settings: Settings) -> None:
    async with serving(batched_server.create_app(settings.replace(max_queue=2))) as client:
        r = await client.post(INFER, json=body(["a", "b", "c"]))
    assert r.status_code == 503 and r.headers["retry-after"] and "error" in r.json()


# ---------------------------------------------------------------------- tritonclient, real uvicorn


@pytest.fixture(scope="module", params=list(APPS))
def server(
    request: pytest.FixtureRequest, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp(f"oip-{request.param}")
    env = {"MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0", "DEVICE": "cpu", "DTYPE": "fp32", "API_KEYS": "k1"}
    proc, url = start_uvicorn(request.param, tmp, f"{request.param}_server:app", env)
    try:
        wait_until_ok(proc, f"{url}/ready")
        yield url
    finally:
        proc.stop()


def test_tritonclient_drives_the_server(server: str) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    headers = {"Authorization": "Bearer k1"}
    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    try:
        assert client.is_server_live(headers=headers) and client.is_model_ready("sentiment", headers=headers)
        assert client.get_model_metadata("sentiment", headers=headers)["inputs"][0]["name"] == "text"
        text = httpclient.InferInput("text", [len(TEXTS), 1], "BYTES")
        text.set_data_from_numpy(np.array([[t] for t in TEXTS], dtype=object))  # binary, tritonclient's default
        outputs = [httpclient.InferRequestedOutput("label"), httpclient.InferRequestedOutput("score")]
        # a fresh dict per call: tritonclient writes its Inference-Header-Content-Length into the one given
        result = client.infer("sentiment", [text], outputs=outputs, headers=dict(headers))
        labels = [x.decode() for x in result.as_numpy("label").ravel()]
        scores = result.as_numpy("score").ravel().tolist()
        json_text = httpclient.InferInput("text", [1, 1], "BYTES")
        json_text.set_data_from_numpy(np.array([[TEXTS[0]]], dtype=object), binary_data=False)
        plain = client.infer("sentiment", [json_text], headers=dict(headers))  # JSON in, JSON out
        with pytest.raises(InferenceServerException) as refused:
            client.infer("sentiment", [text])  # no key
    finally:
        client.close()
    fresh = httpx.post(f"{server}/predict/batch", json={"texts": TEXTS}, headers=headers).json()["predictions"]
    assert labels == [p["label"] for p in fresh]
    assert scores == pytest.approx([p["score"] for p in fresh], abs=1e-4)
    first = plain.as_numpy("label").ravel()[0]  # JSON BYTES come back as str, binary ones as bytes
    assert (first.decode() if isinstance(first, bytes) else first) == fresh[0]["label"]
    assert refused.value.status() == "401" and "key" in refused.value.message().lower()
