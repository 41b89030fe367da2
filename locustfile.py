"""Locust load for both servers: users post review texts from a corpus and check every answer.

    locust -f locustfile.py --headless -u 32 -r 32 -t 30s --host http://127.0.0.1:8001 --csv results/x
    locust -f locustfile.py ... --corpus data/short.txt            # another corpus (one text a line)
    locust -f locustfile.py ... --target-rps-per-user 2            # open loop: 32 users x 2/s = 64 req/s offered
    locust -f locustfile.py ... --tags batch --batch-texts 16      # POST /predict/batch only
    locust -f locustfile.py ... --tags predict batch               # both endpoints
    locust -f locustfile.py ... --api-key KEY                      # a server started with API_KEYS
    locust -f locustfile.py ... --protocol kserve                  # KServe v2 (Triton): POST /v2/models/<name>/infer
    locust -f locustfile.py ... --protocol bentoml                 # a batchable BentoML API: POST /classify
    locust -f locustfile.py ... --protocol grpc --host grpc://127.0.0.1:8081   # ModelInfer on a GRPC_PORT
    locust -f locustfile.py ... --unique-texts                     # every text numbered: no two requests alike

Closed loop by default: each user sends its next request as soon as the last one is answered
(`wait_time` 0), so throughput is what the server sustains and latency grows with the queue. With
`--target-rps-per-user X` each user paces itself with Locust's `constant_throughput(X)`, which holds
the offered load fixed, the way to read latency at a given request rate (as long as the server keeps up:
a user can not send faster than its answers arrive).

Tasks are tagged `predict` and `batch`. Locust runs every task when no `--tags`/`--exclude-tags`
is given; here the `batch` task is left out in that case, so a plain run measures POST /predict
alone and the batch endpoint runs only when asked for by tag.

Each answer is checked (status 200, label POSITIVE or NEGATIVE, 0 <= score <= 1, one prediction per
text for /predict/batch); anything else is a Locust failure named by what went wrong.

`--protocol kserve` swaps SentimentUser for KServeUser, which posts each text as a one-row BYTES input
to `/v2/models/<--kserve-model>/infer` and checks the `label` (BYTES) and `score` (FP32) outputs the
same way: how the bench drives Triton (harness/peers/triton.py). `--protocol bentoml` swaps in
BentoMLUser, which posts each text as a list of one to a batchable BentoML API (`--bentoml-api`, default
/classify) and checks the list of one prediction it returns (harness/peers/bentoml_peer.py). `--protocol
grpc` swaps in harness/grpc_user.py's GrpcUser: the Open Inference Protocol's ModelInfer over gRPC at
--host grpc://HOST:PORT, one [1, 1] BYTES text a call, the same checks on `label` and `score`
(`--grpc-client raw`, the default, or `triton`). Without any of these, only SentimentUser runs.

`--unique-texts` appends " #<run>-<n>" to every text sent (run: random per process, n: a counter), so no
two requests carry the same text, however often the corpus comes round: how the bench measures an answer
cache where nothing repeats (harness/bench.py --cache).
"""

from __future__ import annotations

import itertools
import random
import secrets
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, tag, task
from locust.env import Environment
from locust.user.wait_time import constant_throughput

