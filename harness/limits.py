"""The model limit of every engine the machine runs, and how far each engine's scores move from fp32.

    MODEL_ID=stand-in python -m harness.limits --corpus data/reviews.txt --out /tmp/limit.json
    python -m harness.bench ...        # runs this in a subprocess before any server starts

The limit is what the engine does in-process, no HTTP: tokenize + forward through the served code
(serving.model.load_engine, warmed up: packed passes, the length ladder or ONNX Runtime, as the
servers run them), in two forms per engine: batches cut from the length-sorted corpus (one length
class each: what perfect length bucketing reaches, the best over the batch sizes) and batches of one
(what a naive server pays per request). For the default engine also random batches padded to their
longest text through a plain padded pass: the classic batcher's limit. Agreement: P(positive) of
each engine against torch fp32 on the whole corpus (max and mean abs diff), and labels that differ
where fp32 is not within 1e-2 of 0.5.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.references import cpu_info, length_batches, read_corpus

FP32 = ("torch", "fp32")


def machine_engines(gpu: bool = False) -> list[tuple[str, str]]:
    """(BACKEND, DTYPE) of every engine this machine runs, torch fp32 first: bf16 only where the CPU
    has bf16 instructions (AVX-512 BF16 or AMX), ONNX Runtime and OpenVINO where they are installed."""
    if gpu:
        return [FP32, ("torch", "fp16"), ("torch", "bf16")]
    flags = set(cpu_info()["flags"])
    engines = [FP32]
    if flags & {"avx512_bf16", "amx_bf16"}:
        engines.append(("torch", "bf16"))
    if importlib.util.find_spec("onnxruntime") is not None:
        engines += [("onnx", "fp32"), ("onnx", "int8")]
    if importlib.util.find_spec("openvino") is not None:
        engines.append(("openvino", "fp32"))
        if flags & {"avx512_bf16", "amx_bf16"}:
            engines.append(("openvino", "bf16"))
        if importlib.util.find_spec("nncf") is not None:
            engines.append(("openvino", "int8"))
    return engines


def default_engine(gpu: bool = False) -> tuple[str, str]:
    """The engine the servers pick from this environment (BACKEND, DTYPE=auto as serving.model does)."""
    backend, dtype = os.environ.get("BACKEND") or "torch", os.environ.get("DTYPE") or "auto"
    if dtype == "auto":
        dtype = (
            "fp16"
            if gpu
            else "bf16"
            if backend in ("torch", "openvino") and "amx_bf16" in cpu_info()["flags"]
            else "fp32"
        )
    return backend, dtype


def engine_name(backend: str, dtype: str) -> str:
    return f"{backend}-{dtype}"


MAX_PASS_CHARS = 60_000  # about 15k tokens: one pass over the measured texts stays seconds long on a CPU


def stratified(texts: list[str], max_chars: int, least: int) -> list[str]:
    """Every k-th text of the length-sorted list, k the smallest keeping the total under max_chars
    (and at least `least` texts): the length distribution of the corpus, at a bounded cost per pass."""
    ordered = sorted(texts, key=len)
    k = 1
    while len(ordered[::k]) > least and sum(map(len, ordered[::k])) > max_chars:
        k += 1
    return ordered[::k]


def _rate(run: Callable[[list[int]], object], batches: list[list[int]], budget_s: float) -> float:
    """Items/s over whole passes of `batches`, at least one pass and at least budget_s: a run cut off
    mid-corpus would weigh whichever length classes happened to come first."""
    done, t0 = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < budget_s:
        for batch in batches:
            run(batch)
            done += len(batch)
    return done / (time.perf_counter() - t0)


def _engine_limit(engine: Any, texts: list[str], lengths: list[int], sizes: tuple[int, ...], budget_s: float) -> dict:
    def run(batch: list[int]) -> object:
        return engine.predict([texts[i] for i in batch])

    run(list(range(min(8, len(texts)))))
    by_size = {str(n): _rate(run, length_batches(lengths, n, bucketed=True), budget_s) for n in sizes}
    best = max(by_size, key=lambda n: by_size[n])
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    ones = [[i] for i in order[:: max(1, len(order) // 48)]]  # a length-stratified sample, one at a time
    info = engine.describe()
    return {
        "bucketed": {"samples_per_s": by_size[best], "batch_size": int(best)},
        "by_batch_size": by_size,
        "batch_of_one": {"samples_per_s": _rate(run, ones, budget_s)},
        **{k: info.get(k) for k in ("backend", "dtype", "device", "packed", "max_pass_tokens", "onnxruntime")},
    }


def _p_positive(engine: Any, texts: list[str]) -> list[float]:
    return [p.score if p.label == engine.labels[-1] else 1.0 - p.score for p in engine.predict(texts)]


def agreement(ref: list[float], other: list[float]) -> dict[str, Any]:
    """P(positive) of an engine against torch fp32: max and mean abs diff, label agreement, and the
    labels that differ where fp32 was not within 1e-2 of 0.5 (real flips, not coin tosses)."""
    diffs = [abs(a - b) for a, b in zip(ref, other, strict=True)]
    flips = [i for i, (a, b) in enumerate(zip(ref, other, strict=True)) if (a >= 0.5) != (b >= 0.5)]
    return {
        "texts": len(ref),
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "label_agreement": 1 - len(flips) / len(ref),
        "flips_outside_1e-2": sum(1 for i in flips if abs(ref[i] - 0.5) >= 1e-2),
    }


def measure(corpus: str, sizes: tuple[int, ...], budget_s: float, gpu: bool = False) -> dict[str, Any]:
    """model_limit.json: every engine's limit and agreement; the default engine's at the top level."""
    import torch

    from serving.model import load_engine, pick_device, pick_dtype
    from serving.settings import Settings

    base = Settings.from_env()
    device = pick_device(base.device)
    default = engine_name(base.backend, pick_dtype(base.dtype, device, base.backend))
    unique = read_corpus(corpus)
    texts = unique * -(-4 * max(sizes) // len(unique))  # even the largest batch size gets several of each kind
    texts = stratified(texts, MAX_PASS_CHARS, 2 * max(sizes))
    result: dict[str, Any] = {"texts": len(unique), "budget_s": budget_s, "default_engine": default, "engines": {}}
    ref: list[float] | None = None
    for backend, dtype in machine_engines(gpu):
        name = engine_name(backend, dtype)
        try:
            engine = load_engine(base.replace(backend=backend, dtype=dtype))
        except RuntimeError as exc:  # e.g. an engine this device cannot run: reported, not fatal
            result["engines"][name] = {"error": str(exc)}
            continue
        engine.warmup()
        lengths = [len(x) for x in engine.tokenize(texts)]
        result["mean_tokens"] = sum(lengths) / len(lengths)
        row = _engine_limit(engine, texts, lengths, sizes, budget_s)
        p_pos = _p_positive(engine, unique)
        ref = ref if ref is not None else p_pos  # torch fp32 comes first
        row["agreement_with_fp32"] = agreement(ref, p_pos)
        result["engines"][name] = row
        print(
            f"limit {name}: {row['bucketed']['samples_per_s']:.1f}/s bucketed, "
            f"{row['batch_of_one']['samples_per_s']:.1f}/s one at a time",
            flush=True,
        )
        if name == default:
            result.update({k: v for k, v in engine.describe().items() if k not in result})
            result["bucketed"], result["batch_of_one"] = row["bucketed"], row["batch_of_one"]
            classic = load_engine(base.replace(backend=backend, dtype=dtype, packing="off", batch_policy="pad"))
            classic.warmup(calibrate=False)
            best = row["bucketed"]["batch_size"]
            padded = length_batches(lengths, best, bucketed=False)
            rate = _rate(lambda b, e=classic: e.predict([texts[i] for i in b]), padded, budget_s)
            result["random"] = {"samples_per_s": rate, "batch_size": best}
            del classic
        del engine
        gc.collect()
    result["torch_threads"] = torch.get_num_threads()
    result["gpu_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/reviews.txt")
    ap.add_argument("--out", required=True, help="model_limit.json to write")
    ap.add_argument("--sizes", default="8,16,32,64", help="batch sizes of the bucketed limit")
    ap.add_argument("--budget-s", type=float, default=4.0, help="least seconds per measurement")
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args(argv)
    result = measure(a.corpus, tuple(int(n) for n in a.sizes.split(",")), a.budget_s, a.gpu)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
