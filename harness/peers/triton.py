"""NVIDIA Triton's dynamic batcher through PyTriton: a peer row of `python -m harness.bench --peers`.

    python -m harness.peers.envs build triton          # .peers/triton/ (nvidia-pytriton ships tritonserver)
    .peers/triton/bin/python -m harness.peers.triton --port 8003
    curl -s 127.0.0.1:8003/v2/models/sentiment/infer \\
      -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["I loved it"]}]}'
    # -> {"outputs": [{"name": "label", "datatype": "BYTES", "data": ["POSITIVE"]}, {"name": "score", ...}]}

It speaks the KServe v2 protocol (locustfile.py --protocol kserve drives it). tritonserver queues the
requests, its dynamic batcher forms batches of up to 64 and the Python function below, in this process,
runs each one: the batch function a PyTriton user writes, one forward pass padded to its longest text.
GRPC and metrics are off, so it binds one HTTP port on 127.0.0.1. Ctrl+C (SIGINT) stops tritonserver.
"""

from __future__ import annotations

import argparse
import logging
import os
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from harness.peers.engine import classify, load

MODEL_NAME = "sentiment"
MAX_BATCH_SIZE = 64
# Triton's default delay is 0 and its guide says to raise it only if batches stay small; 2 ms is the
# project's MAX_WAIT_MS, so both batchers wait the same for companions.
MAX_QUEUE_DELAY_US = 2000


def libpython_path() -> None:
    """The Python backend's stub links libpython3.11; with this interpreter's LIBDIR first it finds the
    library of the Python running this module, not the system's (a mismatch fails model loading with
    `'_thread.RLock' object has no attribute '_recursion_count'`). tritonserver and the stub inherit it."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8003)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    libpython_path()
    engine = load()

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        # text: (n, 1) array of UTF-8 bytes, one request a row
        preds = classify(engine, [row[0].decode("utf-8") for row in text])
        return {
            "label": np.array([[label.encode()] for label, _ in preds], dtype=np.object_),
            "score": np.array([[score] for _, score in preds], dtype=np.float32),
        }

    config = TritonConfig(
        http_address=a.host, http_port=a.port, allow_grpc=False, allow_metrics=False, exit_on_error=True
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="label", dtype=bytes, shape=(1,)), Tensor(name="score", dtype=np.float32, shape=(1,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(max_queue_delay_microseconds=MAX_QUEUE_DELAY_US)
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
