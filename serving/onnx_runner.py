"""ONNX Runtime engine for a Hugging Face sequence classifier: exported once, cached on disk, then run.

    from serving.onnx_runner import load_onnx_runner, require_onnxruntime
    require_onnxruntime()                                  # at start: RuntimeError naming the package if absent
    runner = load_onnx_runner(model, cache_key, "int8", torch.device("cpu"), Path("~/.cache/x/onnx"))
    logits = runner(input_ids, attention_mask)             # int64 (n, L) tensors -> float32 (n, labels) on CPU
    runner.describe()                                      # {"backend": "onnx", "onnxruntime": ..., ...}

The graph is exported with torch.onnx (the dynamo exporter) from whatever fp32 model was loaded, with
dynamic batch and sequence axes. dtype fp32 runs it as exported; int8 is onnxruntime's dynamic
quantization of it (CPU); fp16 is its fp16 conversion (CUDA only: the CPU provider has few fp16 kernels).
One file per (cache_key, dtype) in cache_dir, plus a JSON sidecar naming what built it (versions of torch,
transformers, onnx, onnxscript, onnxruntime, the opset) and the file's size and sha256: a restart with
the same toolchain loads it without exporting; a sidecar that disagrees, a file that fails its hash, or
one onnxruntime cannot open is rebuilt with a WARNING, never a crash. Files are written to a temporary
name and moved in place with os.replace, so a crash or a second worker building at once never leaves
a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

log = logging.getLogger("sentimentalyzer.onnx")
OPSET = 20  # the exporter's default in torch 2.13, pinned so an upgrade cannot change the file unnoticed
FORMAT = 2  # bump when the way this module builds a file changes (2: int8 leaves the head in fp32)
DTYPES = ("fp32", "int8", "fp16")
INPUTS = ("input_ids", "attention_mask")
MISSING = "BACKEND=onnx needs the onnxruntime package: pip install onnxruntime (onnxruntime-gpu for CUDA)"


def require_onnxruntime() -> ModuleType:
    """The onnxruntime module, or a RuntimeError naming the package: call it at start so a missing
    package fails there, not at the first request."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    return onnxruntime


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_metadata(cache_key: str, dtype: str) -> dict[str, Any]:
    """Everything that decides the bytes of a cache file: any change makes the cached one stale."""
    import transformers

    ort = require_onnxruntime()
    return {
        "format": FORMAT,
        "cache_key": cache_key,
        "dtype": dtype,
        "opset": OPSET,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": ort.__version__,
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
    }


def cache_paths(cache_dir: Path, cache_key: str, dtype: str) -> tuple[Path, Path]:
    """The model file and its sidecar. Versions stay out of the name, so an upgrade replaces the
    file in place instead of leaving a 250 MB orphan per toolchain."""
    digest = hashlib.sha256(json.dumps([cache_key, dtype]).encode()).hexdigest()[:20]
    return cache_dir / f"{digest}-{dtype}.onnx", cache_dir / f"{digest}-{dtype}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_build(target: Path, build: Callable[[Path], object]) -> None:
    """Runs build(tmp) on a temporary path beside target, then moves it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def cache_problem(model_path: Path, meta_path: Path, expected: dict[str, Any]) -> str | None:
    """Why the cached file cannot be used as it is (None: it can)."""
    if not model_path.exists() or not meta_path.exists():
        return "not cached"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable metadata ({exc})"
    stale = sorted(k for k, v in expected.items() if meta.get(k) != v)
    if stale:
        return "stale: " + ", ".join(f"{k} {meta.get(k)!r} != {expected[k]!r}" for k in stale)
    if meta.get("size") != model_path.stat().st_size or meta.get("sha256") != _sha256(model_path):
        return "file does not match its recorded size and sha256"
    return None


class _DropQuantizerChatter(logging.Filter):
    """onnxruntime.quantization logs each tensor it skips, on the root logger: drop all but errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return record.levelno >= logging.ERROR or "onnxruntime/quantization" not in path


@contextlib.contextmanager
def _quiet_toolchain() -> Iterator[None]:
    """The exporter logs every rewrite it applies at INFO (hundreds of lines per export): errors only."""
    names = ("onnxscript", "onnx_ir", "torch.onnx")
    saved = {name: logging.getLogger(name).level for name in names}
    chatter = _DropQuantizerChatter()
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().addFilter(chatter)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # axis-name notes and pytree deprecations from the exporter
            yield
    finally:
        logging.getLogger().removeFilter(chatter)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class _Logits(torch.nn.Module):
    """The classifier as the graph's signature: two int64 inputs, one logits output."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_fp32(model: PreTrainedModel, out: Path) -> None:
    """torch.onnx export with dynamic batch and sequence axes (sequence up to the position table)."""
    for package in ("onnx", "onnxscript"):
        if _version(package) is None:
            raise RuntimeError(f"exporting for BACKEND=onnx needs the {package} package: pip install {package}")
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"export from the fp32 model (got {param.dtype}): the runner converts dtypes itself")
    ids = torch.full((2, 8), 1000, dtype=torch.long, device=param.device)  # sizes 0/1 would be specialized
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=int(model.config.max_position_embeddings))
    shapes = {name: {0: batch, 1: seq} for name in INPUTS}
    with _quiet_toolchain():
        program = torch.onnx.export(
            _Logits(model.eval()),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(out), external_data=False)  # one file, so one os.replace publishes it whole


def quantize_int8(src: Path, out: Path) -> None:
    """Dynamic int8: weights quantized once, activations per call (uint8 x int8, VNNI where present).

    MatMul only: the encoder's linears, ~all the time. The classifier head (two Gemm on one row per
    text) stays fp32: it costs nothing and is where rounding moves P most (tiny model: 0.011 -> 0.009).
    Per-tensor weight scales: per-channel was slower here and no closer on the stand-in (0.007 vs 0.004)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_toolchain():
        quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=False)


