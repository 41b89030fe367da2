"""Shared fixtures: a tiny DistilBERT saved to disk (same loading path as a real model), app clients, a stub model.

pytest -q                  # everything (make test)
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis
import torch
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

import batched_server
from serving.model import standin_tokenizer_dir
from serving.settings import Settings


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer DistilBERT with the real uncased tokenizer, saved like any hub model."""
    path = tmp_path_factory.mktemp("tiny-distilbert")
    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=512,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = DistilBertForSequenceClassification(config).eval()
        # random init leaves scores near 0.5; wider classifier weights make labels decisive
        torch.nn.init.normal_(model.classifier.weight, std=2.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(standin_tokenizer_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the module's own, on a free port (skips, naming the package, without one)."""
    from tests.processes import free_port, need, start

    binary = need("redis-server", "redis-server")
    port = free_port()
    proc = start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        tmp_path_factory.mktemp("redis"),
    )
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail(f"redis-server did not answer:\n{proc.text()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.stop()


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: str) -> Settings:
    # fp32 pinned: DTYPE=auto is bf16 on AMX CPUs, and these tests hold fp32's tolerances on any CPU
    return Settings(model_id=tiny_model_dir, model_fallback=False, device="cpu", dtype="fp32")


@pytest.fixture
def settings(tiny_settings: Settings) -> Settings:
    return tiny_settings  # frozen: a test that needs others makes them with .replace()


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, and an in-process client (no sockets)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


@pytest.fixture(scope="session")
async def attached_settings(
    tiny_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """tiny_settings whose batched apps attach to one engine that an app of this fixture owns for the session.

    For tests that vary only what a front end decides (keys, limits, logs, validation): starting an
    engine process costs seconds, attaching a front end to a running one (as `--workers N` do) does not.
    """
    s = tiny_settings.replace(engine_socket=str(tmp_path_factory.mktemp("engine") / "engine.sock"))
    async with serving(batched_server.create_app(s)):
        yield s


class StubModel:
    """Deterministic fake model: cost fixed + per_item * n, records every batch it saw.

    Its result for x is f(x) (default: x * 2), whatever else shares the batch. `fail_on` makes it
    raise when a batch contains that value; `gate` (a threading.Event) holds the worker until set.
    """

    def __init__(
        self,
        fixed_s: float = 0.002,
        per_item_s: float = 0.0002,
        f: Callable[[object], object] = lambda x: x * 2,
        fail_on: object = None,
        gate: threading.Event | None = None,
        wrong_length: bool = False,
    ) -> None:
        self.fixed_s, self.per_item_s, self.f, self.fail_on = fixed_s, per_item_s, f, fail_on
        self.gate, self.wrong_length = gate, wrong_length
        self.batches: list[list[object]] = []
        self.entered = threading.Event()

    def __call__(self, items: list[object]) -> list[object]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(list(items))
        time.sleep(self.fixed_s + self.per_item_s * len(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on!r}")
        out = [self.f(x) for x in items]
        return out[:-1] if self.wrong_length else out

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def computed(self) -> list[object]:
        return [x for b in self.batches for x in b]


@pytest.fixture
def root() -> Path:
    return Path(__file__).resolve().parent.parent
