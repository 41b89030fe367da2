"""The engine both servers call: tokenize, plan forward passes, run them, and turn logits into labels.

    from serving.model import load_engine
    engine = load_engine(Settings.from_env())
    engine.predict(["I loved it", "dull and far too long"])   # -> [Prediction(label=..., score=...), ...]
    engine.predict_ids(engine.tokenize(texts))                # the same, from token ids

Two ways to run a set of texts, picked at load (serving.model.load_engine):
- packed (PyTorch, DistilBERT): every token of every text in one pass, no padding at all
  (serving/packed.py); a pass holds at most `max_pass_tokens` tokens, calibrated at warm-up;
- padded (any other model, and ONNX Runtime): the texts are sorted by length and split into length
  groups (`plan_groups`); each group is padded to its longest text, rounded up to the next length of
  LENGTH_LADDER, so the number of distinct shapes is bounded by design (the kernel caches of oneDNN
  and friends then stay bounded too). Ladder padding counts as computed tokens in PassStats.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from serving.settings import Settings
from serving.source import Source
from serving.text import Prediction, TextTokenizer, load_tokenizer

log = logging.getLogger("sentimentalyzer.engine")
# Sequence lengths a padded pass is rounded up to: steps of about 25%, 16 lengths. With at most 64
# rows a pass that is at most 16 x 64 = 1024 shapes, oneDNN's default primitive cache capacity.
LENGTH_LADDER = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)
PACK_MIN_STEP = 16  # a packed pass's token count is rounded up to pack_size(): bounded shapes


def pack_size(real: int) -> int:
    """The token count a packed pass of `real` tokens is rounded up to: a multiple of 1/16 of the
    next power of two (16 at least), so past 256 tokens under 1/8 of a pass is filler, and 1 to 8192
    tokens take 56 shapes."""
    step = max(PACK_MIN_STEP, (1 << max(real - 1, 1).bit_length()) // 16)
    return -(-real // step) * step


@dataclass(frozen=True, slots=True)
class PassStats:
    """One forward pass, for metrics: padding efficiency is real_tokens / computed_tokens."""

    items: int
    real_tokens: int
    computed_tokens: int
    infer_s: float


class Runner(Protocol):
    """A padded forward pass: int64 (n, L) ids and mask in, logits (n, labels) out."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        nb = self.device.type == "cuda"
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device, non_blocking=nb),
                attention_mask=attention_mask.to(self.device, non_blocking=nb),
            )
        return out.logits


def ladder_length(longest: int) -> int:
    """The smallest LENGTH_LADDER length that holds `longest` tokens (itself past the ladder)."""
    i = bisect.bisect_left(LENGTH_LADDER, longest)
    return LENGTH_LADDER[i] if i < len(LENGTH_LADDER) else longest


