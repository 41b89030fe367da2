"""Locust's gRPC user: each task sends one corpus text as the Open Inference Protocol's ModelInfer.

    GRPC_PORT=8081 uvicorn batched_server:app --port 8001          # HTTP on 8001, gRPC on 8081
    locust -f locustfile.py --headless -u 32 -r 32 -t 30s --protocol grpc --host grpc://127.0.0.1:8081
    locust -f locustfile.py ... --protocol grpc --grpc-client triton   # tritonclient.grpc, not raw stubs

locustfile.py's `--protocol grpc` puts `configured(...)` in the environment's user classes: this module's
GrpcUser, bound to locustfile's text picker and answer check, so the gRPC rows send the texts the HTTP
rows send and fail on the answers they fail on. The address is Locust's own --host, as grpc://HOST:PORT
(a server's GRPC_PORT; its HTTP port stays for /metrics). Each user holds one channel, one connection, made
in its constructor after `patch_gevent()` (Locust's documented order: gevent first, then any channel).
The calls and the request events are harness/grpc_infer.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from locust import User, tag, task
from locust.exception import LocustError
from locust.user.wait_time import constant_throughput

from harness.grpc_infer import MODEL, TRANSPORTS, GrpcClient, grpc_target, patch_gevent

Check = Callable[[dict[str, Any]], str | None]


class GrpcUser(User):
    """One client of ModelInfer over gRPC; abstract until locustfile binds its texts and check."""

    abstract = True

    @staticmethod
    def pick() -> str:
        raise NotImplementedError("configured() binds locustfile's text picker")

    @staticmethod
    def check(outputs: dict[str, Any]) -> str | None:
        raise NotImplementedError("configured() binds locustfile's answer check")

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        patch_gevent()  # before this user's channel, whoever made the user
        try:
            target = grpc_target(self.host)
        except ValueError as exc:
            raise LocustError(str(exc)) from exc
        kind = getattr(options, "grpc_client", "raw") or "raw"
        model = getattr(options, "kserve_model", MODEL) or MODEL
        self.client = GrpcClient(environment, TRANSPORTS[kind](target, model), self.check)
        rate = getattr(options, "target_rps_per_user", 0.0) or 0.0
        self._pace = constant_throughput(rate) if rate > 0 else None

    def wait_time(self) -> float:
        return self._pace(self) if self._pace is not None else 0.0

    @tag("predict")
    @task
    def infer(self) -> None:
        self.client.infer(self.pick())

    def on_stop(self) -> None:
        self.client.close()


def configured(pick: Callable[[], str], check: Check) -> type[GrpcUser]:
    """GrpcUser sending pick()'s texts and failing answers check() rejects (locustfile's, for the HTTP rows)."""
    attrs = {"abstract": True, "pick": staticmethod(pick), "check": staticmethod(check), "__module__": __name__}
    return type("SentimentGrpcUser", (GrpcUser,), attrs)
