"""A gRPC call as one HTTP request through an ASGI app: what serving/grpc_server.py serves the protocol with.

    forwarder = Forwarder(app)                       # the FastAPI app, its middleware included
    answer = await forwarder.forward(context, "GET", "/v2/health/ready")   # in a grpc.aio method
    answer.json(503)                                 # its JSON body, or Refused: the gRPC status it maps to

The request carries the call's metadata as headers (less those describing the body, which the forwarder
sets), its peer as the client address, and in the scope extension serving.oip.GRPC_EXTENSION its
deadline (time.monotonic()) and, where the call could not be expressed as HTTP, why (the app refuses it
with 422, after keys and limits, as any bad input). receive() gives the body once, then waits until the
call has ended: a call the client cancelled or let expire is an `http.disconnect`, as if an HTTP client had
left, and the app's request is not cancelled with it but left to notice (the batched server then drops
its queued items). The answer's x-request-id and retry-after become the call's trailing metadata.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import grpc
from starlette.types import ASGIApp, Message

from serving.oip import GRPC_EXTENSION, HEADER_LENGTH

Code = grpc.StatusCode
STATUS_CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    413: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    499: Code.CANCELLED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
TRAILERS = ("x-request-id", "retry-after")
# headers the adapter sets itself: a client's metadata must not describe a body it did not send
_OWN_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding", "host", HEADER_LENGTH})


@dataclass
class HttpAnswer:
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, self.headers[k]) for k in TRAILERS if k in self.headers)

    def json(self, *also_ok: int) -> dict[str, Any]:
        """The JSON body of a 200 (or of a status in `also_ok`, e.g. not ready's 503); else Refused."""
        if self.status != 200 and self.status not in also_ok:
            raise Refused(self)
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Refused(Exception):
    """An HTTP error answer, as the gRPC status it becomes."""

    def __init__(self, answer: HttpAnswer) -> None:
        try:
            parsed = json.loads(answer.body)
            message = str(parsed.get("error", parsed.get("detail")))
        except (ValueError, AttributeError):
            message = answer.body.decode("utf-8", "replace") or f"HTTP {answer.status}"
        super().__init__(message)
        self.code, self.message, self.trailers = (
            STATUS_CODES.get(answer.status, Code.INTERNAL),
            message,
            answer.trailers(),
        )


class Forwarder:
    """Calls of any method, each forwarded as one HTTP request to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._left: set[asyncio.Future[None]] = set()  # requests still finishing for clients that left

    async def forward(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        path: str,
        body: bytes = b"",
        header_length: int = 0,
        invalid: str | None = None,
    ) -> HttpAnswer:
        """One HTTP request through the app. receive() gives the body, then waits until the call has
        ended: a client that cancels or runs out of time is a disconnect, as if an HTTP client left."""
        ended = asyncio.Event()
        context.add_done_callback(lambda _: ended.set())
        sent = False
        answer, chunks = HttpAnswer(), []

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await ended.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
                }
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        task = asyncio.ensure_future(
            self.app(_scope(context, method, path, body, header_length, invalid), receive, send)
        )
        try:
            await asyncio.shield(task)  # cancelling this call must not cancel the request: it must see it leave
        except asyncio.CancelledError:
            ended.set()
            self._left.add(task)
            task.add_done_callback(self._left.discard)
            raise
        answer.body = b"".join(chunks)
        context.set_trailing_metadata(answer.trailers())
        return answer


def _scope(
    context: grpc.aio.ServicerContext, method: str, path: str, body: bytes, header_length: int, invalid: str | None
) -> dict[str, Any]:
    """The HTTP scope of a call: what uvicorn would build for the same request over HTTP/2."""
    headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in context.invocation_metadata() or ()
        if not k.endswith("-bin") and not k.startswith(":") and k not in _OWN_HEADERS
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    if method == "POST":
        headers.append((b"content-type", b"application/octet-stream"))
        headers.append((HEADER_LENGTH.encode(), str(header_length).encode()))
    extension: dict[str, Any] = {}
    remaining = context.time_remaining()
    if remaining is not None:
        extension["deadline"] = time.monotonic() + remaining
    if invalid:
        extension["invalid"] = invalid
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "2",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": quote(path).encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": _client(context.peer()),
        "server": None,
        "extensions": {GRPC_EXTENSION: extension},
    }


def _client(peer: str) -> tuple[str, int] | None:
    """gRPC's peer ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "unix:...") as an ASGI client."""
    kind, _, address = unquote(peer or "").partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = address.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else 0
    return (peer, 0) if peer else None
