"""BACKEND=auto: the fastest engine this machine runs whose probabilities agree with torch fp32, measured
once and cached (../shared/SPEC.md).

    from serving.autoselect import Machine, choose
    choice = choose(settings, "pass", load, Machine("cpu", flags, weights, cache_dir() / "auto"))
    engine = load(settings.replace(backend=choice.backend, dtype=choice.dtype))   # choice.describe(): why

`serving.model.load_engine` does exactly this when BACKEND=auto. At the first start every candidate the
machine can run (`candidates`) is loaded, warmed up and timed on the built-in calibration texts
(serving/calibration.py, not the bench corpora), each shape once untimed first: a batch of one on each
of the first 8 texts (the best of two), and full passes over all 64 (the best of three; the batched
server's shape, planned as the server plans them). A candidate whose probabilities differ from torch
fp32's by more than AGREEMENT on any calibration text is dropped. The batched server takes the most
texts/s over full passes ("pass"), the naive server the lowest median batch-of-one latency ("one").
The timings are cached as JSON under `machine.cache`, keyed by the CPU's flags, the weights, the
library versions, the threads, the candidates and the method, so the next start reads them instead
of measuring again; a damaged file is measured again with a WARNING.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serving.calibration import CALIBRATION_TEXTS
from serving.engine import Engine
from serving.settings import Settings

log = logging.getLogger("sentimentalyzer.auto")
AGREEMENT = 1e-2  # max |dP| against torch fp32 on any calibration text (SPEC)
SHAPES = {"pass": "full passes over the 64 calibration texts", "one": "a batch of one"}
ONE_TEXTS = 8
PASS_REPEATS = 3
METHOD = 2  # how `measure` times: part of the cache key, so a changed method measures again
VERSIONED = ("torch", "transformers", "onnxruntime", "openvino", "nncf")


@dataclass(frozen=True, slots=True)
class Machine:
    """What the choice depends on besides the settings: device kind, CPU flags, the weights' key."""

    device: str  # "cpu" or "cuda"
    flags: frozenset[str]
    weights: str  # serving.model.weights_key of what MODEL_ID loaded
    cache: Path  # the folder of cached choices


@dataclass(frozen=True, slots=True)
class Timing:
    """One candidate, measured: `error` says why it cannot serve (failed to load, disagrees)."""

    backend: str
    dtype: str
    one_ms: float = 0.0  # median latency of a batch of one
    pass_texts_s: float = 0.0  # texts per second over full passes
    max_dp: float = 0.0  # max |P - P(torch fp32)| over every calibration text and label
    load_s: float = 0.0  # load + warm-up (conversion included on a first start)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    backend: str
    dtype: str
    shape: str
    cached: bool
    timings: tuple[Timing, ...]

    def describe(self) -> dict[str, object]:
        """For /ready and the results: what was chosen, for which pass shape, and every candidate's figures."""
        return {
            "chosen": f"{self.backend} {self.dtype}",
            "for": SHAPES[self.shape],
            "cached": self.cached,
            "agreement": AGREEMENT,
            "candidates": [asdict(t) for t in self.timings],
        }


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def candidates(machine: Machine, dtype: str) -> list[tuple[str, str]]:
    """(backend, dtype) pairs this machine can run fast, restricted to DTYPE when it is not auto.
    bf16 only where the CPU has bf16 units: elsewhere it is emulated and only costs start-up time."""
    bf16 = bool({"avx512_bf16", "amx_bf16"} & machine.flags)
    if machine.device == "cuda":
        options = [("torch", "fp16"), ("torch", "bf16"), ("torch", "fp32")]
        if _installed("onnxruntime"):
            import onnxruntime

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                options += [("onnx", "fp16"), ("onnx", "fp32")]
    else:
        options = [("torch", "fp32"), *([("torch", "bf16")] if bf16 else [])]
        if _installed("onnxruntime"):
            options += [("onnx", "fp32"), ("onnx", "int8")]
        if _installed("openvino"):
            options += [("openvino", "fp32"), *([("openvino", "bf16")] if bf16 else [])]
            options += [("openvino", "int8")] if _installed("nncf") else []
    return [o for o in options if dtype in ("auto", o[1])]


def cache_key(settings: Settings, machine: Machine, options: Sequence[tuple[str, str]]) -> dict[str, object]:
    versions = {}
    for package in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "method": METHOD,
        "flags": sorted(machine.flags),
        "device": machine.device,
        "weights": machine.weights,
        "versions": versions,
        "threads": torch.get_num_threads(),
        "candidates": [list(o) for o in options],
        "passes": [settings.packing, settings.batch_policy, settings.max_batch_size],
    }


Measure = Callable[[Engine, Sequence[Sequence[int]]], tuple[float, float, torch.Tensor]]


