"""Operations plumbing for both servers: Prometheus metrics, request IDs and one log line per request.

    obs = Observability("batched")            # metrics in a registry of this app's own
    body, content_type = obs.exposition()     # what GET /metrics returns
    app.add_middleware(RequestContext, obs=obs, settings_of=lambda: settings)

With PROMETHEUS_MULTIPROC_DIR set (uvicorn --workers N), prometheus-client's multiprocess mode
aggregates every worker's metrics, so a scrape of any worker sees the whole server. The directory
must be empty at start (files of an earlier run would add their counts).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.settings import Settings

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ADMISSION_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)
_KNOWN_PATHS = {
    "/predict",
    "/predict/batch",
    "/health",
    "/ready",
    "/metrics",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/sentiment",
    "/v2/models/sentiment/ready",
    "/v2/models/sentiment/infer",
}


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class EngineMetrics:
    """The metrics of the model's side: passes, the queue, padding. The naive server keeps them in its
    own registry; the batched server's engine process in one of its own, which its front ends fetch."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r, ns = registry, "sentimentalyzer"
        self.registry = registry
        self.batch_size = Histogram(
            "batch_size",
            "items per forward pass",
            namespace=ns,
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "time from enqueue to the start of its batch",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.compute = Histogram(
            "compute_seconds",
            "time one taken batch spends in the worker thread",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.dispatch = Counter(
            "dispatch",
            "batches taken by the worker, by why they started: full (size or token budget), waited "
            "(MAX_WAIT_MS ran out), idle (no companion likely: straight to the model), stopping",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.oldest_wait = Histogram(
            "oldest_wait_seconds",
            "queue wait of the oldest item of each batch",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_depth = Gauge(
            "queue_depth", "items waiting for the model", namespace=ns, registry=r, multiprocess_mode="livesum"
        )
        self.real_tokens = Counter("real_tokens", "tokens of the texts computed", namespace=ns, registry=r)
        self.computed_tokens = Counter("computed_tokens", "tokens computed, padding included", namespace=ns, registry=r)
        self.dropped = Counter(
            "dropped", "items answered without compute, by reason", ["reason"], namespace=ns, registry=r
        )

    def observe_pass(self, items: int, real_tokens: int, computed_tokens: int) -> None:
        """One forward pass: its size and padding."""
        self.batch_size.observe(items)
        self.real_tokens.inc(real_tokens)
        self.computed_tokens.inc(computed_tokens)

    def exposition(self) -> bytes:
        """This registry's text format, with padding efficiency (real / computed tokens)."""
        assert self.registry is not None
        return generate_latest(self.registry) + padding_efficiency(self.registry)


HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Observability:
    """Every metric of one app. With `engine_side` (the naive server) the engine's metrics live here
    too; the batched server's front ends leave them to the engine process and add its text."""

    def __init__(self, kind: str, engine_side: bool = True) -> None:
        self.kind = kind
        # In multiprocess mode values live in files shared by all workers, not in a registry.
        self.registry = None if _multiprocess() else CollectorRegistry()
        r, ns = self.registry, "sentimentalyzer"
        self.requests = Counter(
            "requests", "HTTP requests by endpoint and status", ["endpoint", "status"], namespace=ns, registry=r
        )
        self.latency = Histogram(
            "request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.admission_ratio = Histogram(
            "admission_prediction_ratio",
            "time to answer over what admission predicted on arrival, for requests admitted behind a "
            "queue (REQUEST_TIMEOUT_MS); above 1: later than predicted",
            namespace=ns,
            registry=r,
            buckets=ADMISSION_RATIO_BUCKETS,
        )
        self.ready = Gauge("ready", "1 while /ready answers 200", namespace=ns, registry=r, multiprocess_mode="livemin")
        self.ratelimit_fallbacks = Counter(
            "ratelimit_fallback",
            "rate-limit decisions made in-process because the shared store (REDIS_URL) was unreachable",
            namespace=ns,
            registry=r,
        )
        self.grpc_requests = Counter(
            "grpc_requests",
            "gRPC calls (GRPC_PORT) by method and status code; each is also counted under the HTTP route it "
            "is served by (requests, request_latency_seconds)",
            ["method", "code"],
            namespace=ns,
            registry=r,
        )
        self.engine = EngineMetrics(r) if engine_side else None
        if not engine_side:
            self.engine_up = Gauge(
                "engine_up",
                "1 while the engine process answers its heartbeats and is warm (lowest over front ends)",
                namespace=ns,
                registry=r,
                multiprocess_mode="livemin",
            )
            self.engine_restarts = Counter(
                "engine_restarts", "engine processes started again after one died or stalled", namespace=ns, registry=r
            )
            self.engine_hop = Histogram(
                "engine_hop_seconds",
                "what crossing to the engine process and back added to a request: its time waiting on "
                "the engine less the time the engine held it (encode, IPC, decode, both event loops)",
                namespace=ns,
                registry=r,
                buckets=HOP_BUCKETS,
            )
            self._add_cache_metrics(r)

    def _add_cache_metrics(self, r: CollectorRegistry | None) -> None:
        """The answer cache's (serving/cache.py, CACHE_BYTES): counted per text, in each front end."""
        ns = "sentimentalyzer"
        self.cache_hits = Counter(
            "cache_hits",
            "texts answered from the answer cache, by store: local (this front end's LRU) or redis (REDIS_URL)",
            ["store"],
            namespace=ns,
            registry=r,
        )
        self.cache_misses = Counter(
            "cache_misses", "texts the answer cache sent to the engine", namespace=ns, registry=r
        )
        self.cache_coalesced = Counter(
            "cache_coalesced",
            "texts answered by the computation of an identical text already queued or computing",
            namespace=ns,
            registry=r,
        )
        self.cache_bytes = Gauge(
            "cache_bytes",
            "bytes the answer cache's LRU holds, its table and objects counted (summed over front ends)",
            namespace=ns,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_redis_errors = Counter(
            "cache_redis_errors",
            "answer-cache calls to Redis (REDIS_URL) that failed or timed out, by op: get, set; the cache's "
            "Redis is then bypassed for a few seconds",
            ["op"],
            namespace=ns,
            registry=r,
        )
        for store in ("local", "redis"):  # every series exported from the start, at 0
            self.cache_hits.labels(store)
        for op in ("get", "set"):
            self.cache_redis_errors.labels(op)

    def observe_pass(self, items: int, real_tokens: int, computed_tokens: int) -> None:
        """One forward pass, on the naive server (the batched server's engine observes its own)."""
        if self.engine is not None:
            self.engine.observe_pass(items, real_tokens, computed_tokens)

    def exposition(self, engine_text: bytes = b"") -> tuple[bytes, str]:
        """The text format for GET /metrics: this process's (or every worker's) metrics, padding
        efficiency when the engine's are here, and `engine_text` (the engine process's own)."""
        if self.registry is None:
            forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        body = generate_latest(registry)
        if self.engine is not None:
            body += padding_efficiency(registry)
        return body + engine_text, CONTENT_TYPE_LATEST


def padding_efficiency(registry: CollectorRegistry) -> bytes:
    real, computed = (
        _sample(registry, "sentimentalyzer_real_tokens_total"),
        _sample(registry, "sentimentalyzer_computed_tokens_total"),
    )
    efficiency = real / computed if computed else 1.0
    return (
        b"# HELP sentimentalyzer_padding_efficiency real tokens / computed tokens since start\n"
        b"# TYPE sentimentalyzer_padding_efficiency gauge\n"
        b"sentimentalyzer_padding_efficiency %.6f\n" % efficiency
    )


def forget_dead_workers(path: str) -> None:
    """Drops the live gauges (queue depth, ready) of workers that exited.

    gunicorn calls mark_process_dead from a child_exit hook; uvicorn has no such hook, so a restarted
    or crashed worker's last values would otherwise stay in every scrape.
    """
    for name in os.listdir(path):
        match = re.fullmatch(r"gauge_live\w+?_(\d+)\.db", name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape removed it first
                multiprocess.mark_process_dead(int(match.group(1)), path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        pass
    return True


def _sample(registry: CollectorRegistry, name: str) -> float:
    return float(registry.get_sample_value(name) or 0.0)


def configure_logging(settings: Settings, *, everything: bool = False) -> None:
    """One handler on stderr for our loggers; the request ID goes on every line.

    everything=True (the engine process, which runs no uvicorn) routes the root logger and Python
    warnings through it too, so a library's line cannot break a JSON log pipeline."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        _JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger("sentimentalyzer")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    if settings.log_format == "json":
        # uvicorn's own lines (startup, errors) go to the same pipeline, so they must be JSON too
        uvicorn_log = logging.getLogger("uvicorn")
        uvicorn_log.handlers[:] = [handler]
        uvicorn_log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces uvicorn's
    if everything:
        logging.getLogger().handlers[:] = [handler]
        logging.captureWarnings(True)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True)


access_log = logging.getLogger("sentimentalyzer.access")


class RequestContext:
    """Pure ASGI: request ID (accepted or generated, echoed), latency and status metrics, access log."""

    def __init__(self, app: ASGIApp, obs: Observability, settings_of: Callable[[], Settings | None]) -> None:
        self.app, self.obs, self.settings_of = app, obs, settings_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _VALID_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            path = scope["path"]
            endpoint = path if path in _KNOWN_PATHS else "other"  # bounded label cardinality
            self.obs.requests.labels(endpoint, str(status)).inc()
            self.obs.latency.labels(endpoint).observe(elapsed)
            access_log.info(
                "%s %s %d %.1fms",
                scope["method"],
                path,
                status,
                elapsed * 1000,
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 2),
                    }
                },
            )
            request_id.reset(token)
