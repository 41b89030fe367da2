"""The Open Inference Protocol (KServe v2) over gRPC on GRPC_PORT, on both servers (../shared/SPEC.md).

    GRPC_PORT=8081 uvicorn batched_server:app --port 8001              # HTTP on 8001, gRPC on 8081
    GRPC_PORT=8081 uvicorn batched_server:app --port 8001 --workers 4  # each worker binds 8081 (SO_REUSEPORT)

    import numpy as np, tritonclient.grpc as grpcclient         # pip install 'tritonclient[grpc]'
    client = grpcclient.InferenceServerClient("127.0.0.1:8081")
    text = grpcclient.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"I loved it"], [b"dull"]], dtype=object))
    result = client.infer("sentiment", [text], headers={"authorization": "Bearer KEY"}, client_timeout=2.0)
    result.as_numpy("label"), result.as_numpy("score")         # [[b"POSITIVE"], ...], [[0.998], ...]

    grpcurl -plaintext -import-path . -proto serving/grpc_service.proto -d '{"model_name": "sentiment",
      "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1],
                  "contents": {"bytes_contents": ["SSBsb3ZlZCBpdA=="]}}]}' \\
      127.0.0.1:8081 inference.GRPCInferenceService/ModelInfer     # from the repository root; bytes in base64
    # -> {"modelName": "sentiment", ..., "rawOutputContents": ["CAAAAFBPU0lUSVZF", "Vu8ZPw=="]}
    #    raw, as Triton answers: label = 4-byte little-endian length + b"POSITIVE", score = FP32 little-endian

The service is the protocol's `inference.GRPCInferenceService`: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata and ModelInfer, on every interface, from the app's lifespan once the model is
warm until shutdown (stopped gracefully before the model). Its messages are serving/grpc_predict_v2.proto's,
wire-identical to the protocol's but in a package of our own, so tritonclient can live in the same process;
the methods are registered here by hand, and the service is declared for tools in serving/grpc_service.proto.

Each call is adapted onto the same ASGI app as HTTP, its middleware included (serving/grpc_asgi.py):
ModelInfer is POST /v2/models/<model_name>/infer with the binary tensor extension (outputs asked binary,
sent back as raw_output_contents), the others are serving/oip.py's GET routes. The call's metadata are the
headers (authorization, x-api-key, x-request-id, ...), its peer the client address, its deadline the
request's where shorter than REQUEST_TIMEOUT_MS, and a call cancelled or expired while queued is a
disconnect: it is dropped, never computed. Keys, rate limits, validation, the batcher, admission,
deadlines, metrics, logs and request IDs are thus HTTP's by construction. HTTP statuses become gRPC codes
(grpc_asgi.STATUS_CODES) with the error's text as message; x-request-id and retry-after travel in the
trailing metadata. Calls are also counted as sentimentalyzer_grpc_requests_total{method, code}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from starlette.types import ASGIApp

from serving import grpc_predict_v2_pb2 as pb
from serving.grpc_asgi import Code, Forwarder, HttpAnswer, Refused
from serving.oip import HEADER_LENGTH, OUTPUTS
from serving.ops import Observability

log = logging.getLogger("sentimentalyzer.grpc")
SERVICE = "inference.GRPCInferenceService"


async def start(app: ASGIApp, port: int, obs: Observability) -> grpc.aio.Server:
    """Serves the protocol on `port` until `stop`; raises if the port cannot be bound."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])  # every front end of `--workers N` binds it
    server.add_generic_rpc_handlers([handlers(Adapter(app, obs))])
    try:
        bound = server.add_insecure_port(f"[::]:{port}")
    except RuntimeError as exc:  # grpcio raises on a port in use; older ones returned 0
        raise RuntimeError(f"GRPC_PORT {port}: cannot listen there ({exc})") from None
    if bound == 0:
        raise RuntimeError(f"GRPC_PORT {port}: cannot listen there")
    await server.start()
    log.info("Open Inference Protocol over gRPC on port %d", port)
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuses new calls at once; those in flight get `grace_s` to finish."""
    await server.stop(grace_s)


def handlers(adapter: Adapter) -> grpc.GenericRpcHandler:
    methods: dict[str, tuple[Callable[[Any, Any], Awaitable[Any]], Any, Any]] = {
        "ServerLive": (adapter.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (adapter.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (adapter.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (adapter.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (adapter.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (adapter.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                adapter.counted(name, method),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (method, request, response) in methods.items()
        },
    )


class Adapter:
    """The protocol's methods, each one HTTP request through the app."""

    def __init__(self, app: ASGIApp, obs: Observability) -> None:
        self.http, self.obs = Forwarder(app), obs

    def counted(self, name: str, method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        """`method` with its status counted, and Refused or a crash turned into the call's status."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = Code.INTERNAL
            try:
                response = await method(request, context)
                code = Code.OK
                return response
            except Refused as refused:
                code = refused.code
                await context.abort(refused.code, refused.message, refused.trailers)
                raise  # abort raises; this line only tells readers (and mypy) that nothing returns
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                remaining = context.time_remaining()
                code = Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED
                raise
            except Exception:
                log.exception("gRPC %s failed", name)
                await context.abort(Code.INTERNAL, "internal server error")
                raise
            finally:
                self.obs.grpc_requests.labels(name, code.name).inc()

        return call

    async def server_live(self, _: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        answer = await self.http.forward(context, "GET", "/v2/health/live")
        return pb.ServerLiveResponse(live=bool(answer.json()["live"]))

    async def server_ready(self, _: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        answer = await self.http.forward(context, "GET", "/v2/health/ready")
        return pb.ServerReadyResponse(ready=bool(answer.json(503).get("ready", False)))

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        answer = await self.http.forward(context, "GET", _model_path(request.name, request.version) + "/ready")
        return pb.ModelReadyResponse(ready=bool(answer.json(503).get("ready", False)))

    async def server_metadata(
        self, _: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**(await self.http.forward(context, "GET", "/v2")).json())

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        meta = (await self.http.forward(context, "GET", _model_path(request.name, request.version))).json()
        tensors = {k: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[k]] for k in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors
        )

    async def model_infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        head, binary, problem = infer_body(request)
        path = _model_path(request.model_name, request.model_version) + "/infer"
        answer = await self.http.forward(context, "POST", path, head + binary, header_length=len(head), invalid=problem)
        return infer_response(answer)


def infer_body(request: pb.ModelInferRequest) -> tuple[bytes, bytes, str | None]:
    """The HTTP body of a ModelInfer: the JSON header, then each input's elements in the binary extension's
    form; and why the call cannot be forwarded as it is, if it cannot (the app refuses it with 422)."""
    raw, problem = list(request.raw_input_contents), None
    if raw and len(raw) != len(request.inputs):
        problem = f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs"
    inputs, tail = [], b""
    for i, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw and tensor.HasField("contents"):
            problem = f"input {tensor.name!r} has both `contents` and raw_input_contents"
        data = raw[i] if i < len(raw) else None
        if data is None and tensor.datatype == "BYTES":  # raw's form: a 4-byte little-endian length, then the bytes
            data = b"".join(struct.pack("<I", len(x)) + x for x in tensor.contents.bytes_contents)
        if data is not None:
            spec["parameters"] = {"binary_data_size": len(data)}
            tail += data
        else:
            spec["data"] = []  # the model takes BYTES only: other contents are refused by datatype, unread
        inputs.append(spec)
    outputs = [
        {"name": name, "parameters": {"binary_data": True}} for name in [o.name for o in request.outputs] or OUTPUTS
    ]
    head: dict[str, Any] = {"inputs": inputs, "outputs": outputs}
    if request.id:
        head["id"] = request.id
    return json.dumps(head).encode(), tail, problem


def infer_response(answer: HttpAnswer) -> pb.ModelInferResponse:
    """The HTTP inference answer (JSON header, then binary outputs) as a ModelInferResponse."""
    if answer.status != 200:
        raise Refused(answer)
    cut = int(answer.headers.get(HEADER_LENGTH, len(answer.body)))
    head, tail = json.loads(answer.body[:cut]), answer.body[cut:]
    response = pb.ModelInferResponse(
        model_name=head["model_name"], model_version=head.get("model_version", ""), id=head.get("id", "")
    )
    at = 0
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]  # every output was asked binary
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        response.raw_output_contents.append(tail[at : at + size])
        at += size
    return response


def _model_path(name: str, version: str) -> str:
    # a version, or a name that is not the model, finds no route: 404 (NOT_FOUND), after keys and limits
    return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
