"""What every figure of a bench run is measured against: the HTTP ceiling, the model limit, the machine.

    uvicorn harness.bench:ceiling_app --port 8009               # the no-model endpoint
    python -m harness.bench --quick --model-limit-json /tmp/limit.json   # the model limit alone

The HTTP ceiling is POST /predict on the servers' own FastAPI stack (middleware, validation, response
model) with a constant answer: what one uvicorn process serves when the model costs nothing. The
model limit is tokenize + forward in-process, no HTTP, at the best batch size, in two forms: batches
cut from the length-sorted corpus (each one length class, what perfect length bucketing reaches) and
batches of random texts padded to their longest. `environment()` is what environment.json records.
"""

from __future__ import annotations

import os
import platform
import random
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def read_corpus(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


# ------------------------------------------------------------------------------ the HTTP ceiling app


def create_ceiling_app() -> Any:
    """The servers' own app factory (middleware, validation, routes, response model), no model behind it."""
    from serving.model import Prediction
    from serving.service import create_app
    from serving.settings import Settings

    class CeilingService:
        async def start(self) -> None:
            return None

        def ready(self) -> bool:
            return True

        def describe(self) -> dict[str, object]:
            return {"model_id": None, "model_source": "none", "device": "none"}

        async def predict(self, request: Any, texts: list[str]) -> list[Prediction]:
            return [Prediction("POSITIVE", 1.0) for _ in texts]

        async def stop(self) -> None:
            return None

    return create_app("ceiling", lambda _settings, _obs: CeilingService(), Settings.from_env())


# ---------------------------------------------------------------------------------- the model limit


def length_batches(lengths: list[int], size: int, bucketed: bool, seed: int = 0) -> list[list[int]]:
    """Index batches in random order: cut from the length-sorted corpus (each batch one length class,
    what perfect bucketing reaches) or from a shuffled one (each batch padded to its longest)."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if not bucketed:
        rng.shuffle(order)
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)  # a run cut short by its time budget then samples every length class alike
    return batches


def measure_model_limit(corpus: str, batch_sizes: tuple[int, ...], budget_s: float) -> dict[str, Any]:
    """Samples/s of tokenize + forward, in-process, per batch size, length-bucketed and random-padded,
    each over whole passes of the corpus for at least budget_s."""
    import torch

    from serving.model import load_engine
    from serving.settings import Settings

    engine = load_engine(Settings.from_env())  # plain tokenizer + model below: no server code on the path
    unique = read_corpus(corpus)
    # repeat a small corpus so even the largest batch size gets several batches of each kind
    texts = unique * -(-4 * max(batch_sizes) // len(unique))
    tok, dev = engine.tokenizer, engine.device
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=512)["input_ids"]]

    @torch.inference_mode()
    def run(batch: list[int]) -> None:
        enc = tok([texts[i] for i in batch], padding=True, truncation=True, max_length=512, return_tensors="pt")
        logits = engine.model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        logits.float().softmax(-1).cpu()  # what a server does with them; on CUDA this also waits for the GPU

    run(list(range(min(8, len(texts)))))  # first call allocates and picks kernels
    result: dict[str, Any] = {
        "texts": len(unique),
        "mean_tokens": sum(lengths) / len(lengths),
        "budget_s": budget_s,
        "by_batch_size": {},
        **engine.describe(),
    }
    for size in batch_sizes:
        for mode in ("bucketed", "random"):
            batches, done, t0 = length_batches(lengths, size, mode == "bucketed"), 0, time.perf_counter()
            # whole passes over the corpus, at least one: a run cut off mid-corpus would weigh
            # whichever length classes happened to come first
            while done == 0 or time.perf_counter() - t0 < budget_s:
                for batch in batches:
                    run(batch)
                    done += len(batch)
            result["by_batch_size"].setdefault(str(size), {})[mode] = done / (time.perf_counter() - t0)
    for mode in ("bucketed", "random"):
        best = max(result["by_batch_size"], key=lambda s: result["by_batch_size"][s][mode])
        result[mode] = {"samples_per_s": result["by_batch_size"][best][mode], "batch_size": int(best)}
    result["torch_threads"] = torch.get_num_threads()
    result["gpu_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return result


def measure_agreement(corpus: str, dtype: str) -> dict[str, Any]:
    """How far `dtype` moves the scores from fp32 on the corpus: P(positive) max and mean abs diff,
    label agreement, and labels that differ where fp32 was not within 1e-2 of 0.5 (real flips)."""
    from serving.model import load_engine
    from serving.settings import Settings

    texts = read_corpus(corpus)
    base = Settings.from_env().replace(device="cpu")
    p_pos = {}
    for name in ("fp32", dtype):
        engine = load_engine(base.replace(dtype=name))
        p_pos[name] = [p.score if p.label == engine.labels[-1] else 1.0 - p.score for p in engine.predict(texts)]
    ref, other = p_pos["fp32"], p_pos[dtype]
    diffs = [abs(a - b) for a, b in zip(ref, other, strict=True)]
    flips = [i for i, (a, b) in enumerate(zip(ref, other, strict=True)) if (a >= 0.5) != (b >= 0.5)]
    return {
        "dtype": dtype,
        "texts": len(texts),
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "label_agreement": 1 - len(flips) / len(texts),
        "flips_outside_1e-2": sum(1 for i in flips if abs(ref[i] - 0.5) >= 1e-2),
    }


# ------------------------------------------------------------------------------------- the machine


def cpu_info() -> dict[str, Any]:
    """CPU model and the flags that decide which fast paths torch has (AVX2, AVX-512, AMX...)."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "model_name": None, "flags": []}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for key, _, value in (line.partition(":") for line in lines):
        if key.strip() == "model name" and info["model_name"] is None:
            info["model_name"] = value.strip()
        elif key.strip() == "flags" and not info["flags"]:
            info["flags"] = sorted(f for f in value.split() if f.startswith(("avx", "fma", "f16c", "amx")))
    return info


def versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict[str, Any]:
    """The commit a result was measured at, and whether the tree had changes."""

    def git(*args: str) -> str | None:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}


def environment(run: dict[str, Any], limit: dict[str, Any] | None, servers: dict[str, Any]) -> dict[str, Any]:
    """environment.json: run (profile, corpus, settings) plus device, model, versions, git, date, command."""
    model_ready = next((r for n, r in servers.items() if n.startswith(("batched", "naive")) and "error" not in r), {})
    batched_ready = next((r for n, r in servers.items() if n.startswith("batched") and "error" not in r), {})

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        **run,
        "device": model_ready.get("device"),
        "gpu_name": (limit or {}).get("gpu_name"),
        "dtype": model_ready.get("dtype"),
        "model_id": model_ready.get("model_id"),
        "model_source": model_ready.get("model_source"),
        "batching": batched_ready.get("batching"),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "versions": versions("torch", "transformers", "fastapi", "uvicorn", "locust", "litserve"),
        **git_state(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k in ("MODEL_ID", "DEVICE", "DTYPE", "MAX_WAIT_MS", "MAX_BATCH_SIZE", "BATCH_POLICY")
        },
        "model_limit": limit,
        "servers": servers,
    }