def convert_fp16(src: Path, out: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs kept (logits come back as float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))


def _write_metadata(model_path: Path, meta_path: Path, metadata: dict[str, Any]) -> None:
    record = {**metadata, "size": model_path.stat().st_size, "sha256": _sha256(model_path)}
    _atomic_build(meta_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2), encoding="utf-8"))


def ensure_cached(model: PreTrainedModel, cache_key: str, dtype: str, cache_dir: Path) -> tuple[Path, bool]:
    """A valid cache file for (cache_key, dtype), built if missing or unusable; also whether it was built."""
    model_path, meta_path = cache_paths(cache_dir, cache_key, dtype)
    expected = build_metadata(cache_key, dtype)
    problem = cache_problem(model_path, meta_path, expected)
    if problem is None:
        return model_path, False
    if problem != "not cached":
        log.warning("ONNX cache %s unusable (%s): rebuilding it", model_path, problem)
    meta_path.unlink(missing_ok=True)  # a crash mid-build must not leave the old sidecar vouching for it
    if dtype == "fp32":
        log.info("exporting the model to ONNX (%s), once: later starts load %s", cache_key, model_path)
        _atomic_build(model_path, lambda tmp: export_fp32(model, tmp))
    else:
        src, _ = ensure_cached(model, cache_key, "fp32", cache_dir)  # int8 and fp16 derive from the fp32 graph
        convert = quantize_int8 if dtype == "int8" else convert_fp16
        _atomic_build(model_path, lambda tmp: convert(src, tmp))
    _write_metadata(model_path, meta_path, expected)
    return model_path, True


def _providers(ort: ModuleType, dtype: str, device: torch.device) -> list[Any]:
    if dtype not in DTYPES:
        raise ValueError(f"BACKEND=onnx supports DTYPE {', '.join(DTYPES)}, not {dtype!r}")
    if device.type == "cpu":
        if dtype == "fp16":
            raise ValueError("BACKEND=onnx DTYPE=fp16 needs CUDA: on CPU use fp32 or int8")
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"BACKEND=onnx runs on cpu or cuda, not {device}")
    if dtype == "int8":
        raise ValueError("BACKEND=onnx DTYPE=int8 is CPU dynamic quantization: use it with DEVICE=cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"DEVICE={device} with BACKEND=onnx needs the onnxruntime-gpu package (this onnxruntime "
            f"{ort.__version__} offers {ort.get_available_providers()}): pip install onnxruntime-gpu, or DEVICE=cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def _session(ort: ModuleType, path: Path, providers: list[Any], threads: int | None, spin: bool) -> Any:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()  # the same CPU share torch would take
    opts.inter_op_num_threads = 1  # one chain of ops: a second pool would only contend for the same cores
    opts.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
    # Spinning keeps the pool's threads busy-waiting after a run: lower latency in-process, but CPU
    # taken from the event loop and the tokenizer on a small machine. Measure both (harness.engines).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxRunner:
    """One ONNX Runtime session: __call__ is thread-safe (InferenceSession.run is)."""

    def __init__(self, session: Any, path: Path, built: bool, dtype: str, ort_version: str) -> None:
        self.session, self.path, self.built, self.dtype, self.ort_version = session, path, built, dtype, ort_version

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64),
        }
        (logits,) = self.session.run(["logits"], feeds)
        return torch.from_numpy(logits).float()

    def describe(self) -> dict[str, object]:
        return {
            "backend": "onnx",
            "onnxruntime": self.ort_version,
            "providers": self.session.get_providers(),
            "onnx_dtype": self.dtype,
            "cache_file": str(self.path),
            "exported_now": self.built,
        }


def load_onnx_runner(
    model: PreTrainedModel,
    cache_key: str,
    dtype: str,
    device: torch.device,
    cache_dir: Path,
    threads: int | None = None,
    spin: bool = True,
) -> OnnxRunner:
    """A runner for `model` (fp32, as loaded), from the cache when it holds a valid file, else built now.

    cache_key must identify the weights (e.g. model path + a hash of config and weights): it is what
    makes a cached file this model's. A cached file that onnxruntime cannot open is rebuilt once.
    threads: intra-op threads (default torch.get_num_threads()); spin: onnxruntime's busy-wait between ops.
    """
    ort = require_onnxruntime()
    providers = _providers(ort, dtype, device)
    path, built = ensure_cached(model, cache_key, dtype, cache_dir)
    try:
        session = _session(ort, path, providers, threads, spin)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph classes
        if built:
            raise
        log.warning("ONNX cache %s failed to load (%s): rebuilding it", path, str(exc).splitlines()[0])
        cache_paths(cache_dir, cache_key, dtype)[1].unlink(missing_ok=True)
        path, built = ensure_cached(model, cache_key, dtype, cache_dir)
        session = _session(ort, path, providers, threads, spin)
    return OnnxRunner(session, path, built, dtype, ort.__version__)
