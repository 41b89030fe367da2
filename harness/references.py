"""What every figure of a bench run is measured against: the HTTP ceiling, the model limit, the machine.

    uvicorn harness.bench:ceiling_app --port 8009               # the no-model endpoint
    python -m harness.limits --out /tmp/limit.json                       # the model limit alone

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
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the packages whose versions environment.json records (the gRPC client's too: the protocol rows use it)
VERSIONED = (
    *("torch", "transformers", "onnxruntime", "onnx", "fastapi", "uvicorn", "locust"),
    *("grpcio", "protobuf", "tritonclient"),
)


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

    # dirty means the code differs from the commit: a run writing its own results/ does not count
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", ".", ":!results")),
    }


# the settings a run's numbers depend on, when taken from the environment (CACHE_BYTES: the answer cache)
RECORDED_ENV = (
    "MODEL_ID",
    "DEVICE",
    "BACKEND",
    "DTYPE",
    "PACKING",
    "MAX_WAIT_MS",
    "MAX_BATCH_SIZE",
    "BATCH_POLICY",
    "CACHE_BYTES",
)


def environment(run: dict[str, Any], limit: dict[str, Any] | None, servers: dict[str, Any]) -> dict[str, Any]:
    """environment.json: run (profile, corpus, settings) plus device, model, versions, git, date, command."""
    model_ready = next((r for n, r in servers.items() if n.startswith(("batched", "naive")) and "error" not in r), {})
    batched_ready = next((r for n, r in servers.items() if n.startswith("batched") and "error" not in r), {})

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        **run,
        "device": model_ready.get("device"),
        "gpu_name": (limit or {}).get("gpu_name"),
        "backend": model_ready.get("backend"),
        "dtype": model_ready.get("dtype"),
        "packed": model_ready.get("packed"),
        "model_id": model_ready.get("model_id"),
        "model_source": model_ready.get("model_source"),
        "batching": batched_ready.get("batching"),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "versions": versions(*VERSIONED),
        **git_state(),
        "env": {k: v for k, v in os.environ.items() if k in RECORDED_ENV},
        "model_limit": limit,
        "servers": servers,
    }


def command_line() -> str:
    """The command as the user typed it: `python -m harness.bench ...`, not the module's file path
    (which names the checkout it ran in)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])
