"""The batched server's answer cache (serving/cache.py, serving/cache_store.py): coalescing, LRU, Redis.

    .venv/bin/python -m pytest tests/test_cache.py -q     # ~30 s on 2 cores; needs redis-server (apt)

The first half drives the cache alone with a fake compute (no model). The second serves the tiny model
from conftest: one engine, started by front end `a`, that the other front ends attach to over one
ENGINE_SOCKET, as uvicorn workers do (cache on with Redis, cache off, Redis down, a small LRU), plus a
second engine at bf16 on the same Redis. Module-scoped: each engine costs seconds here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import redis
from fastapi import FastAPI
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import batched_server
from serving.api import ApiError
from serving.cache import AnswerCache, AnswerLRU, Compute, answer_key, engine_identity
from serving.cache_store import REDIS_PREFIX, RedisAnswers, decode, encode
from serving.engine import Prediction
from serving.guard import REDIS_TIMEOUT_S
from serving.ops import Observability
from serving.settings import Settings
from tests.conftest import serving
from tests.processes import free_port
from tests.test_ops import sample, scrape

INFO = {"weights": "tiny-0123abcd", "backend": "torch", "dtype": "fp32", "device": "cpu", "packed": True}
ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- the cache alone, no model


class FakeEngine:
    """compute() for AnswerCache: label by text length, records every call; `gate` holds it,
    `fail_next` makes the next call raise."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next: BaseException | None = None

    async def __call__(self, texts: list[str]) -> list[Prediction]:
        self.calls.append(list(texts))
        await asyncio.sleep(0)  # a real engine answers later, never within the call: it always suspends
        await self.gate.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return [Prediction("POSITIVE" if len(t) % 2 else "NEGATIVE", 1 / (len(t) + 1.5), len(texts)) for t in texts]


def cache_of(cache_bytes: int = 1 << 20, identity: Callable[[], str | None] = lambda: "e1") -> AnswerCache:
    return AnswerCache(Settings(cache_bytes=cache_bytes), Observability("batched", engine_side=False), identity)