LABELS = frozenset({"POSITIVE", "NEGATIVE"})
DEFAULT_CORPUS = "data/reviews.txt"
CORPUS: list[str] = []
UNIQUE: list[bool] = [False]  # --unique-texts, set at init
_RUN, _COUNT = secrets.token_hex(4), itertools.count(1)  # this process's numbering, for --unique-texts


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        env_var="LOCUST_CORPUS",
        help="text file, one review a line, that users post (default %(default)s)",
    )
    parser.add_argument(
        "--target-rps-per-user",
        type=float,
        default=0.0,
        env_var="LOCUST_TARGET_RPS_PER_USER",
        help="open loop: requests/s each user offers (constant_throughput); 0 = closed loop",
    )
    parser.add_argument(
        "--batch-texts",
        type=int,
        default=8,
        env_var="LOCUST_BATCH_TEXTS",
        help="texts per POST /predict/batch (task tagged `batch`)",
    )
    parser.add_argument(
        "--api-key",
        default="",
        env_var="LOCUST_API_KEY",
        is_secret=True,
        help="sent as `Authorization: Bearer KEY`, for a server started with API_KEYS",
    )
    parser.add_argument(
        "--protocol",
        choices=("json", "kserve", "bentoml", "grpc"),
        default="json",
        env_var="LOCUST_PROTOCOL",
        help="json: the project's POST /predict (SentimentUser); kserve: KServe v2 inference (KServeUser); "
        "bentoml: a batchable BentoML API (BentoMLUser); grpc: ModelInfer over gRPC at --host grpc://HOST:PORT",
    )
    parser.add_argument(
        "--grpc-client",
        choices=("raw", "triton"),
        default="raw",
        env_var="LOCUST_GRPC_CLIENT",
        help="with --protocol grpc: raw protocol stubs (the cheaper for Locust) or tritonclient.grpc",
    )
    parser.add_argument(
        "--unique-texts",
        action="store_true",
        env_var="LOCUST_UNIQUE_TEXTS",
        help='append " #<run>-<n>" to every text sent, so no two requests repeat a text',
    )
    parser.add_argument(
        "--kserve-model",
        default="sentiment",
        env_var="LOCUST_KSERVE_MODEL",
        help="model name in /v2/models/<name>/infer, with --protocol kserve (default %(default)s)",
    )
    parser.add_argument(
        "--bentoml-api",
        default="/classify",
        env_var="LOCUST_BENTOML_API",
        help="path of the batchable API, with --protocol bentoml (default %(default)s)",
    )


