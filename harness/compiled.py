"""torch.compile (inductor, CPU, freezing) of the torch fp32 engine's forward, against eager, in-process.

    MODEL_ID=stand-in python -m harness.compiled --out results/cpu-avx2-compile      # ~4 min on 2 cores
    MODEL_ID=stand-in python -m harness.compiled --only padded --rounds 1 --out /tmp/compile

Two candidates, each the torch fp32 CPU engine of serving.model.load_engine, run pass by pass as
Engine.predict_ids plans them, eager and compiled on one engine object (the compiled form swapped in)
so both get the same plan: packed, the batched server's pass (serving/packed.py as served, filler and
per-pass attention choice included) with serving.packed._layer, one block over a pack, compiled with
dynamic=True; padded (PACKING=off, length groups on LENGTH_LADDER), the HF model compiled with
dynamic=None (a shape that changes recompiles once as dynamic). Inductor with freezing (weights folded;
grad off, as the engine's inference_mode has it) in a fresh cache (TORCHINDUCTOR_CACHE_DIR in a temporary
folder unless --warm-cache): the compile a first start pays. Shapes: --passes passes of --size short
texts (data/short.txt), of mixed ones (data/reviews.txt), and single texts (length-stratified), so the
recompiles of the length variety show; per shape the compiled first pass (the compile), graphs compiled
and max |dP(positive)| against eager, then rounds alternating eager and compiled per shape (order flipped
each round, so drift falls on both), median seq/s. A compile that fails is a recorded result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness.limits import _rate
from harness.references import command_line, cpu_info, git_state, read_corpus, versions

Batch = list[list[int]]
T0 = time.perf_counter()
KEEP_RATIO, KEEP_COMPILE_S = 1.05, 60.0  # the bar item 5 of issue 24 sets: >5% faster, compiled within a minute


def progress(message: str) -> None:
    print(f"[compiled {time.perf_counter() - T0:5.0f}s] {message}", file=sys.stderr, flush=True)


def workloads(tokenize: Callable[[list[str]], Batch], args: argparse.Namespace) -> dict[str, list[Batch]]:
    """The passes each shape runs: --passes batches of --size texts, and --ones single texts."""
    rng = random.Random(0)
    out: dict[str, list[Batch]] = {}
    for name, path in (("short", args.short), ("mixed", args.mixed)):
        ids = tokenize(read_corpus(path))
        rng.shuffle(ids)
        out[f"{name} x{args.size}"] = [ids[i * args.size : (i + 1) * args.size] for i in range(args.passes)]
    mixed = sorted(tokenize(read_corpus(args.mixed)), key=len)
    out["one (mixed)"] = [[x] for x in mixed[:: max(1, len(mixed) // args.ones)][: args.ones]]
    return out


def p_positive(engine: Any, batch: Batch) -> torch.Tensor:
    """P(last label) per text of one batch, through the passes the engine plans for it."""
    out = torch.empty(len(batch))
    for group in engine.plan([len(x) for x in batch]):
        probs, _ = engine.forward([batch[i] for i in group])
        out[group] = probs[:, -1]
    return out


@contextlib.contextmanager
def swapped(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """obj.attr = value for the block: eager and compiled then share one engine, and so one plan."""
    old = vars(obj)[attr] if attr in vars(obj) else getattr(obj, attr)  # a classmethod as it was
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


Candidate = tuple[Any, Callable[[], Any], Callable[[Any], contextlib.AbstractContextManager]]


@contextlib.contextmanager
def packed_on(layer: Any) -> Iterator[None]:
    import serving.packed as p

    with swapped(p, "_layer", layer), eager_per_text():
        yield


def candidates(settings: Any, backend: str, only: list[str]) -> dict[str, Candidate]:
    """name -> (engine, build, on): build() makes the compiled form, on(compiled) swaps it in."""
    import serving.packed
    from serving.engine import TorchRunner
    from serving.model import load_engine

    out: dict[str, Candidate] = {}
    if "packed" in only:
        engine = load_engine(settings)
        assert engine.packed is not None, "the packed candidate needs PACKING on and a DistilBERT"
        engine.warmup(calibrate=False)  # 16 texts fit the uncalibrated budget: the same single pass
        layer = serving.packed._layer
        out["packed"] = (engine, lambda: torch.compile(layer, backend=backend, dynamic=True), packed_on)
    if "padded" in only:
        engine = load_engine(settings.replace(packing="off"))
        engine.warmup()  # fits the cost model that splits a pass into length groups

        def build(e: Any = engine) -> Any:
            model: Any = torch.compile(e.model, backend=backend, dynamic=None)  # a Module in all but type
            return TorchRunner(model, e.device)

        def on(runner: Any, e: Any = engine) -> contextlib.AbstractContextManager:
            return swapped(e, "runner", runner)

        out["padded"] = (engine, build, on)
    return out


@contextlib.contextmanager
def eager_per_text() -> Iterator[None]:
    """Attention and Segments.of run eager inside a compiled _layer: they read per-text offsets as
    Python ints (tolist, int()), which dynamo would specialize on, recompiling for every new length mix
    (the first try ran past 5 minutes of compiling); the linears, norms and FFN around them compile."""
    import serving.packed as p

    attend = {k: torch._dynamo.disable(f) for k, f in p._ATTEND.items()}
    of: Any = classmethod(torch._dynamo.disable(p.Segments.of.__func__))  # type: ignore[attr-defined]
    with swapped(p, "_ATTEND", attend), swapped(p.Segments, "of", of):
        yield


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def first_passes(run: Callable[[Batch], torch.Tensor], batches: list[Batch]) -> tuple[float, float, torch.Tensor]:
    """Seconds of the first pass, of all passes once, and P(positive) of every text (in order)."""
    t0 = time.perf_counter()
    probs = [run(batches[0])]
    first = time.perf_counter() - t0
    probs += [run(b) for b in batches[1:]]
    return first, time.perf_counter() - t0, torch.cat(probs)


def compile_shapes(
    run: Callable[[Batch], torch.Tensor], on: Callable[[], Any], shapes: dict[str, list[Batch]]
) -> dict[str, dict[str, Any]]:
    """Eager first passes of every shape, then the compiled ones (`on()` swaps the compiled form in):
    the first compiled pass pays the compile, the others any recompile the length variety makes."""
    ref = {s: first_passes(run, bs)[2] for s, bs in shapes.items()}
    rows = {}
    for s, bs in shapes.items():
        g0 = graphs()
        with on(), torch.no_grad():
            first, every, probs = first_passes(run, bs)
        dp = (probs - ref[s]).abs().max().item()
        progress(f"{s}: first compiled pass {first:.1f} s, all {every:.1f} s, {graphs() - g0} graphs")
        rows[s] = {
            "compiled_first_pass_s": first,
            "compiled_passes_s": every,
            "graphs": graphs() - g0,
            "max_abs_dp": dp,
        }
    return rows


def alternate(
    run: Callable[[Batch], torch.Tensor], on: Callable[[], Any], shapes: dict[str, list[Batch]], rows: dict, args: Any
) -> None:
    """Rounds of eager and compiled side by side per shape, order flipped each round; the medians."""
    for row in rows.values():
        row["eager_rates"], row["compiled_rates"] = [], []
    for rnd in range(args.rounds):
        for s, bs in shapes.items():
            for mode in ("eager", "compiled")[:: 1 if rnd % 2 == 0 else -1]:
                with on() if mode == "compiled" else contextlib.nullcontext(), torch.no_grad():
                    rows[s][f"{mode}_rates"].append(_rate(run, bs, args.budget_s))  # type: ignore[arg-type]
    for row in rows.values():
        row["eager_seq_s"] = statistics.median(row["eager_rates"])
        row["compiled_seq_s"] = statistics.median(row["compiled_rates"])
        row["ratio"] = row["compiled_seq_s"] / row["eager_seq_s"]
        # the best rounds too: a round just after a compile can be slowed for both (rates in the json)
        row["best_ratio"] = max(row["compiled_rates"]) / max(row["eager_rates"])


def measure_candidate(
    engine: Any, build: Callable[[], Any], on: Callable[[Any], Any], shapes: dict[str, list[Batch]], args: Any
) -> dict[str, Any]:
    """One candidate: its compile over every shape (timed), then alternating rounds against eager."""

    def run(b: Batch) -> torch.Tensor:
        return p_positive(engine, b)

    try:
        compiled = build()
        rows = compile_shapes(run, lambda: on(compiled), shapes)
    except Exception as exc:  # a compile that fails (no C++ compiler, an unsupported op) is a result
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], "rows": {}, "info": engine.describe()}
    compile_s = sum(r["compiled_passes_s"] for r in rows.values())
    alternate(run, lambda: on(compiled), shapes, rows, args)
    return {"compile_s": compile_s, "rows": rows, "info": engine.describe()}


def verdict(result: dict[str, Any]) -> str:
    """Keep a candidate only if some shape is >5% faster compiled and its compile took under a minute."""
    if "error" in result:
        return "not kept: the compile failed"
    best = max(result["rows"], key=lambda s: result["rows"][s]["ratio"])
    ratio, compile_s = result["rows"][best]["ratio"], result["compile_s"]
    if ratio > KEEP_RATIO and compile_s < KEEP_COMPILE_S:
        return f"keep: {ratio:.2f}x eager at {best}, compiled in {compile_s:.0f} s"
    why = [f"best {ratio:.2f}x eager ({best})"] + (
        [f"compile {compile_s:.0f} s"] if compile_s >= KEEP_COMPILE_S else []
    )
    return "not kept: " + ", ".join(why)


def report(result: dict[str, Any]) -> str:
    """compile.md: one row per candidate and shape, and each candidate's verdict."""
    m, cpu = result["meta"], result["meta"]["cpu"]
    lines = [
        "# torch.compile (inductor, CPU, freezing) against eager, torch fp32",
        "",
        f"`{m['command']}`: model {m['model_id']}, {m['torch_threads']} torch threads, torch {m['versions']['torch']}, "
        f"backend {m['backend']}, freezing {m['freezing']}, inductor cache {m['inductor_cache']}, "
        f"{m['rounds']} rounds of {m['budget_s']} s a measurement, commit {m['git_commit']}"
        f"{' (dirty)' if m['git_dirty'] else ''}.",
        f"CPU: {cpu['model_name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}; C++ compiler: {m['cxx']}.",
        "",
        "| candidate | shape | eager seq/s | compiled seq/s | compiled / eager | compiled first pass s "
        "| graphs compiled | max abs dP | best round / best round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in result["candidates"].items():
        for shape, r in c["rows"].items():
            if "ratio" not in r:
                continue
            lines.append(
                f"| {name} | {shape} | {r['eager_seq_s']:.1f} | {r['compiled_seq_s']:.1f} | {r['ratio']:.2f}x "
                f"| {r['compiled_first_pass_s']:.1f} | {r['graphs']} | {r['max_abs_dp']:.1e} | {r['best_ratio']:.2f}x |"
            )
    lines.append("")
    for name, c in result["candidates"].items():
        took = f"compile (first passes of every shape) {c['compile_s']:.1f} s; " if "compile_s" in c else ""
        error = f" ({c['error'].splitlines()[0]})" if "error" in c else ""
        lines.append(f"- {name}: {took}{verdict(c)}{error}")
    return "\n".join(lines) + "\n"


def compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return "none found (inductor's CPU backend needs one)"
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else cxx


def measure(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    """compile.json's content: every candidate's rows, and what the figures depend on."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = args.freezing
    torch._dynamo.config.recompile_limit = 64  # count the recompiles rather than fall back to eager at 8
    found = candidates(settings, args.backend, args.only.split(","))
    shapes = workloads(next(iter(found.values()))[0].tokenize, args)
    result: dict[str, Any] = {"candidates": {}}
    for name, (engine, build, on) in found.items():
        progress(f"{name}: compiling over every shape")
        result["candidates"][name] = measure_candidate(engine, build, on, shapes, args)
        print(f"{name}: {verdict(result['candidates'][name])}", flush=True)
    result["meta"] = {
        "command": command_line(),
        "model_id": settings.model_id,
        "backend": args.backend,
        "freezing": args.freezing,
        "inductor_cache": "warm (default)" if args.warm_cache else "fresh",
        "rounds": args.rounds,
        "budget_s": args.budget_s,
        "shapes": {s: [len(b) for b in bs] for s, bs in shapes.items()},
        "torch_threads": torch.get_num_threads(),
        "cxx": compiler(),
        "cpu": cpu_info(),
        "versions": versions("torch", "transformers"),
        **git_state(),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    from serving.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="packed,padded", help="candidates: packed, padded")
    ap.add_argument("--short", default="data/short.txt")
    ap.add_argument("--mixed", default="data/reviews.txt")
    ap.add_argument("--size", type=int, default=16, help="texts a pass (32 users settle at ~16)")
    ap.add_argument("--passes", type=int, default=3, help="distinct passes a shape")
    ap.add_argument("--ones", type=int, default=8, help="single texts of the batch-of-one shape")
    ap.add_argument("--rounds", type=int, default=3, help="the median of 3 drops one disturbed round")
    ap.add_argument("--budget-s", type=float, default=1.5, help="least seconds a measurement")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo alone, for tests)")
    ap.add_argument("--no-freezing", dest="freezing", action="store_false")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's default cache folder")
    args = ap.parse_args(argv)
    settings = Settings.from_env().replace(backend="torch", dtype="fp32", device="cpu")
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = measure(settings, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "compile.md").write_text(report(result), encoding="utf-8")
    print(report(result))


if __name__ == "__main__":
    main()
