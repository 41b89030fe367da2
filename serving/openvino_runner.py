"""OpenVINO engine (CPU) for a Hugging Face sequence classifier: converted once, cached on disk, then run.

    from serving.openvino_runner import load_openvino_runner, require_openvino
    require_openvino()                                        # at start: RuntimeError naming the package if absent
    runner = load_openvino_runner(model, key, "int8", tokenizer, Path("~/.cache/x"), threads=2)
    logits = runner(input_ids, attention_mask)                # int64 (n, L) tensors -> float32 (n, labels)
    runner.describe()                                         # {"backend": "openvino", "openvino": ..., ...}

The graph is the project's cached ONNX export of whatever fp32 model was loaded (serving/onnx_runner.py),
read by `openvino.convert_model` and saved as OpenVINO IR (.xml + .bin). DTYPE fp32 runs it with
INFERENCE_PRECISION_HINT f32; bf16 with bf16 inference precision (CPUs with AVX-512 BF16 or AMX only:
refused elsewhere); int8 is NNCF post-training quantization (ModelType.TRANSFORMER) calibrated on
serving/calibration.py's texts, run at bf16 inference precision where the CPU has bf16 (the fastest
measured on AMX: 296 against 206 seq/s at f32, issue 24) and f32 elsewhere. Cache rules are the ONNX
cache's: one IR per (weights key, dtype) plus a JSON sidecar naming the toolchain and both files' sha256;
a sidecar that disagrees or a file that fails its hash or will not compile is rebuilt with a WARNING;
files are written under temporary names and moved in place with os.replace.

Threads follow the engine's core plan (INFERENCE_NUM_THREADS = torch's thread count, which
serving/cores.py set), one stream, the LATENCY hint, and OpenVINO's own pinning off: the plan already
set the process's affinity, and OpenVINO pinning its threads again can stack them on the cores HTTP uses.
Passes are padded on the engine's length ladder, so the CPU plugin's per-shape caches stay bounded.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from serving import onnx_runner
from serving.calibration import CALIBRATION_TEXTS

log = logging.getLogger("sentimentalyzer.openvino")
FORMAT = 1  # bump when the way this module builds an IR changes
DTYPES = ("fp32", "bf16", "int8")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
MISSING = "BACKEND=openvino needs the {} package: pip install {}"


def require_openvino(dtype: str = "fp32") -> ModuleType:
    """The openvino module (and nncf for int8), or a RuntimeError naming the package."""
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeError(MISSING.format("openvino", "openvino")) from exc
    if dtype == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(MISSING.format("nncf", "nncf") + " (DTYPE=int8 quantizes with it)") from exc
    return openvino


def check_dtype(dtype: str, device: torch.device, flags: frozenset[str]) -> None:
    if device.type != "cpu":
        raise ValueError(f"BACKEND=openvino runs on the CPU here, not {device}: set DEVICE=cpu")
    if dtype not in DTYPES:
        raise ValueError(f"BACKEND=openvino supports DTYPE {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "bf16" and not flags.intersection(BF16_FLAGS):
        raise ValueError("BACKEND=openvino DTYPE=bf16 needs a CPU with AVX-512 BF16 or AMX: use fp32 or int8")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_metadata(cache_key: str, dtype: str) -> dict[str, Any]:
    """What decides the IR's bytes (the ONNX export's toolchain included): any change makes it stale."""
    meta = onnx_runner.build_metadata(cache_key, "fp32")
    return {
        **meta,
        "format": FORMAT,
        "onnx_format": meta["format"],
        "dtype": dtype,
        "openvino": _version("openvino"),
        "nncf": _version("nncf") if dtype == "int8" else None,
        "calibration": len(CALIBRATION_TEXTS),
    }


def cache_paths(cache_dir: Path, cache_key: str, dtype: str) -> tuple[Path, Path, Path]:
    """The IR's .xml and .bin and the sidecar."""
    xml, meta = onnx_runner.cache_paths(cache_dir, cache_key, dtype)
    return xml.with_suffix(".xml"), xml.with_suffix(".bin"), meta


def _problem(xml: Path, bin_: Path, meta_path: Path, expected: dict[str, Any]) -> str | None:
    problem = onnx_runner.cache_problem(xml, meta_path, expected)
    if problem is not None:
        return problem
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not bin_.exists() or meta.get("bin_sha256") != onnx_runner._sha256(bin_):
        return "weights file does not match its recorded sha256"
    return None


def _calibration(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, np.ndarray]]:
    """One item per text, each its own length (the engine's passes are padded to many lengths)."""
    items = []
    for text in CALIBRATION_TEXTS:
        enc = tokenizer([text], truncation=True, max_length=128, return_tensors="np")
        items.append({k: enc[k].astype(np.int64) for k in onnx_runner.INPUTS})
    return items


