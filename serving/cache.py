"""The batched server's answer cache: identical texts computed once, answers kept (CACHE_BYTES, REDIS_URL).

    cache = AnswerCache(settings, obs, identity_of=lambda: engine_identity(status.info))
    preds = await cache.answer(texts, compute)   # compute(the texts that missed) -> list[Prediction]
    await cache.aclose()                         # in the lifespan's shutdown

Off unless CACHE_BYTES > 0 (batched_server.py then never builds one). A text's key is SHA-256 over the
engine's identity (its weights key, backend, dtype, device and pass kind, as its Status.info reports
them) and the exact text, so an engine started again with other weights or at another engine keys
apart: an answer from other weights or another engine is never served. An engine that does not name
its weights (a custom ENGINE_FACTORY) is never cached for. Each text of a request is, in order:
- a hit: in this front end's LRU, or (with REDIS_URL) in Redis, looked up before computing;
- coalesced: an identical text is queued or computing for another request (or earlier in this one):
  it awaits that computation's result;
- a miss: computed; every miss of a request goes to the engine in one submit, then is kept locally
  and written to Redis for CACHE_TTL_S in the background (the answer does not wait for that write).
If the request computing a text fails or goes away (its client disconnected: its items are cancelled
in the engine, as without a cache), its waiters never see that error: each computes the text again
itself under its own deadline and disconnect watch (the first to wake owns it, the rest coalesce on
it). A waiter whose own client leaves just stops waiting; the computation others await goes on.
Only the label and the score are kept, the score as the float64 it came as (bit-exact). A hit's
Prediction has batch_size 0 (no forward pass served it) and zero queue, tokenize and infer times;
a coalesced one carries the batch_size and timings of the pass that computed it. The LRU counts what
it really holds (each key's and value's sys.getsizeof, plus the OrderedDict with its table and nodes)
and evicts the least recently used past CACHE_BYTES. Redis (serving/cache_store.py) down or slow only
bypasses it: each call bounded, counted when it fails, then left alone for a few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

from serving.cache_store import RedisAnswers, decode, encode
from serving.guard import REDIS_TIMEOUT_S
from serving.ops import Observability
from serving.settings import Settings
from serving.text import Prediction

IDENTITY_FIELDS = ("weights", "backend", "dtype", "device", "packed", "compiled", "inference_precision")
Compute = Callable[[list[str]], Awaitable[list[Prediction]]]


def engine_identity(info: Mapping[str, object]) -> str | None:
    """What an answer depends on besides its text, from the engine's Status.info; None when the engine
    does not say which weights it holds (then nothing is cached for it)."""
    if not info.get("weights"):
        return None
    values = tuple(info.get(k) for k in IDENTITY_FIELDS)
    try:
        return _identity(values)  # asked twice a request: the JSON is made once per engine identity
    except TypeError:  # a value that cannot be hashed: made afresh
        return _identity.__wrapped__(values)


@functools.lru_cache(maxsize=64)
def _identity(values: tuple[object, ...]) -> str:
    return json.dumps(dict(zip(IDENTITY_FIELDS, values, strict=True)), sort_keys=True, default=str)


def answer_key(identity: str, text: str) -> bytes:
    # json.dumps escapes control characters: the identity holds no NUL, so the split is unambiguous
    digest = hashlib.sha256(identity.encode())
    digest.update(b"\0")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.digest()


def _hit(value: bytes) -> Prediction:
    label, score = decode(value)
    return Prediction(label, score, batch_size=0, cache="hit")


class AnswerLRU:
    """Encoded answers by key, least recently used first, within max_bytes as really held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._objects = 0  # the keys' and values' own sizes; the OrderedDict's are asked of it

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        # getsizeof(OrderedDict) covers its hash table, its order array and one node per entry
        return sys.getsizeof(self._entries) + self._objects if self._entries else 0

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        if sys.getsizeof(key) + sys.getsizeof(value) > self.max_bytes:
            return  # could never fit: it must not flush everything else on its way out
        old = self._entries.pop(key, None)
        if old is not None:
            self._objects -= sys.getsizeof(key) + sys.getsizeof(old)
        self._entries[key] = value
        self._objects += sys.getsizeof(key) + sys.getsizeof(value)
        while self._entries and self.nbytes > self.max_bytes:
            gone, was = self._entries.popitem(last=False)
            self._objects -= sys.getsizeof(gone) + sys.getsizeof(was)
        if not self._entries:
            self._entries = OrderedDict()  # a dict never shrinks its table on deletes: start small


class _Retry(Exception):
    """Set on a text's future when the request computing it failed or left: its waiters compute it."""


