"""Padding-free ("packed") forward passes for DistilBertForSequenceClassification.

    from serving.packed import packed_forward, supports_packing
    if supports_packing(model):
        logits = packed_forward(model, [[101, 7592, 102], [101, 2088, 2003, 102]])  # float32 (n, labels)
        logits = packed_forward(model, ids, attention="block")  # another attention variant (see ATTENTION)

Every token of every text goes into one [total_tokens, dim] tensor, position ids restart per text,
and the linear layers (q/k/v/out, the feed-forward pair), which are ~90% of the cost, run once over
all of them: nothing is computed for padding. Only attention needs to know where a text ends; the
variants, all exact:

- padded: q/k/v scattered into [n, longest] for one SDPA call with a key mask, gathered back. The
  padding costs only in attention (n x longest^2), which is small next to the linears.
- block: one SDPA over the whole pack with a block-diagonal mask: no copies, but total^2 work.
- jagged: nested (jagged) tensors with SDPA. On CPU torch runs them through its math kernel on
  strided nested tensors, and they cannot be built from inference tensors, hence the copies.
- loop: one SDPA call per text, a Python loop: exactly sum(length^2) work, one call per text per layer.

Default (attention=None): padded on a GPU, where a launch per text per layer costs more than padding.
On a CPU, per pass: padded where the attention work its padding adds, 4 * dim * (n * longest^2 -
sum(length^2)) FLOPs, is below what the loop's per-text calls cost (n calls, each worth
LOOP_CALL_FLOPS of compute), else loop. So packs of similar lengths go padded and packs that mix
short and long texts go loop. Measured on the 2-core AVX2 EPYC, stand-in, seconds per pass, loop /
padded: short texts 1.02 (8 texts) and 1.04 (24); mixed 0.95 and 0.91; long 0.97 (8) and 0.79 (24);
the rule picks the faster in each of those six. With the tests' tiny model (dim 32), where a call's
overhead is the whole cost, padded is 2.1x the loop at 16 short texts and 3.3x at 48.

The last layer computes only what the classifier reads: keys and values for every token, queries,
output projection and feed-forward for each text's first token alone (~14% fewer FLOPs, same math).
Weights are used as loaded (fp32 and bf16 tested; fp16 on CUDA runs the same code); logits come back
as float32 on the CPU.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DistilBertForSequenceClassification, PreTrainedModel

ATTENTION = ("padded", "block", "jagged", "loop")


# one SDPA call per text per layer costs about this much compute in dispatch (2-core AVX2 EPYC: ~30 us
# at ~50 GFLOP/s); a CPU with more FLOP/s per call makes padding the better deal more often
LOOP_CALL_FLOPS = 1.5e6


def default_attention(device: torch.device, lengths: Sequence[int] = (), dim: int = 768) -> str:
    if device.type != "cpu":
        return "padded"
    if not lengths:
        return "loop"
    padding_flops = 4 * dim * (len(lengths) * max(lengths) ** 2 - sum(n * n for n in lengths))
    return "padded" if padding_flops <= len(lengths) * LOOP_CALL_FLOPS else "loop"


@dataclass(frozen=True)
class Segments:
    """Where each text lies in a packed [total, ...] tensor, in the index forms the variants need."""

    lengths: list[int]
    offsets: torch.Tensor  # (n + 1,) start of each text, then total
    seg: torch.Tensor  # (total,) which text each row belongs to
    slots: torch.Tensor  # (total,) row * longest + position: the row's place in a padded [n, longest]
    longest: int

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> Segments:
        n_len = torch.tensor(lengths, dtype=torch.long)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(n_len, 0, out=offsets[1:])
        seg = torch.repeat_interleave(torch.arange(len(lengths)), n_len)
        position = torch.arange(int(offsets[-1])) - offsets[seg]
        longest = max(lengths)
        slots = seg * longest + position
        return cls(lengths, offsets.to(device), seg.to(device), slots.to(device), longest)

    @property
    def positions(self) -> torch.Tensor:
        return self.slots - self.seg * self.longest

    @property
    def firsts(self) -> torch.Tensor:
        return self.offsets[:-1]


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Segments, Segments], torch.Tensor]


def _pad(x: torch.Tensor, s: Segments) -> torch.Tensor:
    """[total, H, D] -> [n, H, longest, D] (zeros where a text has no token)."""
    out = x.new_zeros(len(s.lengths) * s.longest, *x.shape[1:]).index_copy_(0, s.slots, x)
    return out.view(len(s.lengths), s.longest, *x.shape[1:]).transpose(1, 2)


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Segments, ks: Segments) -> torch.Tensor:
    key_mask = torch.zeros(len(ks.lengths) * ks.longest, dtype=torch.bool, device=k.device)
    key_mask[ks.slots] = True  # every query row sees at least its own text's first key: no all-masked row
    key_mask = key_mask.view(len(ks.lengths), 1, 1, ks.longest)
    out = F.scaled_dot_product_attention(_pad(q, qs), _pad(k, ks), _pad(v, ks), attn_mask=key_mask)
    return out.transpose(1, 2).reshape(len(qs.lengths) * qs.longest, -1).index_select(0, qs.slots)


def attend_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Segments, ks: Segments) -> torch.Tensor:
    mask = qs.seg[:, None] == ks.seg[None, :]  # block diagonal: a token sees its own text only
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1).reshape(q.shape[0], -1)


def attend_jagged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Segments, ks: Segments) -> torch.Tensor:
    # Nested tensors cannot wrap inference tensors (their version counter), so copy out of inference mode.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are a prototype" from torch's own CPU fallback
        qo, ko = qs.offsets.clone(), ks.offsets.clone()
        nq = torch.nested.nested_tensor_from_jagged(q.clone(), qo).transpose(1, 2)
        nk = torch.nested.nested_tensor_from_jagged(k.clone(), ko).transpose(1, 2)
        nv = torch.nested.nested_tensor_from_jagged(v.clone(), ko).transpose(1, 2)
        out = F.scaled_dot_product_attention(nq, nk, nv).transpose(1, 2).values()
    return out.reshape(q.shape[0], -1)


def attend_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Segments, ks: Segments) -> torch.Tensor:
    qo, ko = qs.offsets.tolist(), ks.offsets.tolist()
    parts = []
    for i in range(len(qs.lengths)):
        keys = slice(ko[i], ko[i + 1])
        qi, ki, vi = q[qo[i] : qo[i + 1]].transpose(0, 1), k[keys].transpose(0, 1), v[keys].transpose(0, 1)
        parts.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(parts).reshape(q.shape[0], -1)


_ATTEND: dict[str, Attend] = {
    "padded": attend_padded,
    "block": attend_block,
    "jagged": attend_jagged,
    "loop": attend_loop,
}


def supports_packing(model: object) -> bool:
    """True for a DistilBERT sequence classifier in eval mode (packing skips dropout)."""
    return isinstance(model, DistilBertForSequenceClassification) and not model.training


def _layer(block: Any, h: torch.Tensor, segs: Segments, attend: Attend, firsts: Segments | None) -> torch.Tensor:
    """One TransformerBlock over a pack; given `firsts` (one token a text), only each text's first token
    goes on past attention's keys and values."""
    sa = block.attention
    heads, head_dim = sa.n_heads, sa.attention_head_size
    k = sa.k_lin(h).view(-1, heads, head_dim)
    v = sa.v_lin(h).view(-1, heads, head_dim)
    if firsts is not None:  # only the first token's row reaches the classifier
        h = h.index_select(0, segs.firsts)
        q_segs = firsts
    else:
        q_segs = segs
    q = sa.q_lin(h).view(-1, heads, head_dim)
    a = block.sa_layer_norm(sa.out_lin(attend(q, k, v, q_segs, segs)) + h)
    ffn = block.ffn
    return block.output_layer_norm(ffn.lin2(ffn.activation(ffn.lin1(a))) + a)


