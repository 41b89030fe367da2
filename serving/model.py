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

import functools
import hashlib
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from serving.engine import Engine, PassStats, TorchRunner, plan_groups
from serving.settings import Settings, SettingsError
from serving.source import STAND_IN, Source, cache_dir, resolve_source, standin_tokenizer_dir
from serving.text import Prediction, TextTokenizer, load_tokenizer

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
    "standin_tokenizer_dir",
]
log = logging.getLogger("sentimentalyzer.model")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
            packed = functools.partial(packed_forward, model, compiled=settings.torch_compile)
            info["compiled"] = "inductor" if settings.torch_compile else None
        elif settings.torch_compile:
            raise SettingsError(f"TORCH_COMPILE: compiles the packed pass of a DistilBERT, not {type(model).__name__}")
    return Engine(tokenizer, model, TorchRunner(model, device), settings, info, packed, device, source)
