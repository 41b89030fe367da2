"""Access control for both servers: API keys and per-key rate limits, off unless configured.

    API_KEYS=k1,k2 uvicorn batched_server:app                          # 401 without a key
    API_KEYS=k1 RATE_LIMIT=50/s uvicorn batched_server:app             # 429 past 50 in any second
    RATE_LIMIT=600/minute REDIS_URL=redis://127.0.0.1:6379/0 uvicorn batched_server:app --workers 4

`api.build_app` adds `Guard` only when API_KEYS or RATE_LIMIT is set, so with both unset a request
never passes through this module. Every path but /health and /ready (probes) needs a key: send
`Authorization: Bearer KEY` or `X-API-Key: KEY`. Keys are compared as SHA-256 digests with
`hmac.compare_digest` against every configured key, so neither content nor length leaks by timing.

RATE_LIMIT counts requests (a /predict/batch is one) per key, or per client address when API_KEYS is
unset (behind a proxy, run uvicorn with --forwarded-allow-ips so that is the real client). It is a
sliding log: at most N requests in any trailing window, and Retry-After says when the oldest one
leaves it. With REDIS_URL the log lives in Redis (one atomic Lua script, Redis's own clock), shared by
every worker and replica. If Redis cannot be reached the limiter fails over to the in-process log
(limits then hold per process, not per fleet) and logs a WARNING, rather than refusing everyone:
keys are still checked, the batch queue still sheds overload, and Redis is retried every few seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.ops import Observability
from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.guard")
EXEMPT_PATHS = frozenset({"/health", "/ready"})
REALM = 'Bearer realm="sentimentalyzer"'
REDIS_TIMEOUT_S = 0.5  # a slow Redis must not become every request's latency
REDIS_RETRY_S = 5.0  # after a failure, decide locally this long before trying Redis again

# KEYS[1] the key's log (a sorted set of request times); ARGV: limit, window in µs, a unique member.
# Returns 0 when the request is admitted (and logged), else µs until the oldest entry leaves the window.
_SLIDING_LOG_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""


def enabled(settings: Settings) -> bool:
    """Whether the app needs a Guard at all."""
    return bool(settings.api_keys) or settings.rate_limit is not None


class Limiter(Protocol):
    async def acquire(self, identity: str) -> float:
        """0 when admitted (and counted), else seconds until a request would be admitted."""

    async def aclose(self) -> None: ...


class LocalLimiter:
    """Sliding log per identity in this process; a deque of admission times each."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.logs: dict[str, deque[float]] = {}
        self._next_sweep = clock() + window_s

    async def acquire(self, identity: str) -> float:
        return self.acquire_now(identity)

    def acquire_now(self, identity: str) -> float:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        times = self.logs.setdefault(identity, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.limit:
            times.append(now)
            return 0.0
        return max(times[0] + self.window_s - now, 1e-6)  # float rounding must not turn a refusal into 0

    def _sweep(self, now: float) -> None:
        # per-address identities are unbounded; forget those with nothing left in the window
        self.logs = {k: v for k, v in self.logs.items() if v and v[-1] > now - self.window_s}
        self._next_sweep = now + self.window_s

    async def aclose(self) -> None:
        return None


class RedisLimiter:
    """The same sliding log in Redis, shared by every process; falls back to `LocalLimiter` when down."""

    def __init__(self, url: str, limit: int, window_s: float, obs: Observability | None = None) -> None:
        self.limit, self.window_us = limit, int(window_s * 1_000_000)
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self.script = self.client.register_script(_SLIDING_LOG_LUA)
        self.fallback = LocalLimiter(limit, window_s)
        self.obs, self.down_until, self.where = obs, 0.0, redacted_url(url)

    async def acquire(self, identity: str) -> float:
        now = time.monotonic()
        if now >= self.down_until:
            try:
                wait_us = await self.script(
                    keys=[f"sentimentalyzer:ratelimit:{identity}"],
                    args=[self.limit, self.window_us, os.urandom(8).hex()],
                )
            except (RedisError, OSError) as exc:
                if self.down_until == 0.0:  # once per outage, not once per request
                    log.warning("rate limit store %s unreachable (%s): limiting per process for now", self.where, exc)
                self.down_until = now + REDIS_RETRY_S
            else:
                if self.down_until:
                    log.info("rate limit store %s reachable again: limits shared again", self.where)
                    self.down_until = 0.0
                return int(wait_us) / 1_000_000
        if self.obs is not None:
            self.obs.ratelimit_fallbacks.inc()
        return self.fallback.acquire_now(identity)

    async def aclose(self) -> None:
        await self.client.aclose()


def make_limiter(settings: Settings, obs: Observability | None = None) -> Limiter | None:
    per_window = settings.rate_limit_per_window
    if per_window is None:
        return None
    limit, window_s = per_window
    if settings.redis_url:
        return RedisLimiter(settings.redis_url, limit, window_s, obs)
    return LocalLimiter(limit, window_s)


class Guard:
    """Pure ASGI middleware: 401 without a valid key, 429 past the rate limit, else the app."""

    def __init__(
        self, app: ASGIApp, settings: Settings, obs: Observability | None = None, limiter: Limiter | None = None
    ) -> None:
        self.app = app
        self.digests = tuple(_digest(k.encode()) for k in settings.api_keys)
        self.limiter = limiter if limiter is not None else make_limiter(settings, obs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.limiter is not None:
            return await self.app(scope, receive, self._closing_on_shutdown(send))
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            return await self.app(scope, receive, send)
        identity = None
        if self.digests:
            presented = _presented_keys(scope["headers"])
            if not presented:
                return await _deny(
                    scope,
                    receive,
                    send,
                    401,
                    "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    {"WWW-Authenticate": REALM},
                )
            identity = self._identify(presented)
            if identity is None:
                return await _deny(
                    scope,
                    receive,
                    send,
                    401,
                    "invalid API key",
                    {"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
                )
        if self.limiter is not None:
            client = scope.get("client")
            identity = identity or f"ip:{client[0] if client else 'unknown'}"
            wait_s = await self.limiter.acquire(identity)
            if wait_s > 0:
                return await _deny(
                    scope,
                    receive,
                    send,
                    429,
                    f"rate limit exceeded: retry in {wait_s:.3f}s",
                    {"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
        await self.app(scope, receive, send)

    def _identify(self, presented: list[bytes]) -> str | None:
        """`key:<digest prefix>` of the first presented key that is configured; never the key itself."""
        for candidate in presented:
            digest = _digest(candidate)
            matched = False
            for known in self.digests:  # no early exit: time does not depend on which key matched
                matched |= hmac.compare_digest(known, digest)
            if matched:
                return f"key:{digest.hex()[:24]}"
        return None

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self.limiter is not None:
                await self.limiter.aclose()
            await send(message)

        return wrapped


def _presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    keys = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def redacted_url(url: str) -> str:
    """The Redis URL for logs, without a password."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
