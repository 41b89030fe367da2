"""One text a call over the Open Inference Protocol's gRPC ModelInfer, timed and reported as a Locust request.

    python -c "from harness.grpc_infer import RawTransport; print(RawTransport('127.0.0.1:8081').infer('good'))"
    locust -f locustfile.py --headless -u 32 -r 32 -t 30s --protocol grpc --host grpc://127.0.0.1:8081

The Locust side is harness/grpc_user.py; this module imports no Locust (importing locust gevent-patches
the process, which the tests must not be), so the tests drive everything here with fakes. Two transports
send the same request, `text` BYTES [1, 1] to model `sentiment`, and return the `label` (BYTES) and `score`
(FP32) outputs of the one row, read from raw_output_contents (what a server answering binary sends) or
from each output's typed contents:

- `raw` (the default): the protocol's messages (tritonclient.grpc.service_pb2, package `inference`) on a
  plain grpc unary-unary call, the answer parsed here.
- `triton`: tritonclient.grpc's InferenceServerClient, the client a Triton user would write (numpy arrays,
  InferInput, InferResult).

`python -m harness.grpc_infer --target 127.0.0.1:8081` measures what each costs the load generator: CPU
time per call of this process, greenlets on gevent as under Locust, rounds alternating. Against a no-model
gRPC server on a busy 2-core AMD EPYC (8 greenlets, 3,000 calls a round, 6 rounds each): raw 512 to 620
us a call, triton 586 to 724: raw costs Locust the same or less, so it is the default.

GrpcClient fires `environment.events.request` per call, as Locust's documentation does for gRPC:
request_type "grpc", name "ModelInfer", response_time in ms (the call alone, not the check),
response_length (the answer's bytes), and an exception for a failed call or a wrong answer, with a short
stable message, so Locust's failure table groups like failures together.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from tritonclient.grpc import service_pb2

MODEL = "sentiment"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
TIMEOUT_S = 60.0  # FastHttpUser's timeout: longer than REQUEST_TIMEOUT_MS, so the server's own deadline rules
# one connection per user, as each HTTP user holds one: channels to one target otherwise share connections
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
OUTPUTS = ("label", "score")

_gevent_patched = False


def patch_gevent() -> None:
    """gRPC's C core on gevent, once: before any channel exists, or one waiting call blocks every user."""
    global _gevent_patched
    if not _gevent_patched:
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _gevent_patched = True


def grpc_target(host: str | None) -> str:
    """`127.0.0.1:8081` from Locust's --host `grpc://127.0.0.1:8081` (the scheme may be left out)."""
    address = (host or "").strip().removeprefix("grpc://").rstrip("/")
    name, _, port = address.rpartition(":")
    if not name or "/" in address or not port.isdigit():
        raise ValueError(f"--protocol grpc needs --host grpc://HOST:PORT (the server's GRPC_PORT), got {host!r}")
    return address


class AnswerError(ValueError):
    """An answer that arrived but breaks the contract (the call itself succeeded)."""


class InferFailure(Exception):
    """What Locust records for a failed request: one short message, the same for the same cause."""


def failure(exc: BaseException) -> InferFailure:
    """exc as a stable message: an RpcError's str carries a timestamped debug string, one table row each."""
    if isinstance(exc, AnswerError):
        return InferFailure(str(exc))
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return InferFailure(f"gRPC {exc.code().name}: {(exc.details() or '')[:80]}")
    status, message = getattr(exc, "status", None), getattr(exc, "message", None)
    if callable(status) and callable(message):  # tritonclient's InferenceServerException
        code = str(status() or "error").removeprefix("StatusCode.")
        return InferFailure(f"gRPC {code}: {str(message() or '')[:80]}")
    return InferFailure(f"{type(exc).__name__}: {str(exc)[:80]}")


def infer_request(text: str, model: str = MODEL) -> service_pb2.ModelInferRequest:
    """One text as the protocol's [1, 1] BYTES input `text`; no outputs named, so the server sends both."""
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(text.encode("utf-8"))
    return service_pb2.ModelInferRequest(model_name=model, inputs=[tensor])


def _value(out: Any, raw: bytes | None) -> Any:
    if out.datatype == "BYTES":
        if raw is None:
            items = list(out.contents.bytes_contents)
        else:  # the binary form: each element a 4-byte little-endian length, then its bytes
            n = struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else -1
            items = [raw[4:]] if n == len(raw) - 4 else []
        if len(items) != 1:
            raise AnswerError(f"expected one {out.name} output")
        return items[0].decode("utf-8", errors="replace")
    if out.datatype == "FP32":
        values = list(out.contents.fp32_contents) if raw is None else list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if len(values) != 1 or raw is not None and len(raw) != 4:
            raise AnswerError(f"expected one {out.name} output")
        return values[0]
    raise AnswerError(f"{out.name} is {out.datatype}, not {'BYTES' if out.name == 'label' else 'FP32'}")


