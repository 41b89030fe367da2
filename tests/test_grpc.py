"""The Open Inference Protocol over gRPC (serving/grpc_server.py) on both servers, driven by tritonclient.grpc.

    pytest tests/test_grpc.py -q      # ~16 s past collection: three servers in this process, each started once

Each server is a real uvicorn with GRPC_PORT set, run in this process on one background event loop, so a
module pays one engine start (the batched server's, with tests/faults.py's engine so a test can hold it);
a third (naive) server has API keys and a rate limit. tritonclient drives them as a Triton user would; calls
that need trailing metadata or hand-made tensors go through a plain channel with our own messages.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import uvicorn
import uvloop
from fastapi import FastAPI, Request
from google.protobuf import descriptor_pb2

import batched_server
import naive_server
from serving import grpc_predict_v2_pb2 as pb
from serving.api import ApiError
from serving.engine_client import EngineError
from serving.grpc_server import SERVICE
from serving.oip import GRPC_EXTENSION
from serving.ops import Observability
from serving.settings import Settings
from tests.faults import HANG
from tests.processes import delta, free_port, metrics_at

grpcclient = pytest.importorskip("tritonclient.grpc")
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
Code = grpc.StatusCode
TEXTS = ["I loved it", "dull and far too long", "It was fine, I guess"]
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
COMPUTED = "sentimentalyzer_batch_size_sum"  # items that went through the model
DROPPED = 'sentimentalyzer_dropped_total{reason="%s"}'
CALLS = 'sentimentalyzer_grpc_requests_total{code="%s",method="ModelInfer"}'


@dataclass
class Running:
    app: FastAPI
    http: str
    channel: grpc.Channel
    triton: Any  # tritonclient.grpc.InferenceServerClient
    faults: Path | None = None

    def stub(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        response = getattr(pb, f"{method}Response")
        return self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def call(self, method: str, request: Any, **kwargs: Any) -> tuple[Any, grpc.Call]:
        """(response, call): the call's trailing_metadata() holds x-request-id and retry-after."""
        return self.stub(method).with_call(request, **kwargs)

    def infer(self, request: pb.ModelInferRequest, **kwargs: Any) -> pb.ModelInferResponse:
        return self.call("ModelInfer", request, **kwargs)[0]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop (uvloop, uvicorn's default) in a thread, serving every server of this module."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="servers", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@contextmanager
def served(loop: asyncio.AbstractEventLoop, app: FastAPI, faults: Path | None = None) -> Iterator[Running]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    done = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    deadline = time.monotonic() + 120
    while not server.started:
        assert not done.done() and time.monotonic() < deadline, f"the server did not start: {done.exception()}"
        time.sleep(0.05)
    target = f"127.0.0.1:{app.state.settings.grpc_port}"
    channel, triton = grpc.insecure_channel(target), grpcclient.InferenceServerClient(target)
    try:
        yield Running(app, f"http://127.0.0.1:{server.config.port}", channel, triton, faults)
    finally:
        triton.close()
        channel.close()
        server.should_exit = True
        done.result(timeout=60)


def settings_for(model_dir: str, **changes: Any) -> Settings:
    return Settings(
        model_id=model_dir, model_fallback=False, device="cpu", dtype="fp32", grpc_port=free_port(), **changes
    )


@pytest.fixture(scope="module")
def naive(loop: asyncio.AbstractEventLoop, tiny_model_dir: str) -> Iterator[Running]:
    with served(loop, naive_server.create_app(settings_for(tiny_model_dir))) as running:
        yield running


@pytest.fixture(scope="module")
def batched(
    loop: asyncio.AbstractEventLoop, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    faults = tmp_path_factory.mktemp("grpc-faults")
    settings = settings_for(
        tiny_model_dir,
        engine_factory="tests.faults:fault_engine",
        max_queue=16,
        max_batch_size=8,
        max_wait_ms=0,
        request_timeout_ms=5000,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAULT_DIR", str(faults))  # the engine process inherits it
        with served(loop, batched_server.create_app(settings), faults) as running:
            yield running


@pytest.fixture(scope="module")
def guarded(loop: asyncio.AbstractEventLoop, tiny_model_dir: str) -> Iterator[Running]:
    settings = settings_for(tiny_model_dir, api_keys=("k1", "k2"), rate_limit="5/minute")
    with served(loop, naive_server.create_app(settings)) as running:
        yield running


@pytest.fixture(params=["naive", "batched"])
def server(request: pytest.FixtureRequest) -> Running:
    running: Running = request.getfixturevalue(request.param)
    return running


def text_input(texts: list[str]) -> Any:
    text = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return text


def tensor(datatype: str = "BYTES", shape: tuple[int, ...] = (1, 1), **kwargs: Any) -> Any:
    return pb.ModelInferRequest.InferInputTensor(name="text", datatype=datatype, shape=list(shape), **kwargs)


def infer_request(texts: list[str], shape: tuple[int, ...] | None = None, **kwargs: Any) -> pb.ModelInferRequest:
    """Texts in raw_input_contents, as tritonclient sends them."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    return pb.ModelInferRequest(
        model_name="sentiment", inputs=[tensor(shape=shape or (len(texts), 1))], raw_input_contents=[raw], **kwargs
    )


def metrics(server: Running) -> dict[str, float]:
    return metrics_at(server.http)


def until(check: Callable[[], object], limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------- the proto


def _fields(message: Any) -> dict[str, Any]:
    """A message's fields (number, type, repeated, message type within its package, oneof), nested included."""
    out: dict[str, Any] = {}
    for f in message.fields:
        kind = f.message_type.full_name.removeprefix(f.message_type.file.package + ".") if f.message_type else None
        out[f.name] = (f.number, f.type, f.is_repeated, kind, f.containing_oneof.name if f.containing_oneof else None)
    return out | {nested.name: _fields(nested) for nested in message.nested_types}


def test_our_messages_are_tritonclients_on_the_wire() -> None:
    ours = pb.DESCRIPTOR.message_types_by_name
    assert len(ours) == 14
    for name, message in ours.items():
        assert _fields(message) == _fields(service_pb2.DESCRIPTOR.message_types_by_name[name]), name
    for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        if method.name in METHODS:
            assert (method.input_type.name, method.output_type.name) == (
                f"{method.name}Request",
                f"{method.name}Response",
            )


def test_generated_code_is_what_make_proto_writes(root: Path, tmp_path: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{root}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    assert protoc.main([*args, str(root / "serving/grpc_predict_v2.proto")]) == 0
    for suffix in ("_pb2.py", "_pb2.pyi"):
        generated = (tmp_path / f"serving/grpc_predict_v2{suffix}").read_text()
        assert generated == (root / f"serving/grpc_predict_v2{suffix}").read_text(), f"run `make proto` ({suffix})"


def test_the_declared_service_is_the_one_served(root: Path, tmp_path: Path, naive: Running) -> None:
    from grpc_tools import protoc

    out = tmp_path / "service.pb"
    args = ["protoc", f"-I{root}", f"--descriptor_set_out={out}", str(root / "serving/grpc_service.proto")]
    assert protoc.main(args) == 0
    (declared,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (service,) = declared.service
    assert f"{declared.package}.{service.name}" == SERVICE
    typed = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert typed == {m: (f".sentimentalyzer.v2.{m}Request", f".sentimentalyzer.v2.{m}Response") for m in METHODS}
    for method in METHODS[:-1]:  # every path the file declares is served (ModelInfer: every test below)
        request = getattr(pb, f"{method}Request")
        naive.call(method, request(name="sentiment") if method.startswith("Model") else request())


# ------------------------------------------------------------------------------------------- answers


def test_health_and_metadata(server: Running) -> None:
    client = server.triton
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sentiment")
    assert client.get_server_metadata().name == "sentimentalyzer"
    meta = client.get_model_metadata("sentiment")
    assert meta.platform == f"sentimentalyzer-{server.app.state.kind}" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("label", "BYTES", [-1, 1]),
        ("score", "FP32", [-1, 1]),
    ]
    for wrong in (lambda: client.get_model_metadata("nope"), lambda: client.is_model_ready("sentiment", "7")):
        with pytest.raises(grpcclient.InferenceServerException) as unknown:
            wrong()
        assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_infer_answers_what_http_answers(server: Running) -> None:
    texts = TEXTS + [f"review {i}: {'a delight' if i % 2 else 'a chore'}" for i in range(13)]  # a batch of 16
    result = server.triton.infer("sentiment", [text_input(texts)], request_id="r1")
    labels, scores = result.as_numpy("label"), result.as_numpy("score")
    assert labels.shape == scores.shape == (16, 1) and scores.dtype == np.float32
    assert result.get_response().id == "r1" and result.get_response().model_name == "sentiment"
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [16, 1], "data": texts}]}
    v2 = {
        o["name"]: o["data"]
        for o in httpx.post(f"{server.http}/v2/models/sentiment/infer", json=body).json()["outputs"]
    }
    assert [x.decode() for x in labels.ravel()] == v2["label"]
    assert scores.ravel().tolist() == pytest.approx(v2["score"], abs=1e-4)
    for i, text in enumerate(TEXTS):
        fresh = httpx.post(f"{server.http}/predict", json={"text": text}).json()
        assert labels[i, 0].decode() == fresh["label"] and scores[i, 0] == pytest.approx(fresh["score"], abs=1e-4)
    # the tensor in `contents` rather than raw, and one output asked for: raw_output_contents holds it alone
    contents = pb.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS])
    request = pb.ModelInferRequest(
        model_name="sentiment",
        inputs=[tensor(shape=(3, 1), contents=contents)],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="score")],
    )
    only = server.infer(request)
    assert [o.name for o in only.outputs] == ["score"] and len(only.raw_output_contents) == 1
    assert list(struct.unpack("<3f", only.raw_output_contents[0])) == pytest.approx(scores[:3, 0].tolist(), abs=1e-4)