def plan_groups(
    lengths: Sequence[int], policy: str, max_tokens: int, cost: Callable[[int, int], float]
) -> list[list[int]]:
    """Splits items into padded passes: lists of indices, each sorted by length, shortest group first.

    pad: one pass padded to the longest (the classic batcher). tokens: greedy, at most max_tokens
    padded tokens a pass. cost: the partition of the length-sorted items into contiguous groups that
    minimizes the summed estimated cost, a fixed cost per pass plus one growing with batch x length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if policy == "pad" or len(order) <= 1:
        return [order] if order else []
    if policy == "tokens":
        groups: list[list[int]] = [[]]
        for i in order:  # lengths ascend, so the new item is the group's longest
            if groups[-1] and (len(groups[-1]) + 1) * lengths[i] > max_tokens:
                groups.append([])
            groups[-1].append(i)
        return groups
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the first j items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = ladder_length(sorted_len[j - 1])
        for i in range(j):
            c = best[i] + cost(j - i, longest)
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def pack_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive items in passes of at most max_tokens tokens (an item longer than that goes alone)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if chunks[-1] and used + n > max_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks if chunks[0] else []


class Engine:
    """A loaded tokenizer and model. `predict` is thread-safe; the batched server calls it from one thread."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        runner: Runner,
        settings: Settings,
        info: dict[str, object],
        packed: Callable[[Sequence[Sequence[int]]], torch.Tensor] | None = None,
        device: torch.device | None = None,
        source: Source | None = None,
    ) -> None:
        """`packed(ids)` runs one padding-free pass over ids; `runner` a padded one; `source` is
        where the weights came from (serving.model.Source), to load them again."""
        self.tokenizer, self.model, self.runner, self.settings = tokenizer, model, runner, settings
        self.info, self.packed, self.device = info, packed, device or torch.device("cpu")
        self.source = source
        config = model.config
        self.max_length = min(int(tokenizer.model_max_length), int(config.max_position_embeddings))
        self.pad_id = int(tokenizer.pad_token_id or 0)
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.labels = [id2label[i] for i in range(len(id2label))]
        # tokens in one packed pass; warmup() calibrates it unless MAX_BATCH_TOKENS is set
        self.max_pass_tokens = settings.max_batch_tokens or 8192
        # cost(n, L) ~ fixed + per_token * n * L + per_attn * n * L^2 in seconds; fitted at warm-up
        self.cost_coef = (1e-3, 2e-5, 0.0)
        # Timings of real passes: the cost model is refitted from them, so a warm-up taken while the
        # machine was busy does not steer grouping for the whole life of the process.
        self._passes: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=256)
        self._seen = 0
        # the front ends' tokenizer (serving/text.py), so that both sides of the hop cut texts alike
        self.text_tokenizer = (
            load_tokenizer(source) if source else TextTokenizer(tokenizer.backend_tokenizer, self.max_length)
        )

    def describe(self) -> dict[str, object]:
        return {**self.info, "packed": self.packed is not None, "max_pass_tokens": self.max_pass_tokens}

    def estimate_cost_s(self, n: int, length: int) -> float:
        fixed, per_token, per_attn = self.cost_coef
        return fixed + per_token * n * length + per_attn * n * length * length

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.text_tokenizer(texts)

    def forward(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Probabilities (n, labels) in fp32 for one pass over ids; also the tokens computed."""
        if self.packed is not None:
            # filler texts round the pack up to pack_size(): a bounded set of shapes (in pieces no
            # longer than the longest text, so they do not lengthen padded attention)
            real = sum(len(x) for x in ids)
            filler = pack_size(real) - real
            piece = max(8, max(len(x) for x in ids))
            pads = [[self.pad_id] * min(piece, filler - k) for k in range(0, filler, piece)]
            logits = self.packed([*ids, *pads])[: len(ids)]
            return torch.softmax(logits.float(), dim=-1).cpu(), real + filler
        length = ladder_length(max(len(x) for x in ids))
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        logits = self.runner(input_ids, mask)
        return torch.softmax(logits.float(), dim=-1).cpu(), len(ids) * length

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        if self.packed is not None:
            return pack_chunks(lengths, self.max_pass_tokens)
        s = self.settings
        return plan_groups(lengths, s.batch_policy, s.max_batch_tokens or 8192, self.estimate_cost_s)

    def predict(self, texts: Sequence[str], on_pass: Callable[[PassStats], None] | None = None) -> list[Prediction]:
        """One Prediction per text, in input order. Texts over 512 tokens are truncated."""
        if not texts:
            return []
        t0 = time.perf_counter()
        ids = self.tokenize(texts)
        return self.predict_ids(ids, on_pass, (time.perf_counter() - t0) * 1000)

    def predict_ids(
        self,
        ids: Sequence[Sequence[int]],
        on_pass: Callable[[PassStats], None] | None = None,
        tokenize_ms: float = 0.0,
    ) -> list[Prediction]:
        """One Prediction per token-id list, in input order."""
        lengths = [len(x) for x in ids]
        out: list[Prediction | None] = [None] * len(ids)
        for group in self.plan(lengths):
            t1 = time.perf_counter()
            probs, computed = self.forward([ids[i] for i in group])
            infer_s = time.perf_counter() - t1
            best = probs.argmax(dim=-1).tolist()
            for row, i in enumerate(group):
                score = float(probs[row, best[row]])
                out[i] = Prediction(self.labels[best[row]], score, len(group), tokenize_ms, infer_s * 1000)
            if on_pass is not None:
                on_pass(PassStats(len(group), sum(lengths[i] for i in group), computed, infer_s))
            if self.packed is None:
                self._learn(len(group), computed // len(group), infer_s)
        return out  # type: ignore[return-value]  # every index is in exactly one group

    def warmup(self, calibrate: bool = True) -> None:
        """Runs a few passes (first calls allocate and pick kernels); fits the cost model (padded) or
        the token budget of a pass (packed)."""
        self._time_pass(1, 8)
        if self.packed is not None:
            if calibrate and not self.settings.max_batch_tokens:  # 0: calibrate here
                self.max_pass_tokens = self._calibrate_pack()
            log.info("warm: packed passes of at most %d tokens", self.max_pass_tokens)
            return
        shapes = ((1, 8), (1, 64), (4, 16), (16, 32), (32, 16), (4, 256), (2, 512))
        # the best of three runs per shape: the first may pay for allocation, others for a busy machine
        samples = [(n, length, min(self._time_pass(n, length) for _ in range(3))) for n, length in shapes]
        if calibrate:
            self.cost_coef = fit_cost(samples)
        fixed, per_token, per_attn = self.cost_coef
        log.info(
            "warm: cost fixed=%.2fms per_token=%.3fus per_attn=%.5fus", fixed * 1e3, per_token * 1e6, per_attn * 1e6
        )

    def _calibrate_pack(self) -> int:
        """Times packed passes of 64 tokens up to 4096 (16384 on CUDA), best of 3 each, and picks
        the budget with pick_pass_tokens: a pass at most a quarter of REQUEST_TIMEOUT_MS long."""
        top = 16384 if self.device.type == "cuda" else 4096
        times: dict[int, float] = {}
        total = 64
        while total <= top:
            n = max(1, total // 64)  # texts of 64 tokens, like a typical review
            times[total] = min(self._time_pass(n, total // n) for _ in range(3))
            total *= 2
        return pick_pass_tokens(times, self.settings.request_timeout_ms / 1000 / 4)

    def _learn(self, n: int, length: int, seconds: float) -> None:
        """Refits the cost model every 32 passes from the latest real ones (diverse shapes only)."""
        self._passes.append((n, length, seconds))
        self._seen += 1
        if self._seen % 32 == 0 and len({n * length for n, length, _ in self._passes}) >= 4:
            self.cost_coef = fit_cost(list(self._passes))

    def _time_pass(self, n: int, length: int) -> float:
        ids = [[101] + [1000] * (length - 2) + [102]] * n
        t0 = time.perf_counter()
        self.forward(ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def pick_pass_tokens(seconds: dict[int, float], max_pass_s: float) -> int:
    """The token budget of a packed pass, from measured pass times (tokens -> seconds).

    Candidates are the sizes within 10% of the best tokens/s: past the knee a bigger pass buys
    little throughput in-process, but under load it also shares the per-pass costs outside the
    forward (hand-offs, results, the event loop's turns), so the largest candidate is taken, as
    long as a pass stays within max_pass_s: a request may wait for the pass in flight and then
    compute in its own, and both must fit its deadline. If no candidate is that quick, the
    largest size that is; failing that, the smallest measured."""
    rates = {t: t / s for t, s in seconds.items()}
    best = max(rates.values())
    quick = [t for t, s in seconds.items() if s <= max_pass_s]
    fitting = [t for t in quick if rates[t] >= 0.9 * best]
    return max(fitting or quick or [min(seconds)])


def fit_cost(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares for t = fixed + per_token*n*L + per_attn*n*L^2, coefficients kept >= 0."""
    a = torch.tensor([[1.0, n * length, n * length * length] for n, length, _ in samples], dtype=torch.float64)
    t = torch.tensor([[s] for _, _, s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, t).solution.flatten().clamp(min=0.0).tolist()
    if coef[1] == 0.0 and coef[2] == 0.0:  # a degenerate fit would put everything in one pass
        coef[1] = max(s for *_, s in samples) / max(n * length for n, length, _ in samples)
    return coef[0], coef[1], coef[2]