def _build(ov: ModuleType, onnx_path: Path, dtype: str, tokenizer: PreTrainedTokenizerBase, xml: Path) -> None:
    model = ov.convert_model(str(onnx_path))
    if dtype == "int8":
        import nncf

        data = nncf.Dataset(_calibration(tokenizer))
        model = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(CALIBRATION_TEXTS))
    tmp = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".building-"))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)  # fp32 weights: precision is a hint
        os.replace(tmp / "model.bin", xml.with_suffix(".bin"))  # the sidecar, written last, vouches for both
        os.replace(tmp / "model.xml", xml)
    finally:
        for leftover in tmp.glob("*"):
            leftover.unlink()
        tmp.rmdir()


def ensure_cached(
    model: PreTrainedModel, cache_key: str, dtype: str, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> tuple[Path, bool]:
    """A valid IR for (cache_key, dtype), built if missing or unusable; also whether it was built."""
    ov = require_openvino(dtype)
    xml, bin_, meta_path = cache_paths(cache_dir / "openvino", cache_key, dtype)
    expected = build_metadata(cache_key, dtype)
    problem = _problem(xml, bin_, meta_path, expected)
    if problem is None:
        return xml, False
    if problem != "not cached":
        log.warning("OpenVINO cache %s unusable (%s): rebuilding it", xml, problem)
    meta_path.unlink(missing_ok=True)  # a crash mid-build must not leave the old sidecar vouching for it
    onnx_path, _ = onnx_runner.ensure_cached(model, cache_key, "fp32", cache_dir / "onnx")
    xml.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the model to OpenVINO %s (%s), once: later starts load %s", dtype, cache_key, xml)
    _build(ov, onnx_path, dtype, tokenizer, xml)
    record = {
        **expected,
        "size": xml.stat().st_size,
        "sha256": onnx_runner._sha256(xml),
        "bin_sha256": onnx_runner._sha256(bin_),
    }
    onnx_runner._atomic_build(meta_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2), encoding="utf-8"))
    return xml, True


def _precision(dtype: str, flags: frozenset[str]) -> str:
    if dtype == "bf16" or (dtype == "int8" and flags.intersection(BF16_FLAGS)):
        return "bf16"
    return "f32"


def _compile(ov: ModuleType, xml: Path, precision: str, threads: int) -> Any:
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
    }
    return ov.Core().compile_model(str(xml), "CPU", config)


class OpenVinoRunner:
    """One compiled model; __call__ is thread-safe (one infer request per calling thread)."""

    def __init__(self, compiled: Any, path: Path, built: bool, dtype: str, precision: str, threads: int) -> None:
        self.compiled, self.path, self.built, self.dtype = compiled, path, built, dtype
        self.precision, self.threads = precision, threads
        self._local = threading.local()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64),
        }
        result = request.infer(feeds)  # releases the GIL while it computes
        return torch.from_numpy(np.array(result[self.compiled.output(0)], dtype=np.float32))

    def describe(self) -> dict[str, object]:
        return {
            "backend": "openvino",
            "openvino": _version("openvino"),
            "openvino_dtype": self.dtype,
            "inference_precision": self.precision,
            "openvino_threads": self.threads,
            "cache_file": str(self.path),
            "converted_now": self.built,
        }


def load_openvino_runner(
    model: PreTrainedModel,
    cache_key: str,
    dtype: str,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Path,
    flags: frozenset[str],
    threads: int | None = None,
) -> OpenVinoRunner:
    """A runner for `model` (fp32, as loaded), from the cache when it holds a valid IR, else built now.
    cache_dir is the project's cache root: the IR goes in its openvino/, the ONNX export in its onnx/."""
    ov = require_openvino(dtype)
    check_dtype(dtype, torch.device("cpu"), flags)
    precision, n = _precision(dtype, flags), threads or torch.get_num_threads()
    xml, built = ensure_cached(model, cache_key, dtype, tokenizer, cache_dir)
    try:
        compiled = _compile(ov, xml, precision, n)
    except RuntimeError as exc:
        if built:
            raise
        log.warning("OpenVINO cache %s failed to compile (%s): rebuilding it", xml, str(exc).splitlines()[0])
        cache_paths(cache_dir / "openvino", cache_key, dtype)[2].unlink(missing_ok=True)
        xml, built = ensure_cached(model, cache_key, dtype, tokenizer, cache_dir)
        compiled = _compile(ov, xml, precision, n)
    return OpenVinoRunner(compiled, xml, built, dtype, precision, n)