def read_outputs(response: service_pb2.ModelInferResponse) -> dict[str, Any]:
    """{"label": str, "score": float} of a one-row answer; AnswerError says what is missing or malformed."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise AnswerError(f"{len(raw)} raw_output_contents for {len(response.outputs)} outputs")
    values: dict[str, Any] = {}
    for i, out in enumerate(response.outputs):
        if out.name in OUTPUTS:
            if list(out.shape) != [1, 1]:
                raise AnswerError(f"{out.name} has shape {list(out.shape)}, not [1, 1]")
            values[out.name] = _value(out, raw[i] if raw else None)
    missing = [name for name in OUTPUTS if name not in values]
    if missing:
        raise AnswerError(f"expected one {missing[0]} output")
    return values


class Transport(Protocol):
    def infer(self, text: str) -> tuple[dict[str, Any], int]: ...  # the outputs, and the answer's bytes

    def close(self) -> None: ...


class RawTransport:
    """The protocol's messages on a plain unary-unary call: nothing built or parsed that the check skips."""

    def __init__(self, target: str, model: str = MODEL) -> None:
        self.model = model
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        # no response deserializer: the bytes come back as they arrived, so their length is the answer's size
        self._call = self._channel.unary_unary(
            METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString
        )

    def infer(self, text: str) -> tuple[dict[str, Any], int]:
        raw: bytes = self._call(infer_request(text, self.model), timeout=TIMEOUT_S)
        return read_outputs(service_pb2.ModelInferResponse.FromString(raw)), len(raw)

    def close(self) -> None:
        self._channel.close()


class TritonTransport:
    """tritonclient.grpc's InferenceServerClient, as a Triton user calls it."""

    def __init__(self, target: str, model: str = MODEL) -> None:
        import numpy as np
        import tritonclient.grpc as triton  # only this transport needs numpy and the client

        self.model, self._np, self._triton = model, np, triton
        self._client = triton.InferenceServerClient(target, channel_args=CHANNEL_OPTIONS)

    def infer(self, text: str) -> tuple[dict[str, Any], int]:
        tensor = self._triton.InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(self._np.array([[text.encode("utf-8")]], dtype=object))
        result = self._client.infer(self.model, [tensor], client_timeout=TIMEOUT_S)
        values: dict[str, Any] = {}
        for name in OUTPUTS:
            array = result.as_numpy(name)
            if array is None or array.shape != (1, 1):
                raise AnswerError(f"expected one {name} output")
            item = array[0, 0]
            values[name] = item.decode("utf-8", errors="replace") if isinstance(item, bytes) else float(item)
        return values, result.get_response().ByteSize()

    def close(self) -> None:
        self._client.close()


TRANSPORTS: dict[str, Callable[[str, str], Transport]] = {"raw": RawTransport, "triton": TritonTransport}


class GrpcClient:
    """Times each ModelInfer and fires Locust's request event for it, success or failure."""

    def __init__(self, environment: Any, transport: Transport, check: Callable[[dict[str, Any]], str | None]) -> None:
        self.environment, self.transport, self.check = environment, transport, check

    def infer(self, text: str) -> dict[str, Any] | None:
        """One call; the outputs when they pass the check, else None (the failure is in Locust's stats)."""
        outputs: dict[str, Any] | None = None
        length, exception = 0, None
        start = time.perf_counter()
        try:
            outputs, length = self.transport.infer(text)
        except Exception as exc:  # every way a call fails is a failed request, never a crashed user
            exception = failure(exc)
        elapsed_ms = (time.perf_counter() - start) * 1000  # the call alone: HTTP rows time no check either
        if outputs is not None:
            why = self.check(outputs)
            exception = InferFailure(why) if why else None
        self.environment.events.request.fire(
            request_type="grpc",
            name="ModelInfer",
            response_time=elapsed_ms,
            response_length=length,
            response=outputs,
            context={},
            exception=exception,
        )
        return outputs if exception is None else None

    def close(self) -> None:
        self.transport.close()


# ------------------------------------------------------------------ what each transport costs Locust


def cpu_per_call(kind: str, target: str, calls: int, greenlets: int) -> tuple[float, float]:
    """Microseconds of this process's CPU per call, and calls/s, over `calls` calls from `greenlets` users."""
    import gevent

    transports = [TRANSPORTS[kind](target, MODEL) for _ in range(greenlets)]
    for t in transports:  # connected before the clock starts
        t.infer("warm-up")

    def work(t: Transport) -> None:
        for _ in range(calls // greenlets):
            t.infer("a fairly ordinary review of a film that was fine")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    gevent.joinall([gevent.spawn(work, t) for t in transports])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for t in transports:
        t.close()
    done = calls // greenlets * greenlets
    return cpu / done * 1e6, done / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="CPU per ModelInfer call of each transport, on gevent as under Locust")
    ap.add_argument("--target", required=True, help="HOST:PORT of a server's GRPC_PORT")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--greenlets", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from gevent import monkey

    monkey.patch_all()  # as locust does on import, then gRPC on gevent
    patch_gevent()
    for r in range(a.rounds):  # order alternates, so drift falls on both
        for kind in ("raw", "triton") if r % 2 == 0 else ("triton", "raw"):
            cpu_us, rate = cpu_per_call(kind, a.target, a.calls, a.greenlets)
            print(f"round {r + 1} {kind}: {cpu_us:.0f} us CPU a call, {rate:.0f} calls/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