def load_corpus(path: str) -> list[str]:
    """Non-empty lines of path, looked up from the working directory and then beside this file."""
    candidates = [Path(path), Path(__file__).parent / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise SystemExit(f"corpus not found: {path}")
    texts = [line.strip() for line in found.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not texts:
        raise SystemExit(f"corpus is empty: {found}")
    return texts


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library, without a command line
        CORPUS[:] = load_corpus(DEFAULT_CORPUS)
        return
    CORPUS[:] = load_corpus(options.corpus)
    UNIQUE[0] = bool(getattr(options, "unique_texts", False))
    protocol = getattr(options, "protocol", "json")
    if protocol == "grpc":  # imported only here: a plain run loads no gRPC
        from harness.grpc_user import configured, patch_gevent

        patch_gevent()  # before any user, so before any channel
        environment.user_classes[:] = [configured(pick_text, check_label)]
    elif protocol != "json":
        # the other users are abstract, so a plain run never spawns them; the runner reads this list
        # when it spawns, after init, so swapping it here is what selects the protocol
        environment.user_classes[:] = [{"kserve": KServeUser, "bentoml": BentoMLUser}[protocol]]
    if not options.tags and not options.exclude_tags:
        # Locust has no "off unless tagged" switch; Environment has already filtered by tags,
        # so dropping the batch task here is what makes a plain run POST /predict only.
        for user_class in environment.user_classes:
            user_class.tasks = [t for t in user_class.tasks if "batch" not in getattr(t, "locust_tag_set", ())]


def pick_text() -> str:
    """A corpus text at random; numbered with --unique-texts, so that it repeats no earlier one."""
    text = random.choice(CORPUS)
    return f"{text} #{_RUN}-{next(_COUNT)}" if UNIQUE[0] else text


def check_label(item: Any) -> str | None:
    """Why one {"label", "score"} item breaks the contract, or None if it is fine."""
    if not isinstance(item, dict):
        return "prediction is not an object"
    if item.get("label") not in LABELS:
        return f"bad label {str(item.get('label'))[:40]!r}"
    score = item.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
        return f"bad score {str(score)[:40]!r}"
    return None


def check_answer(status: int, body: Any, expected_items: int | None) -> str | None:
    """Why an answer fails validation (a short, stable message for Locust's failure table), or None."""
    if status != 200:
        detail = body.get("detail") if isinstance(body, dict) else None
        return f"HTTP {status}" + (f": {str(detail)[:80]}" if detail else "")
    if not isinstance(body, dict):
        return "body is not a JSON object"
    if expected_items is None:
        return check_label(body)
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != expected_items:
        return f"expected {expected_items} predictions"
    return next((why for why in map(check_label, predictions) if why), None)


class SentimentUser(FastHttpUser):
    """One client of POST /predict (and, tagged `batch`, POST /predict/batch)."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        rate = options.target_rps_per_user if options else 0.0
        self._pace = constant_throughput(rate) if rate > 0 else None
        self._headers = {"Authorization": f"Bearer {options.api_key}"} if options and options.api_key else None

    def wait_time(self) -> float:
        return self._pace(self) if self._pace is not None else 0.0

    @tag("predict")
    @task
    def predict(self) -> None:
        self._post("/predict", {"text": pick_text()}, None)

    @tag("batch")
    @task
    def predict_batch(self) -> None:
        options = self.environment.parsed_options
        n = max(1, options.batch_texts if options else 8)
        self._post("/predict/batch", {"texts": [pick_text() for _ in range(n)]}, n)

    def _post(self, path: str, payload: dict[str, Any], expected_items: int | None) -> None:
        with self.client.post(path, json=payload, headers=self._headers, catch_response=True) as resp:
            try:
                body = resp.json()
            except Exception:
                body = None
            why = check_answer(resp.status_code or 0, body, expected_items)
            if why:
                resp.failure(why)
            else:
                resp.success()


def kserve_request(text: str) -> dict[str, Any]:
    """A KServe v2 inference body: one text as a [1, 1] BYTES input (batch of one, one element)."""
    return {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}


def check_kserve_answer(status: int, body: Any) -> str | None:
    """Why a KServe v2 answer fails validation, or None: `label` and `score` outputs of one row each,
    checked as the project's answers are."""
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else None  # KServe v2 errors: {"error": ...}
        return f"HTTP {status}" + (f": {str(detail)[:80]}" if detail else "")
    outputs = body.get("outputs") if isinstance(body, dict) else None
    if not isinstance(outputs, list):
        return "no outputs"
    by_name = {o.get("name"): o for o in outputs if isinstance(o, dict)}
    values: dict[str, Any] = {}
    for name in ("label", "score"):
        data = by_name.get(name, {}).get("data")
        if not isinstance(data, list) or len(data) != 1:
            return f"expected one {name} output"
        values[name] = data[0]
    return check_label(values)


def bentoml_request(text: str) -> dict[str, Any]:
    """A batchable BentoML API's body: its one list parameter, `texts`, holding one text."""
    return {"texts": [text]}


def check_bentoml_answer(status: int, body: Any) -> str | None:
    """Why a batchable BentoML API's answer fails validation, or None: a list of one prediction."""
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else None  # BentoML errors: {"error": ...}
        return f"HTTP {status}" + (f": {str(detail)[:80]}" if detail else "")
    if not isinstance(body, list) or len(body) != 1:
        return "expected a list of 1 prediction"
    return check_label(body[0])


class ProtocolUser(FastHttpUser):
    """A client of a peer's own protocol: one text per request, every answer checked by `check`."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        rate = options.target_rps_per_user if options else 0.0
        self._pace = constant_throughput(rate) if rate > 0 else None

    def wait_time(self) -> float:
        return self._pace(self) if self._pace is not None else 0.0

    def _post_checked(self, path: str, payload: Any, check: Any) -> None:
        with self.client.post(path, json=payload, catch_response=True) as resp:
            try:
                body = resp.json()
            except Exception:
                body = None
            why = check(resp.status_code or 0, body)
            if why:
                resp.failure(why)
            else:
                resp.success()


class KServeUser(ProtocolUser):
    """One client of a KServe v2 server (Triton): POST /v2/models/<name>/infer, selected by --protocol kserve."""

    abstract = True  # spawned only when --protocol kserve puts it in the environment's user classes

    @tag("predict")
    @task
    def infer(self) -> None:
        options = self.environment.parsed_options
        path = f"/v2/models/{options.kserve_model if options else 'sentiment'}/infer"
        self._post_checked(path, kserve_request(pick_text()), check_kserve_answer)


class BentoMLUser(ProtocolUser):
    """One client of a batchable BentoML API: POST /classify {"texts": [text]}, selected by --protocol bentoml."""

    abstract = True  # spawned only when --protocol bentoml puts it in the environment's user classes

    @tag("predict")
    @task
    def classify(self) -> None:
        options = self.environment.parsed_options
        path = options.bentoml_api if options else "/classify"
        self._post_checked(path, bentoml_request(pick_text()), check_bentoml_answer)
