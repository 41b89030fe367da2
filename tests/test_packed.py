"""The padding-free forward (serving.packed) equals the padded Hugging Face forward, text by text.

    pytest tests/test_packed.py -q

fp32: logits within 1e-5 for every attention variant, texts of 1, 2, ... 512 tokens together;
bf16: probabilities within 1e-2 of the padded bf16 pass (bf16 keeps ~3 significant digits); compiled=True
(TORCH_COMPILE) within 1e-5 too, in a few graphs that a new mix of lengths reuses.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from serving.packed import ATTENTION, default_attention, packed_forward, supports_packing


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()


def make_ids(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    body = [[rng.randrange(1000, 30000) for _ in range(max(0, n - 2))] for n in lengths]
    return [[101] if n == 1 else [101, *b, 102] for n, b in zip(lengths, body, strict=True)]


@torch.inference_mode()
def padded_logits(model: torch.nn.Module, ids: list[list[int]]) -> torch.Tensor:
    longest = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), longest), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1
    return model(input_ids=input_ids, attention_mask=mask).logits.float()


LENGTHS = [
    [1],
    [2],
    [1, 2, 3, 512],
    [512, 512],
    [7, 1, 40, 2, 128, 9, 9, 300],
    random.Random(3).choices(range(1, 513), k=24),
]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"{len(x)}-texts-max-{max(x)}")
def test_fp32_matches_padded(tiny: torch.nn.Module, attention: str, lengths: list[int]) -> None:
    ids = make_ids(lengths, seed=len(lengths))
    got = packed_forward(tiny, ids, attention=attention)
    want = padded_logits(tiny, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert (got.softmax(-1) - want.softmax(-1)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ATTENTION)
def test_bf16_matches_padded_bf16(tiny: torch.nn.Module, tiny_model_dir: str, attention: str) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval().bfloat16()
    ids = make_ids([1, 2, 5, 33, 200, 512, 64, 3])
    got = packed_forward(model, ids, attention=attention)
    assert got.dtype == torch.float32
    assert (got.softmax(-1) - padded_logits(model, ids).softmax(-1)).abs().max().item() <= 1e-2
    assert (got.softmax(-1) - padded_logits(tiny, ids).softmax(-1)).abs().max().item() <= 1e-2  # and fp32


def test_last_layer_over_every_token_gives_the_same_logits(tiny: torch.nn.Module) -> None:
    ids = make_ids([1, 2, 90, 512, 7])
    full = packed_forward(tiny, ids, first_token_only=False)
    assert (full - packed_forward(tiny, ids)).abs().max().item() <= 1e-5
    assert (full - padded_logits(tiny, ids)).abs().max().item() <= 1e-5


def test_a_text_scores_the_same_alone_and_packed(tiny: torch.nn.Module) -> None:
    ids = make_ids([5, 512, 1, 77, 2])
    together = packed_forward(tiny, ids)
    for row, x in enumerate(ids):
        assert torch.allclose(packed_forward(tiny, [x])[0], together[row], atol=1e-5)


def test_edges(tiny: torch.nn.Module) -> None:
    assert packed_forward(tiny, []).shape == (0, 2)
    with pytest.raises(ValueError, match="1 to 512 tokens"):
        packed_forward(tiny, [[101, 102], []])
    with pytest.raises(ValueError, match="1 to 512 tokens"):
        packed_forward(tiny, make_ids([513]))
    with pytest.raises(ValueError, match="attention must be one of"):
        packed_forward(tiny, make_ids([3]), attention="flash")


def test_default_attention_pads_similar_lengths_on_cpu_loops_over_mixed_ones_and_pads_on_cuda(
    tiny: torch.nn.Module,
) -> None:
    cpu = torch.device("cpu")
    assert default_attention(cpu, [18, 20, 19, 21] * 4) == "padded"  # short reviews: little padding
    assert default_attention(cpu, [12, 480, 30, 25, 300, 40, 18, 60]) == "loop"  # mixed: mostly padding
    assert default_attention(cpu, [12, 60, 30], dim=768) == "loop"
    assert default_attention(cpu, [12, 60, 30], dim=32) == "padded"  # a tiny model: the calls cost more
    assert default_attention(cpu) == "loop"
    assert default_attention(torch.device("cuda"), [12, 480, 30]) == "padded"
    dim = int(tiny.config.dim)
    for lengths in ([3, 400, 2], [5, 6, 5, 6]):
        ids = make_ids(lengths)
        chosen = default_attention(cpu, lengths, dim)
        assert torch.equal(packed_forward(tiny, ids), packed_forward(tiny, ids, attention=chosen))


def test_supports_packing(tiny: torch.nn.Module) -> None:
    assert supports_packing(tiny)
    assert not supports_packing(torch.nn.Linear(2, 2))
    assert not supports_packing(object())
    tiny.train()
    try:
        assert not supports_packing(tiny)  # packing skips dropout: eval only
        with pytest.raises(TypeError):
            packed_forward(tiny, make_ids([3]))
    finally:
        tiny.eval()


def test_compiled_layers_match_padded_and_do_not_recompile_per_length_mix(tiny: torch.nn.Module) -> None:
    """TORCH_COMPILE's pass (inductor, dynamic shapes) gives the eager logits, and a new mix of lengths
    reuses the graphs: attention, which reads per-text ints, stays out of them."""
    from torch._dynamo.utils import counters

    start = int(counters["stats"]["unique_graphs"])  # other tests in this process may have compiled too

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"]) - start

    for attention in ("padded", "loop"):
        for lengths in LENGTHS[2:]:
            ids = make_ids(lengths, seed=len(lengths))
            got = packed_forward(tiny, ids, attention=attention, compiled=True)
            assert (got - padded_logits(tiny, ids)).abs().max().item() <= 1e-5
    settled = graphs()
    # it did compile, into a few graphs (4 here; with attention inside them, 20 for these same passes)
    assert 1 <= settled <= 8, f"{settled} graphs"
    for seed in range(4):  # four new mixes of 5 to 20 texts
        rng = random.Random(100 + seed)
        ids = make_ids(rng.choices(range(1, 300), k=rng.randrange(5, 21)), seed=seed)
        got = packed_forward(tiny, ids, compiled=True)
        assert (got - padded_logits(tiny, ids)).abs().max().item() <= 1e-5
    assert graphs() - settled <= 2, f"{graphs() - settled} graphs compiled for new length mixes"