Layer = Callable[[Any, torch.Tensor, Segments, Attend, Segments | None], torch.Tensor]


@functools.cache
def compiled_layer() -> Layer:
    """_layer under torch.compile (inductor, dynamic shapes, weights frozen), for TORCH_COMPILE=1.

    Measured against eager by harness/compiled.py. Attention stays eager inside it (eager_attention):
    the variants read per-text offsets as Python ints, which dynamo would specialize on, recompiling
    for every new mix of lengths; the linears, norms and feed-forward around it compile."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the engine never trains: weights fold into the graphs as constants
    torch._dynamo.config.recompile_limit = 64  # dynamic passes settle in ~16 graphs; past 8 dynamo would go eager
    return cast(Layer, torch.compile(_layer, dynamic=True))


@functools.cache
def eager_attention(name: str) -> Attend:
    """The variant kept out of compiled graphs; one object per variant, since dynamo guards on its identity."""
    import torch._dynamo

    return cast(Attend, torch._dynamo.disable(_ATTEND[name]))


@torch.inference_mode()
def packed_forward(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    attention: str | None = None,
    first_token_only: bool = True,
    compiled: bool = False,
) -> torch.Tensor:
    """Logits, float32 (n, labels) on the CPU, of one padding-free pass over texts of any lengths.

    first_token_only=False runs the last layer over every token, as the padded model does (to measure
    what packing alone buys); compiled=True runs each layer as compiled_layer() (TORCH_COMPILE)."""
    if attention is not None and attention not in _ATTEND:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    if not supports_packing(model):
        raise TypeError(f"packed_forward needs a DistilBertForSequenceClassification in eval mode, not {type(model)}")
    m: Any = model  # transformers' module attributes are untyped for mypy
    bert, labels = m.distilbert, int(m.config.num_labels)
    if not ids:
        return torch.empty((0, labels), dtype=torch.float32)
    lengths = [len(x) for x in ids]
    if min(lengths) < 1 or max(lengths) > model.config.max_position_embeddings:
        raise ValueError(f"every text needs 1 to {model.config.max_position_embeddings} tokens, got {lengths}")
    device = bert.embeddings.word_embeddings.weight.device
    name = attention or default_attention(device, lengths, int(model.config.dim))
    attend, layer = (eager_attention(name), compiled_layer()) if compiled else (_ATTEND[name], _layer)
    segs = Segments.of(lengths, device)
    firsts = Segments.of([1] * len(lengths), device) if first_token_only else None
    tokens = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long).to(device, non_blocking=True)
    emb = bert.embeddings
    h = emb.LayerNorm(emb.word_embeddings(tokens) + emb.position_embeddings(segs.positions))
    layers = bert.transformer.layer
    for i, block in enumerate(layers):
        h = layer(block, h, segs, attend, firsts if i == len(layers) - 1 else None)
    if not first_token_only:
        h = h.index_select(0, segs.firsts)
    pooled = F.relu(m.pre_classifier(h))  # h: one row per text, its first token
    return m.classifier(pooled).float().cpu()
