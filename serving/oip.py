"""The Open Inference Protocol (KServe v2) over HTTP, on the same port as /predict (../shared/SPEC.md).

    from serving.oip import add_v2_routes, V2Errors
    add_v2_routes(app)                 # serving/service.py does this for both servers
    app.add_middleware(V2Errors)       # error bodies under /v2 in the protocol's form: {"error": ...}

    import tritonclient.http as httpclient, numpy as np
    client = httpclient.InferenceServerClient("127.0.0.1:8001")
    text = httpclient.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([["I loved it"], ["dull"]], dtype=object))
    result = client.infer("sentiment", [text])
    result.as_numpy("label"), result.as_numpy("score")       # [[b"POSITIVE"], ...], [[0.998], ...]

Routes: GET /v2 (server metadata), /v2/health/live, /v2/health/ready, /v2/models/sentiment,
/v2/models/sentiment/ready and POST /v2/models/sentiment/infer, with input `text` (BYTES, shape [N, 1])
and outputs `label` (BYTES) and `score` (FP32), each [N, 1]: the Triton peer's signature, so one client
drives both. The body is JSON, or JSON followed by binary tensors (the binary tensor data extension
that tritonclient uses by default: `Inference-Header-Content-Length` gives the JSON's length; BYTES
elements are 4-byte little-endian lengths, each followed by its bytes). Requests go through the same
Service as /predict: the same keys, rate limits, validation limits, batcher, admission and deadlines;
errors keep their statuses. The protocol over gRPC (serving/grpc_server.py) is served by these routes.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import ApiError, check_texts, clean_text, require_ready

MODEL = "sentiment"
VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = {"label": "BYTES", "score": "FP32"}
GRPC_EXTENSION = "sentimentalyzer.grpc"  # the scope extension a forwarded gRPC call carries
SERVER = {"name": "sentimentalyzer", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def metadata(platform: str) -> dict[str, Any]:
    return {
        "name": MODEL,
        "versions": [VERSION],
        "platform": platform,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": name, "datatype": kind, "shape": [-1, 1]} for name, kind in OUTPUTS.items()],
    }


def invalid(message: str) -> ApiError:
    return ApiError(422, message)


def from_grpc(request: Request) -> dict[str, Any]:
    """What serving/grpc_server.py put in the scope of a call it forwards ({} for HTTP requests):
    `deadline`, the client's gRPC deadline (time.monotonic()), and `invalid`, why its tensors could not
    be forwarded (refused here, after the keys and limits, like any other bad input)."""
    extension: dict[str, Any] = request.scope.get("extensions", {}).get(GRPC_EXTENSION, {})
    return extension


def client_deadline(request: Request) -> float | None:
    """The request's own deadline (time.monotonic()), where its protocol carries one (gRPC)."""
    deadline = from_grpc(request).get("deadline")
    return float(deadline) if deadline is not None else None


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary part after it (empty without the extension)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise invalid(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        cut = int(header_length)
        head, binary = body[:cut], body[cut:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the inference request is not valid JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise invalid("the inference request needs an `inputs` list")
    return request, binary


def decode_bytes(binary: bytes, count: int) -> list[bytes]:
    """BYTES elements in the binary extension's form: a 4-byte little-endian length, then the bytes."""
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(binary):
            raise invalid(f"binary `text` data holds fewer than the {count} elements its shape says")
        (n,) = struct.unpack_from("<I", binary, at)
        out.append(binary[at + 4 : at + 4 + n])
        at += 4 + n
    if at != len(binary):
        raise invalid(f"binary `text` data has {len(binary) - at} bytes beyond its {count} elements")
    return out


def read_texts(request: dict[str, Any], binary: bytes) -> list[str]:
    """The `text` input's strings, checked as /predict/batch checks its texts (422 otherwise)."""
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != "text":
        raise invalid("exactly one input, named `text`, is expected")
    spec = inputs[0]
    shape = spec.get("shape")
    if spec.get("datatype") != "BYTES":
        raise invalid(f"input `text` must be BYTES, got {spec.get('datatype')!r}")
    if not (isinstance(shape, list) and len(shape) in (1, 2) and all(isinstance(d, int) for d in shape)):
        raise invalid(f"input `text` must have shape [N, 1], got {shape!r}")
    if (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise invalid(f"input `text` must have shape [N, 1] with N >= 1, got {shape}")
    count = shape[0]
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        raw = decode_bytes(binary[:size] if isinstance(size, int) else b"", count)
    else:
        data = spec.get("data")
        rows = data if isinstance(data, list) else None
        flat = None if rows is None else [x for row in rows for x in (row if isinstance(row, list) else [row])]
        if flat is None or len(flat) != count or not all(isinstance(x, str) for x in flat):
            raise invalid(f"input `text` needs {count} strings in `data` (shape {shape})")
        raw = [x.encode("utf-8", "surrogatepass") for x in flat]
    texts = []
    for i, item in enumerate(raw):
        try:
            texts.append(clean_text(item.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            raise invalid(f"text {i}: {exc}") from None
    return texts


def requested(request: dict[str, Any]) -> dict[str, bool]:
    """Output name -> whether it is sent binary; by default both outputs, as JSON."""
    wanted = request.get("outputs")
    if wanted is None:
        return {name: False for name in OUTPUTS}
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise invalid("`outputs` must be a list of {name, parameters}")
    out = {}
    for o in wanted:
        if o.get("name") not in OUTPUTS:
            raise invalid(f"unknown output {o.get('name')!r}: this model has {sorted(OUTPUTS)}")
        out[o["name"]] = bool((o.get("parameters") or {}).get("binary_data", False))
    return out


def encode(request: dict[str, Any], labels: list[str], scores: list[float]) -> Response:
    """The inference response: JSON outputs, or JSON followed by the binary ones."""
    values = {"label": labels, "score": scores}
    outputs, tail = [], b""
    for name, binary in requested(request).items():
        out: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": [len(labels), 1]}
        if binary:
            if name == "label":
                raw = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in labels)
            else:
                raw = struct.pack(f"<{len(scores)}f", *scores)
            out["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        else:
            out["data"] = values[name]
        outputs.append(out)
    body: dict[str, Any] = {"model_name": MODEL, "model_version": VERSION, "outputs": outputs}
    if "id" in request:
        body["id"] = request["id"]
    head = json.dumps(body).encode()
    if not tail:
        return Response(head, media_type="application/json")
    return Response(
        head + tail, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(len(head))}
    )


def add_v2_routes(app: FastAPI) -> None:
    def ready(request: Request) -> bool:
        service = request.app.state.service
        return service is not None and service.ready()

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return SERVER

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def server_ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": ready(request)}, status_code=200 if ready(request) else 503)

    @app.get(f"/v2/models/{MODEL}")
    async def model_metadata(request: Request) -> dict[str, Any]:
        return metadata(f"sentimentalyzer-{request.app.state.kind}")

    @app.get(f"/v2/models/{MODEL}/ready")
    async def model_ready(request: Request) -> JSONResponse:
        ok = ready(request)
        return JSONResponse({"name": MODEL, "ready": ok}, status_code=200 if ok else 503)

    @app.post(f"/v2/models/{MODEL}/infer")
    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        settings = require_ready(request)
        if problem := from_grpc(request).get("invalid"):
            raise invalid(problem)
        body, binary = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
        texts = read_texts(body, binary)
        requested(body)  # a bad `outputs` is refused before the model runs
        check_texts(settings, texts, batch=True)  # MAX_BATCH_ITEMS, MAX_TEXT_CHARS: 422, as on /predict/batch
        preds = await request.app.state.service.predict(request, texts)
        if len(preds) != len(texts):
            raise ApiError(500, f"the model answered {len(preds)} predictions for {len(texts)} texts")
        response = encode(body, [p.label for p in preds], [p.score for p in preds])
        response.headers["Server-Timing"] = f"total;dur={(time.perf_counter() - started) * 1000:.2f}"
        return response


class V2Errors:
    """Rewrites error bodies under /v2 from the contract's {"detail": ...} into the protocol's {"error": "..."}
    (every layer that refuses, keys and limits and body size included, answers there in one form)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] == "/v2" or scope["path"].startswith("/v2/")):
            return await self.app(scope, receive, send)
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _as_error(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting)


def _as_error(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict) or "detail" not in parsed:
        return body
    detail = parsed["detail"]
    if isinstance(detail, list):  # FastAPI's validation list: its messages, with where they point
        detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in detail)
    return json.dumps({"error": str(detail)}).encode()