class Warnings(logging.Handler):
    """The WARNINGs of the cache's logger, whether or not an app configured logging (ours do not
    propagate once one has; before that caplog would see each record twice)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Warnings:
        logging.getLogger("sentimentalyzer.cache").addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger("sentimentalyzer.cache").removeHandler(self)

    @property
    def unreachable(self) -> int:
        return sum("unreachable" in r.getMessage() for r in self.records)


async def until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.anyio
async def test_identical_texts_in_flight_are_computed_once() -> None:
    cache, engine = cache_of(), FakeEngine()
    engine.gate.clear()
    calls = [asyncio.ensure_future(cache.answer(["same text"], engine)) for _ in range(8)]
    calls.append(asyncio.ensure_future(cache.answer(["same text", "other", "same text"], engine)))
    await until(lambda: len(engine.calls) == 2)
    await asyncio.sleep(0.05)
    engine.gate.set()
    results = await asyncio.gather(*calls)
    assert engine.calls == [["same text"], ["other"]]  # the last request sent only its own miss
    outcomes = sorted(p.cache for r in results[:8] for p in r)
    assert outcomes == ["coalesced"] * 7 + ["miss"]
    assert [p.cache for p in results[8]] == ["coalesced", "miss", "coalesced"]
    assert len({(p.label, p.score) for r in results for p in r if p is not results[8][1]}) == 1
    again = await cache.answer(["same text"], engine)
    assert (again[0].cache, again[0].batch_size, again[0].score) == ("hit", 0, results[0][0].score)
    assert len(engine.calls) == 2 and not cache.inflight


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["cancelled", "failed"])
async def test_when_the_computing_request_gives_no_answer_a_waiter_computes_it(how: str) -> None:
    cache, engine = cache_of(), FakeEngine()
    engine.gate.clear()
    owner = asyncio.ensure_future(cache.answer(["text"], engine))
    await until(lambda: len(engine.calls) == 1)
    waiters = [asyncio.ensure_future(cache.answer(["text"], engine)) for _ in range(3)]
    await asyncio.sleep(0.02)
    if how == "cancelled":  # its client disconnected
        owner.cancel()
    else:
        engine.fail_next = ApiError(503, "server busy")
        engine.gate.set()
    with pytest.raises(asyncio.CancelledError if how == "cancelled" else ApiError):
        await owner
    engine.gate.set()
    results = await asyncio.gather(*waiters)
    assert len(engine.calls) == 2  # one waiter computed it again, the other two coalesced on it
    assert sorted(r[0].cache for r in results) == ["coalesced", "coalesced", "miss"]
    assert {(r[0].label, r[0].score) for r in results} == {("NEGATIVE", 1 / 5.5)}
    assert not cache.inflight


@pytest.mark.anyio
async def test_a_waiter_that_leaves_does_not_cancel_what_others_await() -> None:
    cache, engine = cache_of(), FakeEngine()
    engine.gate.clear()
    owner = asyncio.ensure_future(cache.answer(["text"], engine))
    await until(lambda: len(engine.calls) == 1)
    leaving, staying = (asyncio.ensure_future(cache.answer(["text"], engine)) for _ in range(2))
    await asyncio.sleep(0.02)
    leaving.cancel()
    await asyncio.sleep(0.02)
    engine.gate.set()
    assert (await owner)[0].cache == "miss" and (await staying)[0].cache == "coalesced"
    assert leaving.cancelled() and len(engine.calls) == 1


@pytest.mark.anyio
async def test_requests_waiting_on_each_others_texts_both_finish() -> None:
    cache, engine = cache_of(), FakeEngine()
    engine.gate.clear()
    first = asyncio.ensure_future(cache.answer(["x"], engine))
    await until(lambda: len(engine.calls) == 1)
    both = [asyncio.ensure_future(cache.answer(t, engine)) for t in (["y", "x"], ["x", "y"])]
    await asyncio.sleep(0.02)
    engine.gate.set()
    a, b = await asyncio.wait_for(asyncio.gather(*both), 5)
    await first
    assert engine.calls == [["x"], ["y"]]
    assert [p.cache for p in a] == ["miss", "coalesced"] and [p.cache for p in b] == ["coalesced", "coalesced"]


@pytest.mark.anyio
async def test_nothing_is_kept_for_an_engine_that_changed_or_does_not_name_its_weights() -> None:
    engine, identity = FakeEngine(), {"now": "e1"}
    cache = cache_of(identity=lambda: identity["now"])
    engine.gate.clear()
    call = asyncio.ensure_future(cache.answer(["text"], engine))
    await until(lambda: len(engine.calls) == 1)
    identity["now"] = "e2"  # the engine was restarted at other weights while this was computed
    engine.gate.set()
    assert (await call)[0].cache == "miss" and len(cache.lru) == 0
    identity["now"] = "e1"
    assert (await cache.answer(["text"], engine))[0].cache == "miss"
    anonymous = cache_of(identity=lambda: None)
    for _ in range(2):
        assert (await anonymous.answer(["text"], engine))[0].cache == "miss"
    assert len(engine.calls) == 4 and len(anonymous.lru) == 0


def test_the_key_is_the_engine_identity_and_the_exact_text() -> None:
    base = engine_identity(INFO)
    assert base is not None and engine_identity({**INFO, "model_id": "elsewhere"}) == base
    others = [engine_identity({**INFO, k: v}) for k, v in (("weights", "tiny-ffff"), ("dtype", "bf16"))]
    others += [engine_identity({**INFO, "backend": "onnx"}), engine_identity({**INFO, "packed": False})]
    others += [engine_identity({**INFO, "compiled": "inductor"})]
    assert len({base, *others}) == 6
    assert engine_identity({k: v for k, v in INFO.items() if k != "weights"}) is None
    keys = {answer_key(i, t) for i in (base, *others) for t in ("I loved it", "I loved it ", "i loved it")}
    assert len(keys) == 18 and all(len(k) == 32 for k in keys)


@hsettings(max_examples=300, deadline=None)
@given(st.sampled_from(["POSITIVE", "NEGATIVE", "négatif"]), st.floats(allow_nan=False))
def test_stored_answers_round_trip_bit_exactly(label: str, score: float) -> None:
    back_label, back_score = decode(encode(label, score))
    assert back_label == label and struct.pack("<d", back_score) == struct.pack("<d", score)


def test_the_lru_evicts_the_least_recently_used_within_its_bytes() -> None:
    lru = AnswerLRU(2000)
    keys = [hashlib.sha256(str(i).encode()).digest() for i in range(40)]
    lru.put(keys[0], encode("POSITIVE", 0.5))
    lru.put(keys[1], encode("NEGATIVE", 0.25))
    assert lru.get(keys[0]) is not None  # now the most recent: keys[1] goes first
    for k in keys[2:]:
        lru.put(k, encode("POSITIVE", 0.75))
        assert 0 < lru.nbytes <= 2000
    assert keys[1] not in lru and keys[39] in lru and 3 < len(lru) < 40
    lru.put(keys[38], encode("POSITIVE", 0.125))  # replaced, not counted twice
    assert decode(lru.get(keys[38]) or b"") == ("POSITIVE", 0.125) and lru.nbytes <= 2000
    kept = len(lru)
    lru.put(b"k" * 32, b"x" * 5000)  # larger than the bound: not kept, and nothing evicted for it
    assert b"k" * 32 not in lru and len(lru) == kept


@pytest.mark.parametrize("bound", [8_000, 300_000])
def test_the_lru_bytes_are_what_the_process_really_holds(bound: int) -> None:
    lru = AnswerLRU(bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(6000):  # many times what fits: the table grows, entries churn
            lru.put(hashlib.sha256(b"%d" % i).digest(), encode("POSITIVE", i / 7))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < lru.nbytes <= bound
    assert grown <= bound + 512, (grown, lru.nbytes)  # 512: this loop's own few objects
    assert abs(grown - lru.nbytes) <= 0.02 * lru.nbytes + 512, (grown, lru.nbytes)  # counted, not guessed


@pytest.mark.anyio
async def test_a_silent_redis_costs_one_bounded_call_then_is_left_alone() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog) and never answers
    obs = Observability("batched", engine_side=False)
    store = RedisAnswers(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", 60, obs)
    try:
        with Warnings() as warned:
            started = time.perf_counter()
            assert await store.get_many([b"k" * 32]) == {}
            slow_s = time.perf_counter() - started
            started = time.perf_counter()
            await store.set_many([(b"k" * 32, encode("POSITIVE", 0.5))])
            assert await store.get_many([b"k" * 32]) == {}
            bypassed_s = time.perf_counter() - started
    finally:
        await store.aclose()
        listener.close()
    assert REDIS_TIMEOUT_S * 0.8 <= slow_s <= REDIS_TIMEOUT_S + 0.5 and bypassed_s < 0.05
    assert obs.registry is not None
    errors = {
        op: obs.registry.get_sample_value("sentimentalyzer_cache_redis_errors_total", {"op": op})
        for op in ("get", "set")
    }
    assert errors == {"get": 1, "set": 0}  # then bypassed, not tried again
    assert warned.unreachable == 1


# --------------------------------------------------------------------------- served, with the tiny model


class Front(NamedTuple):
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def service(self) -> batched_server.BatchedService:
        return self.app.state.service

    async def predict(self, text: str) -> tuple[str | None, tuple[str, float], httpx.Response]:
        """X-Cache, (label, score), the response."""
        r = await self.client.post("/predict", json={"text": text})
        assert r.status_code == 200, r.text
        return r.headers.get("X-Cache"), (r.json()["label"], r.json()["score"]), r

    async def metrics(self) -> dict:
        return scrape((await self.client.get("/metrics")).text)

    async def items_computed(self) -> float:
        return sample(await self.metrics(), "sentimentalyzer_batch_size_sum")  # the engine's, every pass

    async def written(self) -> None:
        """Its Redis writes (in the background after a miss) have landed."""
        assert self.service.cache is not None
        await self.service.cache.settled()


@pytest.fixture(scope="module")
async def fronts(
    tiny_model_dir: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Front]]:
    """Front ends by name; `a` starts the engine the next four attach to, `bf16` has one of its own."""
    base = Settings(
        model_id=tiny_model_dir,
        model_fallback=False,
        device="cpu",
        dtype="fp32",
        cache_bytes=1 << 20,
        cache_ttl_s=600,
        redis_url=redis_url,
        engine_socket=str(tmp_path_factory.mktemp("cache-engine") / "engine.sock"),
        engine_threads=1,  # two engines start side by side on 2 cores: OpenMP threads must not fight
    )
    variants = {
        "a": base,
        "b": base,
        "off": base.replace(cache_bytes=0, redis_url=None),
        "down": base.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0"),  # nothing listens there
        "small": base.replace(cache_bytes=4096, redis_url=None),
        "bf16": base.replace(dtype="bf16", engine_socket=""),
    }
    apps = {name: batched_server.create_app(s) for name, s in variants.items()}
    async with AsyncExitStack() as stack:  # closed in reverse: the engine's owner `a` leaves last
        # the two engines start side by side (seconds each here); the other front ends attach to `a`'s
        owners = await asyncio.gather(*(stack.enter_async_context(serving(apps[n])) for n in ("a", "bf16")))
        clients = dict(zip(("a", "bf16"), owners, strict=True))
        for name in ("b", "off", "down", "small"):
            clients[name] = await stack.enter_async_context(serving(apps[name]))
        yield {name: Front(app, clients[name]) for name, app in apps.items()}


@pytest.mark.anyio
async def test_concurrent_identical_requests_are_one_computation(
    fronts: dict[str, Front], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, text = fronts["a"], "eight of us asked this at once"
    cache = a.service.cache
    assert cache is not None
    real_compute, real_answer, gate = a.service._compute, cache.answer, asyncio.Event()
    entered, asked = [], []

    async def held(arrived: float, texts: list[str]) -> list[Prediction]:
        entered.append(texts)
        await gate.wait()
        return await real_compute(arrived, texts)

    async def counted(texts: list[str], compute: Compute) -> list[Prediction]:
        asked.append(texts)  # the text joins (or owns) before this call first yields
        return await real_answer(texts, compute)

    monkeypatch.setattr(a.service, "_compute", held)
    monkeypatch.setattr(cache, "answer", counted)
    before, m0 = await a.items_computed(), await a.metrics()
    calls = [asyncio.ensure_future(a.predict(text)) for _ in range(8)]
    await until(lambda: len(asked) == 8 and len(entered) == 1)
    gate.set()
    answers = await asyncio.gather(*calls)
    assert sorted(x for x, _, _ in answers) == ["coalesced"] * 7 + ["miss"]
    assert len({answer for _, answer, _ in answers}) == 1 and entered == [[text]]
    assert await a.items_computed() - before == 1
    m1 = await a.metrics()
    for name, delta in (("misses", 1), ("coalesced", 7)):
        metric = f"sentimentalyzer_cache_{name}_total"
        assert sample(m1, metric) - sample(m0, metric) == delta
    assert {r.headers["X-Batch-Size"] for _, _, r in answers} == {"1"}  # the one pass that served them all


@pytest.mark.anyio
async def test_a_hit_after_a_miss_and_batches_and_v2_share_it(fronts: dict[str, Front]) -> None:
    a, text = fronts["a"], "asked twice, computed once"
    before = await a.items_computed()
    first, answer, _ = await a.predict(text)
    again, same, r = await a.predict(text)
    assert (first, again, same) == ("miss", "hit", answer)
    assert r.json()["batch_size"] == 0 and r.headers["X-Batch-Size"] == "0"  # no pass served it
    assert r.headers["Server-Timing"] == "queue;dur=0.00, tokenize;dur=0.00, infer;dur=0.00"
    batch = await a.client.post("/predict/batch", json={"texts": [text, "new one", "new one"]})
    assert batch.headers["X-Cache"] == "hit=1, miss=1, coalesced=1"
    assert batch.json()["predictions"][0] == {"label": answer[0], "score": answer[1]}
    v2 = await a.client.post(
        "/v2/models/sentiment/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["new one"]}]},
    )
    assert v2.json()["outputs"][1]["data"][0] == pytest.approx(batch.json()["predictions"][1]["score"], abs=1e-6)
    assert await a.items_computed() - before == 2
    assert sample(await a.metrics(), "sentimentalyzer_cache_bytes") > 0


@pytest.mark.anyio
async def test_every_cached_answer_equals_a_fresh_one_exactly(fronts: dict[str, Front]) -> None:
    reviews = (ROOT / "data" / "reviews.txt").read_text(encoding="utf-8").splitlines()[100:130]
    texts = reviews + ["ok", "Not bad at all!", "naïve café ☕", "x" * 3000, "THE WORST.", "meh " * 40]
    a, b, off = fronts["a"], fronts["b"], fronts["off"]
    for text in texts:
        miss, computed, _ = await a.predict(text)
        hit, local, _ = await a.predict(text)
        await a.written()
        shared, from_redis, _ = await b.predict(text)  # another front end: through Redis
        uncached, fresh, _ = await off.predict(text)  # cache off, same engine
        assert (miss, hit, shared, uncached) == ("miss", "hit", "hit", None), text
        assert computed == local == from_redis == fresh, text  # label and score, to the last bit


@pytest.mark.anyio
async def test_answers_are_shared_through_redis_with_the_ttl(fronts: dict[str, Front], redis_url: str) -> None:
    a, b, text = fronts["a"], fronts["b"], "computed in one front end"
    b0 = await b.metrics()
    assert (await a.predict(text))[0] == "miss"
    await a.written()
    assert (await b.predict(text))[0] == "hit"
    hits = sample(await b.metrics(), "sentimentalyzer_cache_hits_total", store="redis")
    assert hits - sample(b0, "sentimentalyzer_cache_hits_total", store="redis") == 1
    store = redis.Redis.from_url(redis_url)
    stored = store.keys("sentimentalyzer:answer:*")
    assert stored and all(0 < store.pttl(k) <= 600_000 for k in stored)
    assert not any(b"computed" in store.get(k) for k in stored)  # label and score, never the text
    identity = engine_identity((await b.client.get("/ready")).json())
    assert identity is not None
    store.set(REDIS_PREFIX + answer_key(identity, "a damaged entry").hex().encode(), b"\xff" * 12)
    assert (await b.predict("a damaged entry"))[0] == "miss"  # unreadable: a miss, not an error


@pytest.mark.anyio
async def test_another_engine_never_gets_these_answers(fronts: dict[str, Front]) -> None:
    a, bf16, text = fronts["a"], fronts["bf16"], "the same words at another dtype"
    assert (await a.predict(text))[0] == "miss"
    await a.written()
    assert (await bf16.predict(text))[0] == "miss"  # the same Redis, a bf16 engine: keyed apart
    assert (await bf16.predict(text))[0] == "hit"
    at_a, at_bf16 = [(await f.client.get("/ready")).json() for f in (a, bf16)]
    assert at_a["weights"] == at_bf16["weights"] and (at_a["dtype"], at_bf16["dtype"]) == ("fp32", "bf16")
    assert at_a["answer_cache"] == {"cache_bytes": 1 << 20, "redis": True}


@pytest.mark.anyio
async def test_redis_down_only_bypasses_the_cache(fronts: dict[str, Front]) -> None:
    down = fronts["down"]
    with Warnings() as warned:
        started = time.perf_counter()
        first = await down.predict("Redis is not there")
        took_s = time.perf_counter() - started
        second = await down.predict("Redis is still not there")
        again = await down.predict("Redis is not there")
    assert (first[0], second[0], again[0]) == ("miss", "miss", "hit")  # the local LRU still serves
    assert first[1] == (await fronts["off"].predict("Redis is not there"))[1] == again[1]
    assert took_s < REDIS_TIMEOUT_S + 0.5
    errors = sample(await down.metrics(), "sentimentalyzer_cache_redis_errors_total", op="get")
    assert errors == 1  # then left alone for REDIS_RETRY_S
    assert warned.unreachable == 1  # once per outage


@pytest.mark.anyio
async def test_the_lru_keeps_to_cache_bytes(fronts: dict[str, Front]) -> None:
    small = fronts["small"]
    texts = [f"review number {i} of forty" for i in range(40)]
    batch = await small.client.post("/predict/batch", json={"texts": texts})
    assert batch.headers["X-Cache"] == "hit=0, miss=40, coalesced=0"
    assert 0 < sample(await small.metrics(), "sentimentalyzer_cache_bytes") <= 4096
    assert (await small.predict(texts[39]))[0] == "hit"
    assert (await small.predict(texts[0]))[0] == "miss"  # the oldest went first
    assert 0 < sample(await small.metrics(), "sentimentalyzer_cache_bytes") <= 4096


@pytest.mark.anyio
async def test_cache_off_computes_every_time_as_before(fronts: dict[str, Front]) -> None:
    off = fronts["off"]
    before = await off.items_computed()
    for _ in range(2):
        _, _, r = await off.predict("no cache here")
        assert "X-Cache" not in r.headers and r.headers["X-Batch-Size"] == "1" and r.json()["batch_size"] == 1
    batch = await off.client.post("/predict/batch", json={"texts": ["no cache here", "no cache here"]})
    assert "X-Cache" not in batch.headers
    assert await off.items_computed() - before == 4
    m = await off.metrics()
    assert sample(m, "sentimentalyzer_cache_misses_total") == 0 and sample(m, "sentimentalyzer_cache_bytes") == 0
    assert (await off.client.get("/ready")).json()["answer_cache"] == {"cache_bytes": 0, "redis": False}
