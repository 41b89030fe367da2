"""BentoML with adaptive batching serving the same model: a peer row of `python -m harness.bench --peers`.

    python -m harness.peers.envs build bentoml         # .peers/bentoml/ (bentoml)
    .peers/bentoml/bin/python -m harness.peers.bentoml_peer --port 8005
    # POST /classify {"texts": ["I loved it"]} -> [{"label", "score"}]; GET /readyz once the model is loaded

`main` hands over to `bentoml serve harness.peers.bentoml_peer:Sentiment`, the way BentoML runs a
service: one worker process (workers=1), the service's own HTTP server on --port. `classify` is a
batchable API, max_batch_size 64 and BentoML's default max_latency_ms (60 s, the bound its adaptive
dispatcher works under, not a wait): each client sends its text as a list of one, as BentoML's clients
call a batchable API, and the dispatcher merges concurrent requests into one call
(locustfile.py --protocol bentoml). Ctrl+C (SIGINT) stops it.

Why not the project's {"text": ...} contract: an API of one item calling the batchable one through
the service's own client (`self.to_async.classify`) batches too, but that client (1.4.40) replaces its
connection pool every 100 calls and fails the calls still in flight on the old one ("Server
disconnected", HTTP 500 to a few percent of requests under load), which would measure that bug instead.
"""

# No `from __future__ import annotations`: BentoML builds the request and response models from the API
# methods' annotations.
import argparse
import os
import sys
from pathlib import Path
from typing import Any

import bentoml

from harness.peers.engine import classify as run_batch
from harness.peers.engine import load

ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH_SIZE = 64


@bentoml.service(workers=1)
class Sentiment:
    def __init__(self) -> None:
        self.engine = load()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE)
    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": label, "score": score} for label, score in run_batch(self.engine, texts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8005)
    ap.add_argument("--host", default="127.0.0.1")
    a = ap.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage report: the machine is offline
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    target = f"{__spec__.name}:Sentiment" if __spec__ else "harness.peers.bentoml_peer:Sentiment"
    args = [bentoml_cli, "serve", target, "--host", a.host, "--port", str(a.port), "--working-dir", str(ROOT)]
    os.execv(bentoml_cli, args)  # same process: the launcher's signals reach BentoML's own supervisor


if __name__ == "__main__":
    main()