BAD = [  # (request, code, what the message names)
    (infer_request(["   "]), Code.INVALID_ARGUMENT, "empty"),
    (
        pb.ModelInferRequest(
            model_name="sentiment", inputs=[tensor("FP32", contents=pb.InferTensorContents(fp32_contents=[1.0]))]
        ),
        Code.INVALID_ARGUMENT,
        "BYTES",
    ),
    (infer_request(["a", "b"], shape=(1, 2)), Code.INVALID_ARGUMENT, "shape"),
    (infer_request(["a", "b"], shape=(3, 1)), Code.INVALID_ARGUMENT, "fewer than the 3"),
    (infer_request(["a"] * 65), Code.INVALID_ARGUMENT, "MAX_BATCH_ITEMS"),
    (
        infer_request(["a"], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
        Code.INVALID_ARGUMENT,
        "unknown output",
    ),
    (
        pb.ModelInferRequest(model_name="sentiment", inputs=[tensor()], raw_input_contents=[b"", b""]),
        Code.INVALID_ARGUMENT,
        "raw_input_contents",
    ),
    (pb.ModelInferRequest(model_name="sentiment", inputs=[tensor()]), Code.INVALID_ARGUMENT, "fewer than the 1"),
    (pb.ModelInferRequest(model_name="nope", inputs=[tensor()]), Code.NOT_FOUND, "Not Found"),
]


def test_every_error_has_its_grpc_code(server: Running) -> None:
    for request, code, names in BAD:
        with pytest.raises(grpc.RpcError) as refused:
            server.infer(request)
        assert refused.value.code() == code and names in refused.value.details(), (request, refused.value.details())


def test_keys_and_rate_limits(guarded: Running) -> None:
    for metadata, names in [((), "missing API key"), ((("authorization", "Bearer nope"),), "invalid API key")]:
        with pytest.raises(grpc.RpcError) as refused:
            guarded.infer(infer_request(TEXTS), metadata=metadata)
        assert refused.value.code() == Code.UNAUTHENTICATED and names in refused.value.details()
    with pytest.raises(grpcclient.InferenceServerException) as anonymous:
        guarded.triton.is_server_live()  # every route but /health and /ready needs a key, as over HTTP
    assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
    assert guarded.triton.is_server_live(headers={"authorization": "Bearer k1"})
    assert guarded.infer(infer_request(TEXTS), metadata=(("x-api-key", "k1"),)).outputs
    for _ in range(5):  # RATE_LIMIT=5/minute, counted per key
        guarded.infer(infer_request(TEXTS[:1]), metadata=(("authorization", "Bearer k2"),))
    with pytest.raises(grpc.RpcError) as limited:
        guarded.infer(infer_request(TEXTS[:1]), metadata=(("authorization", "Bearer k2"),))
    assert limited.value.code() == Code.RESOURCE_EXHAUSTED and "rate limit" in limited.value.details()
    assert int(dict(limited.value.trailing_metadata())["retry-after"]) >= 1


def test_request_ids_and_metrics(naive: Running) -> None:
    before = metrics(naive)
    _, call = naive.call("ModelInfer", infer_request(TEXTS), metadata=(("x-request-id", "grpc-1"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "grpc-1"
    _, call = naive.call("ModelInfer", infer_request(TEXTS))
    assert re.fullmatch(r"[0-9a-f]{32}", dict(call.trailing_metadata())["x-request-id"])
    with pytest.raises(grpc.RpcError) as refused:
        naive.infer(infer_request([""]), metadata=(("x-request-id", "grpc-2"),))
    assert dict(refused.value.trailing_metadata())["x-request-id"] == "grpc-2"
    after = metrics(naive)
    served = 'sentimentalyzer_requests_total{endpoint="/v2/models/sentiment/infer",status="%s"}'
    assert delta(before, after, CALLS % "OK") == 2 and delta(before, after, CALLS % "INVALID_ARGUMENT") == 1
    assert delta(before, after, served % "200") == 2 and delta(before, after, served % "422") == 1


# ------------------------------------------------------------------------------- the batcher, held


@contextmanager
def held_engine(server: Running) -> Iterator[grpc.Future]:
    """The engine's worker held inside a pass (tests/faults.py) until the block ends; yields that call."""
    faults = server.faults
    assert faults is not None
    pid = httpx.get(f"{server.http}/ready").json()["engine_pid"]
    held = server.stub("ModelInfer").future(infer_request([HANG]))
    try:
        until(lambda: (faults / f"hanging-{pid}").read_text() == "1")
        yield held
    finally:
        fd = os.open(faults / f"release-{pid}", os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"x")
        os.close(fd)
    assert held.result(timeout=30).outputs


def dropped(server: Running, before: dict[str, float]) -> float:
    """Items dropped since `before` by deadline or disconnect (a call that expires ends both ways at once)."""
    after = metrics(server)
    return delta(before, after, DROPPED % "deadline") + delta(before, after, DROPPED % "cancelled")


def queue_depth(server: Running) -> int:
    return int(httpx.get(f"{server.http}/ready").json()["queue_depth"])


def test_a_full_queue_is_unavailable_with_retry_after(batched: Running) -> None:
    with held_engine(batched):
        queued = batched.stub("ModelInfer").future(infer_request([f"queued {i}" for i in range(16)]))
        until(lambda: queue_depth(batched) == 16)  # MAX_QUEUE=16
        with pytest.raises(grpc.RpcError) as full:
            batched.infer(infer_request(["one too many"]))
    assert full.value.code() == Code.UNAVAILABLE and "queue full" in full.value.details()
    assert int(dict(full.value.trailing_metadata())["retry-after"]) >= 1
    assert queued.result(timeout=30).outputs


def test_a_deadline_shorter_than_the_timeout_is_the_requests(batched: Running) -> None:
    before = metrics(batched)
    with held_engine(batched):
        started = time.monotonic()
        with pytest.raises(grpcclient.InferenceServerException) as late:
            batched.triton.infer("sentiment", [text_input(["too late"])], client_timeout=0.5)
        waited = time.monotonic() - started
        until(lambda: dropped(batched, before) == 1)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED" and waited < 2.0  # REQUEST_TIMEOUT_MS=5000
    after = metrics(batched)
    assert delta(before, after, COMPUTED) == 1  # the held request only
    assert delta(before, after, CALLS % "DEADLINE_EXCEEDED") == 1


def test_a_call_cancelled_while_queued_is_never_computed(batched: Running) -> None:
    before = metrics(batched)
    with held_engine(batched):
        gone = batched.stub("ModelInfer").future(infer_request(["gone before its turn"]))
        until(lambda: queue_depth(batched) == 1)
        gone.cancel()
        until(lambda: delta(before, metrics(batched), DROPPED % "cancelled") == 1)
    after = metrics(batched)
    assert delta(before, after, COMPUTED) == 1  # the held request only
    assert delta(before, after, CALLS % "CANCELLED") == 1


@pytest.mark.anyio
async def test_a_shorter_grpc_deadline_moves_the_arrival_that_the_engine_counts_from(settings: Settings) -> None:
    """What the engine is handed, exactly (the race of the test above cannot tell who dropped the call)."""
    service = batched_server.BatchedService(
        settings.replace(request_timeout_ms=10_000), Observability("batched", False)
    )
    arrivals: list[float] = []

    class Engine:
        async def submit(self, ids: list[list[int]], arrived: float) -> None:
            arrivals.append(arrived)
            raise EngineError("deadline", "still queued")

    async def never_disconnects() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    service.client, service.tokenizer = Engine(), lambda texts: [[101, 102] for _ in texts]  # type: ignore[assignment]
    try:
        for remaining in (0.5, 60.0, None):
            extension = {} if remaining is None else {"deadline": time.monotonic() + remaining}
            scope = {"type": "http", "headers": [], "extensions": {GRPC_EXTENSION: extension}}
            started = time.monotonic()
            with pytest.raises(ApiError):
                await service.predict(Request(scope, never_disconnects), ["a"])
            if remaining == 0.5:  # the request's deadline: REQUEST_TIMEOUT_MS from its arrival ends with it
                assert arrivals[-1] + 10.0 == pytest.approx(started + 0.5, abs=0.05)
            else:  # no deadline, or a longer one: REQUEST_TIMEOUT_MS from now
                assert started <= arrivals[-1] <= time.monotonic()
    finally:
        service._tokenizer.shutdown(wait=True)
