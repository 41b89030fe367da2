"""Scale-out with real processes: uvicorn workers, Redis-shared rate limits, nginx in front of two replicas.

    pytest tests/test_scaleout.py -q     # ~30-60 s on 2 cores; needs redis-server and nginx (apt)

One cluster for the module, on 127.0.0.1 and free ports: redis-server; replica A = batched_server
under `uvicorn --workers 2` with PROMETHEUS_MULTIPROC_DIR and text logs; replica B = one process with
LOG_FORMAT=json; both with API_KEYS, RATE_LIMIT and REDIS_URL; nginx running deploy/nginx.conf over
both. Tests that need a binary skip with the Debian package to install. The last test stops replica
B, so it stays last. Every process is started in its own session and killed in teardown. The gRPC tests
each run a server of their own (no cluster needed): one behind deploy/nginx.conf's gRPC listener
(GRPC_PORT, API_KEYS), one under `--workers 2` whose front ends share GRPC_PORT (SO_REUSEPORT):
`pytest tests/test_scaleout.py -q -k grpc` starts those two servers only.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, multiprocess

from serving import grpc_predict_v2_pb2 as pb
from serving.grpc_server import SERVICE
from tests.processes import (
    Proc,
    StubRequest,
    eventually,
    free_port,
    need,
    start_nginx,
    start_uvicorn,
    stub_http,
    wait_until_ok,
)
from tests.test_ops import sample, scrape

KEYS = ("k-metrics", "k-shared", "k-nginx", "k-logs", "k-failover", "k-stub")
LIMIT = 40  # per key per hour: a test never waits out a window, so counts are exact
TEXT = {"text": "I loved it"}


def start_replica(
    name: str, tmp: Path, model_dir: str, redis_url: str, workers: int = 1, **env: str
) -> tuple[Proc, str]:
    env.update(
        MODEL_ID=model_dir,
        MODEL_FALLBACK="0",
        DEVICE="cpu",
        API_KEYS=",".join(KEYS),
        RATE_LIMIT=f"{LIMIT}/hour",
        REDIS_URL=redis_url,
    )
    return start_uvicorn(name, tmp, "batched_server:app", env, workers)


@dataclass
class Cluster:
    a: Proc
    a_url: str
    a_metrics_dir: Path
    b: Proc
    b_url: str
    redis_url: str
    tmp: Path


@pytest.fixture(scope="module")
def cluster(redis_url: str, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    metrics_dir = tmp / "prometheus-a"
    metrics_dir.mkdir()
    procs: list[Proc] = []
    try:
        a, a_url = start_replica(
            "replica-a", tmp, tiny_model_dir, redis_url, workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
        )
        procs.append(a)
        b, b_url = start_replica("replica-b", tmp, tiny_model_dir, redis_url, LOG_FORMAT="json")
        procs.append(b)
        wait_until_ok(a, f"{a_url}/ready")
        wait_until_ok(b, f"{b_url}/ready")
        yield Cluster(a, a_url, metrics_dir, b, b_url, redis_url, tmp)
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def nginx_url(cluster: Cluster) -> Iterator[str]:
    """deploy/nginx.conf in front of replicas A and B."""
    nginx, url = start_nginx(
        cluster.tmp / "nginx", [cluster.a_url.removeprefix("http://"), cluster.b_url.removeprefix("http://")]
    )
    try:
        yield url
    finally:
        nginx.stop()


def served_predictions(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", headers={"X-API-Key": "k-metrics"}, timeout=10)
    metrics.raise_for_status()
    return sample(scrape(metrics.text), "sentimentalyzer_requests_total", endpoint="/predict", status="200")


def by_worker(metrics_dir: Path, tmp: Path, name: str, **labels: str) -> dict[int, float]:
    """One counter's sample as each process counted it, read from that process's own multiprocess file."""
    counts = {}
    for db in metrics_dir.glob("counter_*.db"):
        pid = int(db.stem.split("_")[1])
        alone = tmp / f"worker-{pid}"
        alone.mkdir(exist_ok=True)
        shutil.copy(db, alone / db.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(alone))
        counts[pid] = registry.get_sample_value(name, labels) or 0.0
    return counts


def health_by_worker(metrics_dir: Path, tmp: Path) -> dict[int, float]:
    """/health requests each worker counted."""
    return by_worker(metrics_dir, tmp, "sentimentalyzer_requests_total", endpoint="/health", status="200")


def test_multiprocess_metrics_add_up_every_worker(cluster: Cluster) -> None:
    def fresh_connection(_: int) -> int:  # a new connection each time, so either worker may accept it
        return httpx.get(f"{cluster.a_url}/health", headers={"Connection": "close"}, timeout=10).status_code

    sent, by_worker = 0, {}
    with ThreadPoolExecutor(8) as pool:
        while sent < 400:
            assert set(pool.map(fresh_connection, range(40))) == {200}
            sent += 40
            by_worker = health_by_worker(cluster.a_metrics_dir, cluster.tmp)
            if len([n for n in by_worker.values() if n > 0]) == 2:
                break
    assert sorted(n > 0 for n in by_worker.values()) == [True, True], f"one worker served all {sent}: {by_worker}"
    assert sum(by_worker.values()) == sent
    for _ in range(4):  # whichever worker answers the scrape, it reports the whole server
        response = httpx.get(f"{cluster.a_url}/metrics", headers={"X-API-Key": "k-metrics"}, timeout=10)
        assert sample(scrape(response.text), "sentimentalyzer_requests_total", endpoint="/health", status="200") == sent


def test_log_lines_carry_request_ids_in_text_and_json(cluster: Cluster) -> None:
    for url, rid in ((cluster.a_url, "scaleout-text-1"), (cluster.b_url, "scaleout-json-1")):
        response = httpx.post(f"{url}/predict", json=TEXT, headers={"X-API-Key": "k-logs", "X-Request-ID": rid})
        assert response.status_code == 200 and response.headers["X-Request-ID"] == rid
        assert response.headers["X-Batch-Size"] == "1" and "infer;dur=" in response.headers["Server-Timing"]
    # the access line is written just after the response is sent
    assert eventually(lambda: "[scaleout-text-1] POST /predict 200" in cluster.a.text())
    assert eventually(lambda: '"scaleout-json-1"' in cluster.b.text())
    lines = cluster.b.text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, uvicorn's own included, is JSON
    assert any(r["message"].startswith("Application startup complete") for r in records)
    access = [r for r in records if r["request_id"] == "scaleout-json-1"]
    assert [(r["path"], r["status"]) for r in access] == [("/predict", 200)]


def test_rate_limit_is_shared_by_every_process_through_redis(cluster: Cluster) -> None:
    statuses, last = [], None
    for i in range(LIMIT + 10):  # alternate replica A (two workers) and replica B: three processes
        last = httpx.post(
            f"{(cluster.a_url, cluster.b_url)[i % 2]}/predict",
            json=TEXT,
            headers={"Authorization": "Bearer k-shared"},
            timeout=10,
        )
        statuses.append(last.status_code)
    assert statuses == [200] * LIMIT + [429] * 10
    assert last is not None and 3500 <= int(last.headers["Retry-After"]) <= 3600
    stored = redis.Redis.from_url(cluster.redis_url).keys("sentimentalyzer:ratelimit:*")
    assert stored and not any(b"k-shared" in key for key in stored)  # keys are stored as digests only


def test_nginx_round_robins_over_both_replicas(cluster: Cluster, nginx_url: str) -> None:
    before = served_predictions(cluster.a_url), served_predictions(cluster.b_url)
    for _ in range(10):
        response = httpx.post(f"{nginx_url}/predict", json=TEXT, headers={"X-API-Key": "k-nginx"}, timeout=10)
        assert response.status_code == 200 and response.json()["label"] in ("POSITIVE", "NEGATIVE")
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])  # minted by nginx, kept by the app
    a, b = served_predictions(cluster.a_url) - before[0], served_predictions(cluster.b_url) - before[1]
    assert a + b == 10 and min(a, b) >= 4, (a, b)
    refused = httpx.post(f"{nginx_url}/predict", json=TEXT, timeout=10)
    assert refused.status_code == 401 and refused.json()["detail"]
    at_limit = httpx.post(f"{nginx_url}/predict", content=b"x" * (1 << 20), timeout=10)
    assert at_limit.status_code == 401  # refused by a replica before it read the body: not a replica failure
    for size in ((1 << 20) + 1, 3_000_000):  # nginx enforces the app's limit itself, in the app's JSON
        big = httpx.post(
            f"{nginx_url}/predict",
            content=b"x" * size,
            timeout=10,
            headers={"X-API-Key": "k-nginx", "Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["detail"] == "request body over 1048576 bytes"


def test_nginx_skips_a_replica_that_is_not_ready(cluster: Cluster) -> None:
    hits: list[str] = []

    def not_ready(request: StubRequest) -> tuple[int, bytes]:
        """Up but not ready: 503 to everything, as the app answers before warm-up."""
        hits.append(request.path)
        return 503, b'{"detail": "model not ready"}'

    with stub_http(not_ready, {"Content-Type": "application/json", "Retry-After": "1"}) as stub:
        nginx, url = start_nginx(
            cluster.tmp / "nginx-stub", [cluster.a_url.removeprefix("http://"), stub.removeprefix("http://")]
        )
        try:
            statuses = [
                httpx.post(f"{url}/predict", json=TEXT, headers={"X-API-Key": "k-stub"}, timeout=10).status_code
                for _ in range(6)
            ]
        finally:
            nginx.stop()
    assert statuses == [200] * 6
    assert hits  # it was in the rotation, and its 503s were retried on the ready replica


class CountingReplica:
    """A gRPC server that answers every ModelInfer with a model_name of "stub" and counts them."""

    def __init__(self) -> None:
        self.calls = 0
        self.server = grpc.server(ThreadPoolExecutor(2))
        infer = grpc.unary_unary_rpc_method_handler(
            self.infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": infer})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def infer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        self.calls += 1
        return pb.ModelInferResponse(model_name="stub", id=request.id)


def model_infer(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"/{SERVICE}/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def test_grpc_passes_through_nginx_to_the_replicas_call_by_call(tiny_model_dir: str, tmp_path: Path) -> None:
    """deploy/nginx.conf's gRPC listener: OIP ModelInfer by tritonclient through nginx to a real batched
    server, its key, request ID and status passing, a 2 MiB call refused by the app, not by nginx; a
    replica refusing connections (not warm yet) is skipped; and calls on one client connection go to
    each replica in turn."""
    from tests.test_grpc import grpcclient, infer_request, text_input  # skips here without tritonclient

    need("nginx", "nginx")  # before paying for a server start
    grpc_port, key = free_port(), "k-grpc"
    replica, url = start_uvicorn(
        "grpc-replica",
        tmp_path,
        "batched_server:app",
        {"MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0", "DEVICE": "cpu", "DTYPE": "fp32", "API_KEYS": key,
         "GRPC_PORT": str(grpc_port)},
    )  # fmt: skip
    stub, procs = CountingReplica(), []
    keyed = {"authorization": f"Bearer {key}"}
    infer_path = "/v2/models/sentiment/infer"

    def served(status: str) -> float:  # the replica's own count of the route gRPC's ModelInfer is served by
        text = httpx.get(f"{url}/metrics", headers={"X-API-Key": key}, timeout=10).text
        return sample(scrape(text), "sentimentalyzer_requests_total", endpoint=infer_path, status=status)

    try:
        wait_until_ok(replica, f"{url}/ready")
        # 1. the real replica and one whose gRPC port is closed, as a replica's is until its model is warm
        at = free_port()
        nginx, _ = start_nginx(
            tmp_path / "nginx",
            [url.removeprefix("http://")],
            at,
            [f"127.0.0.1:{grpc_port}", f"127.0.0.1:{free_port()}"],
        )
        procs.append(nginx)
        before = served("200"), served("401")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{at}")
        texts = ["I loved it", "dull and far too long", "It was fine, I guess"]
        try:
            for _ in range(4):  # every call answered by the warm replica, whichever nginx tried first
                result = client.infer("sentiment", [text_input(texts)], headers=keyed, client_timeout=20)
                assert [x.decode() for x in result.as_numpy("label").ravel()] == [
                    httpx.post(f"{url}/predict", json={"text": t}, headers={"X-API-Key": key}).json()["label"]
                    for t in texts
                ]
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                client.infer("sentiment", [text_input(texts)], client_timeout=20)  # no key
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        finally:
            client.close()
        assert (served("200") - before[0], served("401") - before[1]) == (4, 1)
        with grpc.insecure_channel(f"127.0.0.1:{at}") as channel:
            call = model_infer(channel)
            metadata = (*keyed.items(), ("x-request-id", "grpc-through-nginx"))
            _, given = call.with_call(infer_request(texts), metadata=metadata, timeout=20)
            _, minted = call.with_call(infer_request(texts), metadata=tuple(keyed.items()), timeout=20)
            # 2 MiB: within gRPC's and nginx's 4 MiB, so the replica refuses it in the protocol's terms
            with pytest.raises(grpc.RpcError) as too_big:
                call(infer_request(["x" * 32768] * 64), metadata=tuple(keyed.items()), timeout=20)
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1048576" in too_big.value.details()
        assert dict(given.trailing_metadata())["x-request-id"] == "grpc-through-nginx"
        rid = dict(minted.trailing_metadata())["x-request-id"]  # minted by nginx, kept by the app
        assert re.fullmatch(r"[0-9a-f]{32}", rid) and eventually(
            lambda: f"rid={rid}" in (tmp_path / "nginx" / "access.log").read_text()
        )
        # 2. the real replica and the stub: one client connection, each call to the next replica
        at = free_port()
        procs.append(
            start_nginx(
                tmp_path / "nginx-rr",
                [url.removeprefix("http://")],
                at,
                [f"127.0.0.1:{grpc_port}", f"127.0.0.1:{stub.port}"],
            )[0]
        )
        with grpc.insecure_channel(f"127.0.0.1:{at}") as channel:
            call = model_infer(channel)
            names = [
                call(infer_request(["I loved it"]), metadata=tuple(keyed.items()), timeout=20).model_name
                for _ in range(10)
            ]
        assert sorted(set(names)) == ["sentiment", "stub"] and names.count("stub") == stub.calls == 5, names
    finally:
        for proc in reversed(procs):
            proc.stop()
        stub.server.stop(0)
        replica.stop()


def test_every_worker_serves_grpc_on_the_one_port(tiny_model_dir: str, tmp_path: Path) -> None:
    """`uvicorn --workers 2` with GRPC_PORT: both front ends bind the one port (grpc.so_reuseport), so fresh
    connections reach either, and each answers ModelInfer as HTTP does; which one answered is in each
    worker's own multiprocess counter file. Once the server stops, the port refuses connections."""
    from tests.test_grpc import grpcclient, text_input  # skips here without tritonclient

    grpc_port, metrics_dir, texts = free_port(), tmp_path / "prometheus", ["I loved it", "dull and far too long"]
    metrics_dir.mkdir()
    server, url = start_uvicorn(
        "grpc-workers",
        tmp_path,
        "batched_server:app",
        {"MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0", "DEVICE": "cpu", "DTYPE": "fp32",
         "GRPC_PORT": str(grpc_port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        workers=2,
    )  # fmt: skip
    try:
        wait_until_ok(server, f"{url}/ready")
        # /ready is one worker's answer: the other may still be warming up, its port not yet bound
        bound = f"Open Inference Protocol over gRPC on port {grpc_port}"
        eventually(lambda: server.popen.poll() is not None or server.text().count(bound) == 2, 60)
        assert server.text().count(bound) == 2, server.tail(40)  # a worker that cannot bind stops the server
        workers = {int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.text())}
        assert len(workers) == 2, server.tail(40)
        expected = [httpx.post(f"{url}/predict", json={"text": t}, timeout=10).json()["label"] for t in texts]
        calls, answered = 0, {}
        while calls < 40 and len(answered) < 2:
            # a channel of its own subchannel pool: a new TCP connection, which the kernel hands to either socket
            client = grpcclient.InferenceServerClient(
                f"127.0.0.1:{grpc_port}", channel_args=[("grpc.use_local_subchannel_pool", 1)]
            )
            try:
                result = client.infer("sentiment", [text_input(texts)], client_timeout=20)
            finally:
                client.close()
            assert [x.decode() for x in result.as_numpy("label").ravel()] == expected
            calls += 1
            counted = by_worker(
                metrics_dir, tmp_path, "sentimentalyzer_grpc_requests_total", method="ModelInfer", code="OK"
            )
            answered = {pid: n for pid, n in counted.items() if n > 0}
        assert set(answered) == workers, f"{calls} calls, answered by {answered}, workers {workers}"
        assert sum(answered.values()) == calls
    finally:
        server.stop()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", grpc_port)) == errno.ECONNREFUSED


def test_stopping_a_replica_keeps_requests_succeeding(cluster: Cluster, nginx_url: str) -> None:  # keep last: stops B
    before = served_predictions(cluster.a_url)
    cluster.b.stop()
    # uvicorn re-raises the SIGTERM it handled once shut down, so -15 is a clean exit too
    assert cluster.b.popen.returncode in (0, -signal.SIGTERM), cluster.b.text()[-2000:]
    assert "Application shutdown complete" in cluster.b.text()
    statuses = [
        httpx.post(f"{nginx_url}/predict", json=TEXT, headers={"X-API-Key": "k-failover"}, timeout=10).status_code
        for _ in range(10)
    ]
    assert statuses == [200] * 10
    assert served_predictions(cluster.a_url) - before == 10