class AnswerCache:
    """One front end's cache: the LRU, the texts in flight, and Redis when REDIS_URL is set."""

    def __init__(self, settings: Settings, obs: Observability, identity_of: Callable[[], str | None]) -> None:
        self.lru = AnswerLRU(settings.cache_bytes)
        self.obs, self.identity_of = obs, identity_of
        self.store = RedisAnswers(settings.redis_url, settings.cache_ttl_s, obs) if settings.redis_url else None
        self.inflight: dict[bytes, asyncio.Future[Prediction]] = {}
        self._writes: set[asyncio.Future[None]] = set()

    async def answer(self, texts: list[str], compute: Compute) -> list[Prediction]:
        """One Prediction per text, in order, each marked miss, hit or coalesced."""
        identity = self.identity_of()
        if identity is None:
            self.obs.cache_misses.inc(len(texts))
            return [dataclasses.replace(p, cache="miss") for p in await compute(texts)]
        keys = [answer_key(identity, t) for t in texts]
        out: list[Prediction | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        while todo:  # again only for texts whose computation in flight gave no answer
            todo = await self._round(identity, texts, keys, todo, out, compute)
        return [p for p in out if p is not None]

    async def _round(
        self,
        identity: str,
        texts: list[str],
        keys: list[bytes],
        todo: list[int],
        out: list[Prediction | None],
        compute: Compute,
    ) -> list[int]:
        owned: dict[bytes, list[int]] = {}
        joined: dict[bytes, tuple[asyncio.Future[Prediction], list[int]]] = {}
        loop = asyncio.get_running_loop()
        for i in todo:
            key = keys[i]
            if key in owned:
                owned[key].append(i)
            elif key in joined:
                joined[key][1].append(i)
            elif (value := self.lru.get(key)) is not None:
                out[i] = _hit(value)
                self.obs.cache_hits.labels("local").inc()
            elif key in self.inflight:
                joined[key] = (self.inflight[key], [i])
            else:
                owned[key] = [i]
                self.inflight[key] = loop.create_future()
        if not joined:  # nothing shared to wait on (the common case): no task, no wait set
            preds = await self._compute(identity, texts, owned, compute)
            self._repeat(owned, preds, out)
            return []
        waits = [asyncio.ensure_future(_await_shared(future)) for future, _ in joined.values()]
        mine = asyncio.ensure_future(self._compute(identity, texts, owned, compute))
        try:
            # own texts computed alongside the waits, never after them: two requests that wait on
            # each other's texts both finish
            await asyncio.wait([mine, *waits], return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in (mine, *waits):
                task.cancel()  # the request failed or left: stop waiting (the shared futures live on)
        preds = mine.result()  # this request's own failure is its answer
        retry: list[int] = []
        for (_, indices), wait in zip(joined.values(), waits, strict=True):
            if (pred := wait.result()) is None:
                retry += indices
                continue
            for i in indices:
                out[i] = dataclasses.replace(pred, cache="coalesced")
            self.obs.cache_coalesced.inc(len(indices))
        self._repeat(owned, preds, out)
        return retry

    def _repeat(
        self, owned: dict[bytes, list[int]], preds: dict[bytes, Prediction], out: list[Prediction | None]
    ) -> None:
        """This request's own texts into place; a text it holds more than once is coalesced after the first."""
        for key, (first, *again) in owned.items():
            out[first] = preds[key]
            if again:
                for i in again:
                    out[i] = dataclasses.replace(preds[key], cache="coalesced")
                self.obs.cache_coalesced.inc(len(again))

    async def _compute(
        self, identity: str, texts: list[str], owned: dict[bytes, list[int]], compute: Compute
    ) -> dict[bytes, Prediction]:
        """The texts this request owns: Redis first, then one submit for the rest; resolves their
        futures either way (with _Retry when no answer came)."""
        preds: dict[bytes, Prediction] = {}
        try:
            if owned and self.store is not None:
                for key, value in (await self.store.get_many(list(owned))).items():
                    preds[key] = _hit(value)
                    self.lru.put(key, value)
                    self.obs.cache_hits.labels("redis").inc()
            missing = [key for key in owned if key not in preds]
            if missing:
                computed = await compute([texts[owned[key][0]] for key in missing])
                self.obs.cache_misses.inc(len(missing))
                # kept only if the engine that answered is the one the keys were made for (a restart
                # at other weights in between would otherwise file its answers under the old ones)
                keep = self.identity_of() == identity
                writes = []
                for key, pred in zip(missing, computed, strict=True):
                    preds[key] = dataclasses.replace(pred, cache="miss")
                    if keep:
                        writes.append((key, encode(pred.label, pred.score)))
                        self.lru.put(*writes[-1])
                if writes and self.store is not None:
                    self._write(writes)
            self.obs.cache_bytes.set(self.lru.nbytes)
        except BaseException:
            self._settle(owned, None)
            raise
        self._settle(owned, preds)
        return preds

    def _settle(self, owned: Mapping[bytes, object], preds: Mapping[bytes, Prediction] | None) -> None:
        for key in owned:
            future = self.inflight.pop(key)
            if preds is None:
                future.set_exception(_Retry())
                future.exception()  # retrieved: no waiter is not an error
            else:
                future.set_result(preds[key])

    def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        assert self.store is not None
        task = asyncio.ensure_future(self.store.set_many(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def settled(self) -> None:
        """Returns once the Redis writes under way are done (each is bounded by REDIS_TIMEOUT_S)."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=2 * REDIS_TIMEOUT_S)

    async def aclose(self) -> None:
        await self.settled()
        if self.store is not None:
            await self.store.aclose()


async def _await_shared(future: asyncio.Future[Prediction]) -> Prediction | None:
    """Another request's result for this text; None when it gave none. Cancelling this waiter leaves
    the future (and the computation behind it) alone."""
    try:
        return await asyncio.shield(future)
    except _Retry:
        return None
