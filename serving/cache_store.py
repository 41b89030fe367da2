"""The answer cache's shared store: answers in Redis (REDIS_URL) for CACHE_TTL_S, bypassed while it is down.

    store = RedisAnswers("redis://127.0.0.1:6379/0", ttl_s=3600, obs=obs)
    found = await store.get_many([key, ...])       # {key: value} for those present; {} when down
    await store.set_many([(key, encode("POSITIVE", 0.998)), ...])
    await store.aclose()

Used by serving/cache.py, which makes the keys (32-byte digests; stored as
`sentimentalyzer:answer:<hex>`). A value is the score's float64 bytes then the label in UTF-8, so a
score comes back bit-exact and nothing of the text is stored. Like the rate limiter's Redis
(serving/guard.py), a failing Redis never fails a request: each call is one try bounded by
REDIS_TIMEOUT_S in all (connect and reply), a failure is counted in
sentimentalyzer_cache_redis_errors_total{op} and logged once per outage (WARNING), and Redis is then
left alone for REDIS_RETRY_S: the cache answers from this front end's memory or computes meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from serving.guard import REDIS_RETRY_S, REDIS_TIMEOUT_S, redacted_url
from serving.ops import Observability

log = logging.getLogger("sentimentalyzer.cache")
REDIS_PREFIX = b"sentimentalyzer:answer:"
_SCORE = struct.Struct("<d")


def encode(label: str, score: float) -> bytes:
    """The stored form: the score's float64 bytes, then the label (UTF-8)."""
    return _SCORE.pack(score) + label.encode()


def decode(value: bytes) -> tuple[str, float]:
    return value[_SCORE.size :].decode(), _SCORE.unpack_from(value)[0]


def _readable(value: object) -> bool:
    """A value this version wrote: anything else is a miss, not an error."""
    if not isinstance(value, bytes) or len(value) <= _SCORE.size:
        return False
    try:
        decode(value)
    except UnicodeDecodeError:
        return False
    return True


class RedisAnswers:
    """The answers shared through Redis for ttl_s; a failure or a slow call bypasses it for a while."""

    def __init__(self, url: str, ttl_s: float, obs: Observability) -> None:
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # one try: redis-py's default retries would multiply the bound
        )
        self.ttl_ms, self.obs, self.where = max(1, round(ttl_s * 1000)), obs, redacted_url(url)
        self.down_until = 0.0

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        values = await self._call("get", lambda: self.client.mget([REDIS_PREFIX + k.hex().encode() for k in keys]))
        if not values:
            return {}
        return {k: v for k, v in zip(keys, values, strict=True) if _readable(v)}

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        def call() -> Awaitable[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(REDIS_PREFIX + key.hex().encode(), value, px=self.ttl_ms)
            return pipe.execute()

        await self._call("set", call)

    async def _call(self, op: str, call: Callable[[], Awaitable[Any]]) -> Any:
        if time.monotonic() < self.down_until:
            return None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):  # connect and reply together, not each
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self.obs.cache_redis_errors.labels(op).inc()
            if self.down_until == 0.0:  # once per outage, not once per request
                log.warning(
                    "answer cache store %s unreachable (%s): bypassed, tried again every %.0f s",
                    self.where,
                    f"{type(exc).__name__}: {exc}".rstrip(": "),
                    REDIS_RETRY_S,
                )
            self.down_until = time.monotonic() + REDIS_RETRY_S
            return None
        if self.down_until:
            log.info("answer cache store %s reachable again", self.where)
            self.down_until = 0.0
        return result

    async def aclose(self) -> None:
        await self.client.aclose()