def measure(engine: Engine, ids: Sequence[Sequence[int]]) -> tuple[float, float, torch.Tensor]:
    """(median batch-of-one ms, texts/s over full passes, probabilities of every text) for one engine.
    Every shape is run once untimed first: a first call of a shape pays for kernel selection and
    allocation (oneDNN primitives, OpenVINO's shape cache), which a warm server no longer pays."""
    for x in ids[:ONE_TEXTS]:
        engine.predict_ids([x])
    engine.predict_ids(ids)
    one = [min(_timed(engine.predict_ids, [x]) for _ in range(2)) * 1000 for x in ids[:ONE_TEXTS]]
    best = min(_timed(engine.predict_ids, ids) for _ in range(PASS_REPEATS))
    chunk = max(1, engine.settings.max_batch_size)
    probs = torch.cat([engine.forward(ids[i : i + chunk])[0] for i in range(0, len(ids), chunk)])
    return statistics.median(one), len(ids) / best, probs


def _timed(fn: Callable[[Sequence[Sequence[int]]], object], ids: Sequence[Sequence[int]]) -> float:
    t0 = time.perf_counter()
    fn(ids)
    return time.perf_counter() - t0


def choose(
    settings: Settings,
    shape: str,
    load: Callable[[Settings], Engine],
    machine: Machine,
    measure_fn: Measure = measure,
) -> Choice:
    """The concrete engine for `shape` ("pass": the batched server, "one": the naive server)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {tuple(SHAPES)}, got {shape!r}")
    options = candidates(machine, settings.dtype)
    if not options:
        raise RuntimeError(f"BACKEND=auto: no engine on this machine runs DTYPE={settings.dtype}")
    key = cache_key(settings, machine, options)
    path = machine.cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    timings, cached = _read(path, key), True
    if timings is None:
        cached = False
        timings = calibrate(settings, options, load, measure_fn)
        _write(path, key, timings)
    return pick(timings, shape, cached)


def calibrate(
    settings: Settings, options: Sequence[tuple[str, str]], load: Callable[[Settings], Engine], measure_fn: Measure
) -> tuple[Timing, ...]:
    """Loads, warms up and measures every candidate, one at a time (one model in memory at once)."""
    log.info("BACKEND=auto: measuring %s (first start on this machine and these weights)", options)
    reference: torch.Tensor | None = None
    out = []
    for backend, dtype in [("torch", "fp32"), *[o for o in options if o != ("torch", "fp32")]]:
        t0 = time.perf_counter()
        try:
            engine = load(settings.replace(backend=backend, dtype=dtype))
            engine.warmup(calibrate=False)
            ids = engine.tokenize(CALIBRATION_TEXTS)
            load_s = time.perf_counter() - t0
            one_ms, texts_s, probs = measure_fn(engine, ids)
        except Exception as exc:  # a candidate that cannot load here is reported, not fatal
            if (backend, dtype) == ("torch", "fp32"):
                raise
            out.append(Timing(backend, dtype, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            continue
        finally:
            engine = None  # type: ignore[assignment]  # frees the model before the next one loads
            gc.collect()
        if reference is None:
            reference = probs
        max_dp = float((probs - reference).abs().max())
        error = f"max |dP| {max_dp:.2g} > {AGREEMENT:g} against torch fp32" if max_dp > AGREEMENT else None
        if (backend, dtype) in options:
            out.append(Timing(backend, dtype, round(one_ms, 3), round(texts_s, 1), max_dp, round(load_s, 1), error))
    return tuple(out)


def pick(timings: Sequence[Timing], shape: str, cached: bool) -> Choice:
    ok = [t for t in timings if t.error is None]
    if not ok:
        raise RuntimeError(f"BACKEND=auto: no candidate can serve: {[(t.backend, t.dtype, t.error) for t in timings]}")
    best = min(ok, key=lambda t: t.one_ms) if shape == "one" else max(ok, key=lambda t: t.pass_texts_s)
    log.info("BACKEND=auto: %s %s, the fastest for %s (cached: %s)", best.backend, best.dtype, SHAPES[shape], cached)
    return Choice(best.backend, best.dtype, shape, cached, tuple(timings))


def _read(path: Path, key: dict[str, object]) -> tuple[Timing, ...] | None:
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        if body["key"] != key:
            raise ValueError("its key differs from this machine's")
        return tuple(Timing(**t) for t in body["timings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("BACKEND=auto: cached choice %s is unusable (%s): measuring again", path, exc)
        return None


def _write(path: Path, key: dict[str, object], timings: Sequence[Timing]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auto-")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "timings": [asdict(t) for t in timings]}, f, indent=1)
    os.replace(tmp, path)  # atomic: workers starting together each write a whole file
