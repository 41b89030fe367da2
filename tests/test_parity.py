"""Parity: the batched server's answer for a text equals the naive server's, whatever shares its batch.

    pytest tests/test_parity.py -q

Same label, score within 1e-4 (fp32), for texts of very different lengths, over 512 tokens,
unicode and emoji, under every batching policy, and for the stand-in (the real architecture).
"""

from __future__ import annotations

import asyncio

import pytest

import batched_server
import naive_server
from serving.engine import ladder_length
from serving.model import cpu_flags, load_engine, plan_groups
from serving.settings import Settings
from tests.conftest import serving

TEXTS = [
    "ok",
    "I loved it",
    "Terrible. Just terrible.",
    "The acting was wooden, the plot made no sense, and I checked my watch every five minutes. " * 3,
    "Ce film était magnifique, vraiment émouvant — je le recommande à tous !",
    "🍿🎬 10/10 would watch again 😍😍😍",
    "数据 очень хорошо ß ﬁ",
    "word " * 700,  # over 512 tokens: truncated
    "a\u0000b\tc",
    "It was fine, I guess; nothing special but not bad either, a perfectly average afternoon film.",
]


ENGINES = [  # (settings changes, score tolerance): every CPU engine, the padded policies and packing
    ({"packing": "off", "batch_policy": "cost"}, 1e-4),
    ({"packing": "off", "batch_policy": "tokens", "max_batch_tokens": 256}, 1e-4),
    ({"packing": "off", "batch_policy": "pad"}, 1e-4),
    ({"dtype": "fp32"}, 1e-4),  # packed
    ({"dtype": "bf16"}, 1e-2),  # packed, bf16 weights
    ({"backend": "onnx", "dtype": "fp32"}, 1e-4),
    ({"backend": "onnx", "dtype": "int8"}, 1e-2),
    ({"backend": "openvino", "dtype": "fp32"}, 1e-4),
    ({"backend": "openvino", "dtype": "int8"}, 1e-2),
    pytest.param(
        {"backend": "openvino", "dtype": "bf16"},
        1e-2,
        marks=pytest.mark.skipif(not cpu_flags() & {"avx512_bf16", "amx_bf16"}, reason="no bf16 instructions"),
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "changes, tolerance", ENGINES, ids=lambda v: ",".join(map(str, v.values())) if isinstance(v, dict) else ""
)
async def test_batched_matches_naive_over_http(settings: Settings, changes: dict, tolerance: float) -> None:
    """Same engine on both servers: same label and a score within the engine's tolerance, whatever
    shares the batch (labels may differ only where the score is within 1e-2 of 0.5)."""
    engine = settings.replace(**changes)
    async with serving(naive_server.create_app(engine)) as naive:
        expected = [(await naive.post("/predict", json={"text": t})).json() for t in TEXTS]
    async with serving(batched_server.create_app(engine.replace(max_wait_ms=200.0))) as c:
        answers = await asyncio.gather(*(c.post("/predict", json={"text": t}) for t in TEXTS))
        in_batch = await c.post("/predict/batch", json={"texts": TEXTS})
    got = [a.json() for a in answers]
    assert max(g["batch_size"] for g in got) > 1  # they really shared forward passes
    for text, want, single, from_batch in zip(TEXTS, expected, got, in_batch.json()["predictions"], strict=True):
        for answer in (single, from_batch):
            if tolerance == 1e-4 or abs(want["score"] - 0.5) >= 1e-2:
                assert answer["label"] == want["label"], text
            p_want = want["score"] if want["label"] == "POSITIVE" else 1 - want["score"]
            p_got = answer["score"] if answer["label"] == "POSITIVE" else 1 - answer["score"]
            assert p_got == pytest.approx(p_want, abs=tolerance), text


def test_stand_in_parity_when_padded_with_long_companions() -> None:
    """The real DistilBERT architecture: padding to the longest text in the pass changes nothing."""
    engine = load_engine(Settings(model_id="stand-in", batch_policy="pad", device="cpu", dtype="fp32"))
    alone = [engine.predict([t])[0] for t in TEXTS]
    together = engine.predict(TEXTS)
    assert {p.batch_size for p in together} == {len(TEXTS)}
    for text, a, b in zip(TEXTS, alone, together, strict=True):
        assert a.label == b.label, text
        assert abs(a.score - b.score) < 1e-4, text


def test_plan_groups_covers_every_item_once() -> None:
    lengths = [5, 300, 7, 6, 120, 512, 8, 9, 130, 5]
    flat_cost = lambda n, length: 1.0  # noqa: E731 - fixed cost only: one pass is cheapest
    token_cost = lambda n, length: n * length  # noqa: E731 - no fixed cost: padding is all that matters
    for policy, cost in (("cost", flat_cost), ("cost", token_cost), ("tokens", flat_cost), ("pad", flat_cost)):
        groups = plan_groups(lengths, policy, 600, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))), policy
    assert plan_groups(lengths, "cost", 600, flat_cost) == [sorted(range(10), key=lambda i: lengths[i])]
    # no fixed cost: a pass is padded to the length ladder, so groups never mix ladder lengths,
    # and texts that share a ladder length share a pass (merging them costs nothing)
    groups = plan_groups(lengths, "cost", 600, token_cost)
    assert all(len({ladder_length(lengths[i]) for i in g}) == 1 for g in groups)
    assert len(groups) == len({ladder_length(n) for n in lengths})
    assert all(
        len(g) * max(lengths[i] for i in g) <= 600 or len(g) == 1
        for g in plan_groups(lengths, "tokens", 600, flat_cost)
    )
