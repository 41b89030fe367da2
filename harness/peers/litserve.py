"""LitServe serving the same model: a peer row of `python -m harness.bench --peers`, not part of the product.

    python -m harness.peers.envs build litserve        # .peers/litserve/ (litserve)
    .peers/litserve/bin/python -m harness.peers.litserve --port 8002
    # POST /predict {"text": ...} -> {"label", "score"}; GET /health

Same model, device and dtype as the servers (harness/peers/engine.py: serving.model.load_engine reads
the same environment variables), LitServe's own dynamic batching at max batch 64 and 10 ms, and the
batch function a LitServe user would write: one forward pass per batch, padded to its longest text.
"""

# No `from __future__ import annotations` here: LitServe builds its request model from decode_request's
# annotations, and as strings they would make it read the body as a query parameter.
import argparse
from typing import Any

import litserve as ls

from harness.peers.engine import classify, load
from serving.settings import Settings

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.010


class SentimentAPI(ls.LitAPI):
    def setup(self, device: str) -> None:  # LitServe's device is ignored: DEVICE decides, as for the servers
        self.engine = load()

    def decode_request(self, request: dict[str, Any]) -> str:
        return request["text"]

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": label, "score": score} for label, score in classify(self.engine, texts)]

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    api = SentimentAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
    accelerator = "cuda" if Settings.from_env().device.startswith("cuda") else "auto"
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=1)
    server.run(host=a.host, port=a.port, generate_client_file=False)  # no client.py written into the repo


if __name__ == "__main__":
    main()
