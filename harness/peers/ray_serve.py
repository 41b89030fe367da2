"""Ray Serve with `@serve.batch` serving the same model: a peer row of `python -m harness.bench --peers`.

    python -m harness.peers.envs build ray-serve       # .peers/ray-serve/ (ray[serve])
    .peers/ray-serve/bin/python -m harness.peers.ray_serve --port 8004
    # POST /predict {"text": ...} -> {"label", "score"}; GET /health once the replica has loaded the model

Starts a local Ray of its own (dashboard off, every address on 127.0.0.1), one replica of the deployment
below, and Serve's HTTP proxy on --port; Ctrl+C (SIGINT) or SIGTERM shuts Serve and Ray down. Batching
is Ray's own: `@serve.batch` with max_batch_size 64 and its default batch_wait_timeout_s (10 ms), and
max_ongoing_requests raised to the batch size, as Ray's batching guide says (at its default of 5 a
replica would never see more than 5 requests to batch). The replica asks for every CPU, so Ray sizes
torch's threads (OMP_NUM_THREADS) to the machine as the project's servers do.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

# Read when ray is imported: a single-node Ray then takes 127.0.0.1 as its node address, so its processes
# talk over loopback rather than the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch
from ray import serve
from starlette.requests import Request

from harness.peers.engine import classify, load
from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH_SIZE = 64
BATCH_WAIT_TIMEOUT_S = 0.01  # serve.batch's default
CPUS = os.cpu_count() or 1
# Ray hides the GPUs from an actor that does not ask for one (CUDA_VISIBLE_DEVICES=""): ask where the
# servers would use it, so DEVICE means the same here
GPUS = 1 if torch.cuda.is_available() and Settings.from_env().device != "cpu" else 0


@serve.deployment(
    num_replicas=1, max_ongoing_requests=MAX_BATCH_SIZE, ray_actor_options={"num_cpus": CPUS, "num_gpus": GPUS}
)
class Sentiment:
    def __init__(self) -> None:
        self.engine = load()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": label, "score": score} for label, score in classify(self.engine, texts)]

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.url.path.rstrip("/").endswith("/health"):
            return {"status": "ok"}
        body = await request.json()
        return await self.predict(body["text"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8004)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    # Ray's workers start from the raylet's environment: the repository root on their path, so the
    # deployment (pickled from __main__) finds serving/ and harness/ there; MODEL_ID, DTYPE... ride along
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=CPUS, num_gpus=GPUS, include_dashboard=False)
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(Sentiment.bind(), name="sentiment", route_prefix="/", blocking=False)
        print(f"ray-serve: serving on http://{a.host}:{a.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
