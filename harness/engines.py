"""In-process speed and agreement of every engine, and packed versus padded passes, on the machine at hand.

    MODEL_ID=stand-in python -m harness.engines --corpus data/reviews.txt --out results/engines-cpu  # ~20 min
    MODEL_ID=stand-in python -m harness.engines --quick --threads 1 --out /tmp/engines  # subset, 1 round: ~6 min
    python -m harness.engines --only packing --takes 20 --rounds 3              # one section
    MODEL_ID=stand-in python -m harness.engines --only auto --out results/auto-cpu  # BACKEND=auto's table: ~2 min

Writes engines.json and engines.md in --out. No HTTP: the model alone, forward only (tokenized once
beforehand), padding, softmax and the copy to the CPU included, at torch's default threads (--threads N:
both torch and onnxruntime at N; 1 is the steadier figure on a machine shared with other work).

engines: torch fp32 / bf16 / int8 (torch.ao dynamic quantization, deprecated; torchao when installed)
ONNX Runtime fp32 / int8 (serving.onnx_runner, spinning on and off) and OpenVINO fp32 / bf16 / int8
(serving.openvino_runner; bf16 where the CPU has it, int8 at bf16 precision there), each over length-sorted
batches of 16 (every text once a round) and batches of one (a length-stratified subset), and the max
and mean abs diff of P(positive) from torch fp32 over the corpus, plus label flips where fp32 is not
within 1e-2 of 0.5. packing: random takes of 32 texts, one pass each, padded to the longest versus
serving.packed (each attention variant), against the one-length limit (the same texts repeated 8 times,
length-sorted, cut into batches of 32: padding efficiency ~0.97, reported), in fp32 and bf16, with max
|dP| of each from the padded pass. auto: what BACKEND=auto measures at a first start (serving.autoselect,
measured afresh, the cache neither read nor written), with the engine it would pick for each server.

Rounds alternate engines (a pass each, in turn) so a busy machine slows them alike; the best round is
reported. oneDNN's primitive cache is left at its default, as the servers leave it (their shapes are
bounded); ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 in the environment measures the cache off.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from harness.references import cpu_info, git_state, read_corpus, versions

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits
T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[engines {time.perf_counter() - T0:6.0f}s] {message}", file=sys.stderr, flush=True)


def padded(ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def torch_run(model: torch.nn.Module) -> Run:
    @torch.inference_mode()
    def run(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=mask).logits.float()

    return run


def build_engines(model: Any, source: Any, cache_dir: Path) -> tuple[dict[str, Run], dict[str, Any]]:
    """Every engine this machine can run, from the one fp32 model; notes say what was skipped and why."""
    engines: dict[str, Run] = {"torch fp32": torch_run(model), "torch bf16": torch_run(copy.deepcopy(model).bfloat16())}
    notes: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation: measured here on purpose
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    engines["torch int8 (torch.ao)"] = torch_run(ao)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tao = copy.deepcopy(model)
        quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        engines["torch int8 (torchao)"] = torch_run(tao)
    except ImportError as exc:
        notes["torchao"] = f"not measured: {exc}"
    from serving.model import weights_key
    from serving.onnx_runner import load_onnx_runner

    key, cpu = weights_key(source, model), torch.device("cpu")  # the servers' key: one cache for both
    for dtype in ("fp32", "int8"):
        progress(f"onnx {dtype}: loading (exports on the first run)")
        t0 = time.perf_counter()
        runner = load_onnx_runner(model, key, dtype, cpu, cache_dir)
        notes[f"onnx {dtype}"] = {**runner.describe(), "load_s": round(time.perf_counter() - t0, 1)}
        engines[f"onnx {dtype}"] = runner
    engines["onnx int8, no spinning"] = load_onnx_runner(model, key, "int8", cpu, cache_dir, spin=False)
    _add_openvino(engines, notes, model, source, key, cache_dir.parent)
    return engines, notes


def _add_openvino(
    engines: dict[str, Run], notes: dict[str, Any], model: Any, source: Any, key: str, root: Path
) -> None:
    """OpenVINO fp32, bf16 (where the CPU has it) and int8, from the same ONNX export (cache root `root`)."""
    try:
        from serving.model import cpu_flags
        from serving.openvino_runner import BF16_FLAGS, load_openvino_runner, require_openvino

        require_openvino("int8")
    except RuntimeError as exc:
        notes["openvino"] = f"not measured: {exc}"
        return
    from transformers import AutoTokenizer

    tokenizer, flags = AutoTokenizer.from_pretrained(source.path), cpu_flags()
    for dtype in ("fp32", "bf16", "int8") if flags & BF16_FLAGS else ("fp32", "int8"):
        progress(f"openvino {dtype}: loading (converts on the first run)")
        t0 = time.perf_counter()
        runner = load_openvino_runner(model, key, dtype, tokenizer, root, flags)
        notes[f"openvino {dtype}"] = {**runner.describe(), "load_s": round(time.perf_counter() - t0, 1)}
        engines[f"openvino {dtype}"] = runner


def one_pass(run: Run, batches: list[list[int]], ids: list[list[int]]) -> tuple[float, dict[int, float]]:
    """Seconds for one pass over batches, and P(last label) per text."""
    p_pos: dict[int, float] = {}
    elapsed = 0.0
    for batch in batches:
        input_ids, mask = padded([ids[i] for i in batch])
        t0 = time.perf_counter()
        probs = run(input_ids, mask).softmax(-1)[:, -1].cpu()
        elapsed += time.perf_counter() - t0
        p_pos.update(zip(batch, probs.tolist(), strict=True))
    return elapsed, p_pos


def agreement(ref: dict[int, float], other: dict[int, float]) -> dict[str, float | int]:
    diffs = [abs(ref[i] - other[i]) for i in ref]
    flips = [i for i in ref if (ref[i] >= 0.5) != (other[i] >= 0.5) and abs(ref[i] - 0.5) >= 1e-2]
    return {"max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs), "flips_outside_1e-2": len(flips)}


def section_engines(args: argparse.Namespace, model: Any, source: Any, ids: list[list[int]]) -> dict[str, Any]:
    engines, notes = build_engines(model, source, args.onnx_cache)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    b16 = [order[i : i + 16] for i in range(0, len(order), 16)]
    b1 = [[i] for i in order[:: max(1, len(order) // args.batch1_texts)]]
    best: dict[str, dict[str, float]] = {name: {"b16": 0.0, "b1": 0.0} for name in engines}
    p_pos: dict[str, dict[int, float]] = {}
    for name, run in engines.items():  # warm: first calls allocate, pick kernels, fill the primitive cache
        progress(f"warming {name}")
        one_pass(run, b16, ids)
        one_pass(run, b1, ids)
    for rnd in range(args.rounds):
        for name, run in engines.items():
            progress(f"round {rnd + 1}: {name}")
            seconds, p_pos[name] = one_pass(run, b16, ids)
            best[name]["b16"] = max(best[name]["b16"], len(ids) / seconds)
            seconds, _ = one_pass(run, b1, ids)
            best[name]["b1"] = max(best[name]["b1"], len(b1) / seconds)
    rows = []
    for name in engines:
        rows.append({"engine": name, "batch16_seq_s": best[name]["b16"], "batch1_seq_s": best[name]["b1"]})
        rows[-1].update(agreement(p_pos["torch fp32"], p_pos[name]))
    return {"texts": len(ids), "batch1_texts": len(b1), "rows": rows, "notes": notes}


def packing_ways(m: Any) -> dict[str, Callable[[list[list[int]]], torch.Tensor]]:
    """Each way to run one take: the padded model first (the reference for dP), then each packed variant."""
    from serving.packed import ATTENTION, packed_forward

    run_padded = torch_run(m)
    ways: dict[str, Callable[[list[list[int]]], torch.Tensor]] = {"padded to longest": lambda x: run_padded(*padded(x))}
    for a in ATTENTION:
        ways[f"packed, {a}"] = lambda x, a=a: packed_forward(m, x, attention=a)
    ways["packed, loop, last layer over every token"] = lambda x: packed_forward(m, x, "loop", first_token_only=False)
    return ways


def section_packing(args: argparse.Namespace, model: Any, ids: list[list[int]]) -> dict[str, Any]:
    rng = random.Random(0)
    takes = [rng.sample(range(len(ids)), 32) for _ in range(args.takes)]
    # The one-length limit: the takes' texts, repeated 8 times and length-sorted, so that a batch of 32
    # holds (nearly) one length, as perfect bucketing of a long stream would. Every 2nd batch (its
    # neighbour holds the same texts) keeps the cost at 4 batches per take; shuffled, then 4 run after
    # each take, so a load that changes during the run weighs on both alike.
    union = sorted((i for take in takes for i in take for _ in range(8)), key=lambda i: len(ids[i]))
    limit = [union[i : i + 32] for i in range(0, len(union), 64)]
    rng.shuffle(limit)
    real = sum(len(ids[i]) for b in limit for i in b)
    computed = sum(len(b) * max(len(ids[i]) for i in b) for b in limit)
    out: dict[str, Any] = {"takes": len(takes), "texts_per_take": 32, "limit_padding_efficiency": real / computed}
    for dtype, m in (("fp32", model), ("bf16", copy.deepcopy(model).bfloat16())):
        ways, run_limit = packing_ways(m), torch_run(m)
        best = dict.fromkeys([*ways, "one-length limit"], 0.0)
        dp = dict.fromkeys(ways, 0.0)
        for rnd in range(args.rounds + 1):  # round 0 warms up (kernels, oneDNN primitives per shape)
            progress(f"packing {dtype}, round {rnd}{' (warm-up)' if rnd == 0 else ''}")
            spent = dict.fromkeys(best, 0.0)
            for t, take in enumerate(takes[:1] if rnd == 0 and args.quick else takes):
                ref = None
                for name, way in ways.items():
                    t0 = time.perf_counter()
                    probs = way([ids[i] for i in take]).softmax(-1)
                    spent[name] += time.perf_counter() - t0
                    ref = probs if ref is None else ref
                    dp[name] = max(dp[name], float((probs - ref).abs().max()))
                for batch in limit[4 * t : 4 * t + 4]:
                    t0 = time.perf_counter()
                    run_limit(*padded([ids[i] for i in batch])).softmax(-1)
                    spent["one-length limit"] += time.perf_counter() - t0
            if rnd:
                done = {k: 32 * len(takes) for k in ways} | {"one-length limit": sum(len(b) for b in limit)}
                best = {k: max(best[k], done[k] / spent[k]) for k in best}
        top = best["one-length limit"]
        out[dtype] = [
            {"way": k, "seq_s": v, "of_limit": v / top, "max_dP_vs_padded": dp.get(k)} for k, v in best.items()
        ]
    return out


def section_auto() -> dict[str, Any]:
    """BACKEND=auto's own measurement (serving.autoselect.calibrate), as served: through load_engine."""
    from serving import autoselect
    from serving.model import cache_dir, cpu_flags, load_concrete, pick_device, resolve_source
    from serving.settings import Settings

    settings = Settings.from_env().replace(backend="auto")
    source = resolve_source(settings)
    machine = autoselect.Machine(pick_device(settings.device).type, cpu_flags(), "", cache_dir() / "auto")
    options = autoselect.candidates(machine, settings.dtype)
    timings = autoselect.calibrate(settings, options, lambda s: load_concrete(s, source), autoselect.measure)
    picks = {autoselect.SHAPES[k]: autoselect.pick(timings, k, cached=False) for k in autoselect.SHAPES}
    rows = []
    for t in timings:
        chosen = [shape for shape, c in picks.items() if (c.backend, c.dtype) == (t.backend, t.dtype)]
        rows.append({**asdict(t), "picked_for": chosen})
    return {"dtype": settings.dtype, "agreement": autoselect.AGREEMENT, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Engines, in-process ({result['model_source']}, {result['cpu']['model_name']}, {result['threads']} threads)"
    ]
    lines += ["", f"`{result['command']}`", ""]
    if "engines" in result:
        e = result["engines"]
        lines += [f"## Engines ({e['texts']} texts; batches of one: {e['batch1_texts']} of them)", ""]
        lines += ["| engine | batch 16, seq/s | batch 1, seq/s | max abs dP vs torch fp32 | mean | flips |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for r in e["rows"]:
            lines.append(
                f"| {r['engine']} | {r['batch16_seq_s']:.1f} | {r['batch1_seq_s']:.1f} | {r['max_abs_diff']:.2g} "
                f"| {r['mean_abs_diff']:.2g} | {r['flips_outside_1e-2']} |"
            )
    if "packing" in result:
        p = result["packing"]
        lines += ["", f"## Packed passes ({p['takes']} random takes of {p['texts_per_take']} texts)", ""]
        lines += [f"One-length limit: padding efficiency {p['limit_padding_efficiency']:.3f}.", ""]
        lines += ["| dtype | way | seq/s | of one-length limit | max abs dP vs padded |", "|---|---|---:|---:|---:|"]
        for dtype in ("fp32", "bf16"):
            for r in p.get(dtype, []):
                dp = "" if r["max_dP_vs_padded"] is None else f"{r['max_dP_vs_padded']:.2g}"
                lines.append(f"| {dtype} | {r['way']} | {r['seq_s']:.1f} | {r['of_limit']:.2f} | {dp} |")
    if "auto" in result:
        a = result["auto"]
        lines += ["", f"## BACKEND=auto (DTYPE={a['dtype']}; kept: max abs dP <= {a['agreement']:g})", ""]
        lines += ["| engine | batch of one, median ms | full passes, texts/s | max abs dP | load + warm-up s "]
        lines[-1] += "| picked for | dropped because |"
        lines += ["|---|---:|---:|---:|---:|---|---|"]
        for r in a["rows"]:
            lines.append(
                f"| {r['backend']} {r['dtype']} | {r['one_ms']:.2f} | {r['pass_texts_s']:.1f} | {r['max_dp']:.2g} "
                f"| {r['load_s']:.1f} | {', '.join(r['picked_for'])} | {r['error'] or ''} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/reviews.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=("engines", "packing", "auto"))
    ap.add_argument("--rounds", type=int, help="timed rounds, the best reported (default 2)")
    ap.add_argument("--takes", type=int, help="packing: random takes of 32 texts (default 12)")
    ap.add_argument("--batch1-texts", type=int, help="engines: texts run one at a time (default 64)")
    ap.add_argument("--texts", type=int, help="a length-stratified subset of the corpus (default 0: all)")
    ap.add_argument("--onnx-cache", type=Path, help="default: the servers' own (SENTIMENTALYZER_CACHE/onnx)")
    ap.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="defaults --texts 96 --rounds 1 --takes 4 --batch1-texts 24")
    args = ap.parse_args(argv)
    defaults = {"texts": 96, "rounds": 1, "takes": 4, "batch1_texts": 24} if args.quick else {}
    for name, value in {"texts": 0, "rounds": 2, "takes": 12, "batch1_texts": 64, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)  # onnx_runner's sessions take torch.get_num_threads() too
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serving.model import cache_dir, resolve_source
    from serving.settings import Settings

    args.onnx_cache = args.onnx_cache or cache_dir() / "onnx"
    source = resolve_source(Settings.from_env())
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    texts = read_corpus(args.corpus)
    ids = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    if args.texts:
        ids = sorted(ids, key=len)[:: max(1, len(ids) // args.texts)][: args.texts]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "harness.engines", *(sys.argv[1:] if argv is None else argv)]),
        "corpus": args.corpus,
        "model_source": source.kind,
        "model_path": source.path,
        "threads": torch.get_num_threads(),
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"),
        "cpu": cpu_info(),
        "versions": versions(
            "torch", "transformers", "onnxruntime", "onnx", "onnxscript", "torchao", "openvino", "nncf"
        ),
        **git_state(),
    }
    if args.only in (None, "engines"):
        result["engines"] = section_engines(args, model, source, ids)
    if args.only in (None, "packing"):
        result["packing"] = section_packing(args, model, ids)
    if args.only in (None, "auto"):
        result["auto"] = section_auto()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "engines.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
