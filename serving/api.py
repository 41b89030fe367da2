"""The HTTP contract both servers share (../shared/SPEC.md): schemas, errors, limits and common routes.

    from serving.api import build_app
    app = build_app("naive", lifespan, settings)   # /health /ready /metrics + error handling
    app.post("/predict")(...)                      # each server adds its own prediction routes

Everything a client can send wrong ends as a JSON 4xx here, never a 500: pydantic validates the
body, `BodyLimit` refuses bodies over 1 MiB before they are parsed, and the handlers below keep the
echoed input out of error bodies (a lone surrogate in it would otherwise break JSON encoding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import guard
from serving.ops import Observability, RequestContext, configure_logging
from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.api")
MAX_BODY_BYTES = 1 << 20


def clean_text(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(clean_text)]


class PredictRequest(BaseModel):
    text: Text = Field(examples=["I loved it"])


class BatchRequest(BaseModel):
    texts: list[Text] = Field(min_length=1, examples=[["I loved it", "dull and far too long"]])


class Label(BaseModel):
    label: str = Field(examples=["POSITIVE"])
    score: float = Field(description="probability of the returned label", examples=[0.998])


class PredictResponse(Label):
    latency_ms: float


class BatchedPredictResponse(PredictResponse):
    batch_size: int = Field(description="items that shared the forward pass that served this one")


class BatchResponse(BaseModel):
    predictions: list[Label]
    latency_ms: float


class ApiError(Exception):
    """An error answer with a status, a JSON detail and optional headers."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def too_long(field: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, for limits that come from settings rather than the schema."""
    return RequestValidationError([{"type": "too_long", "loc": ("body", *field), "msg": message}])


def check_texts(settings: Settings, texts: list[str], batch: bool) -> None:
    if batch and len(texts) > settings.max_batch_items:
        raise too_long(("texts",), f"at most {settings.max_batch_items} texts (MAX_BATCH_ITEMS), got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            loc: tuple[str | int, ...] = ("texts", i) if batch else ("text",)
            raise too_long(loc, f"at most {settings.max_text_chars} characters (MAX_TEXT_CHARS), got {len(text)}")


def require_ready(request: Request) -> Settings:
    """The app's settings, or 503 while the model is not loaded and warm (or the worker died)."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready():
        raise ApiError(503, "model not ready", {"Retry-After": "1"})
    settings: Settings = request.app.state.settings
    return settings


def build_app(
    kind: str, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]], settings: Settings
) -> FastAPI:
    """A FastAPI app with the shared routes, handlers and middleware, for these settings."""
    app = FastAPI(
        title=f"Sentimentalyzer ({kind})",
        lifespan=lifespan,
        description="DistilBERT SST-2 sentiment; contract: shared/SPEC.md",
    )
    app.state.kind = kind
    app.state.settings = settings
    app.state.service = None  # set by the lifespan once loaded and warm
    # the batched server's engine metrics live in its engine process: /metrics adds them from there
    app.state.obs = Observability(kind, engine_side=kind != "batched")
    _add_handlers(app)
    _add_common_routes(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    configure_logging(settings)  # before uvicorn's first line, so LOG_FORMAT=json covers every line
    if guard.enabled(settings):  # inside RequestContext: refusals get a request ID, a log line, metrics
        app.add_middleware(guard.Guard, settings=settings, obs=app.state.obs)
    app.add_middleware(RequestContext, obs=app.state.obs, settings_of=lambda: app.state.settings)
    return app


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # input and ctx echo what the client sent, which may not even be encodable
        detail = [{k: v for k, v in err.items() if k in ("type", "loc", "msg")} for err in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI answers a body it cannot decode with a bare 400; the spec's malformed-JSON row is 422
            return JSONResponse(
                {"detail": [{"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error"}]}, status_code=422
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def _add_common_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        service = request.app.state.service
        ok = service is not None and service.ready()
        info = service.describe() if service is not None else {}
        return JSONResponse({"status": "ready" if ok else "not ready", **info}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        service = request.app.state.service
        engine_text = await service.metrics_text() if hasattr(service, "metrics_text") else b""
        body, content_type = request.app.state.obs.exposition(engine_text)
        return Response(body, media_type=content_type)


class BodyLimit:
    """Refuses bodies over max_bytes with a JSON 413 before they are parsed, declared or streamed.

    (FastAPI's own max_body_size answers a declared oversize length in plain text, which the
    contract does not allow.) A streamed body raises HTTPException from receive(): FastAPI lets
    that one through its body reading, and the handler above turns it into JSON.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._detail}, status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, self._detail)
            return message

        await self.app(scope, limited, send)

    @property
    def _detail(self) -> str:
        return f"request body over {self.max_bytes} bytes"
