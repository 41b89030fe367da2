"""The cpu overlay's pods as processes: probes, a real Prometheus under load, autoscaling, a rolling update.

    pytest tests/test_cluster.py -q -s     # ~1.5-2 min on 2 cores; -s prints the figures measured

Needs kubectl (renders deploy/k8s/overlays/cpu), redis-server, nginx and prometheus (apt). No cluster
runs here, so the pods are processes on 127.0.0.1, one module-wide cluster:

- redis-server, the rate-limit store (the overlay's Redis);
- replicas a and b: batched_server with the rendered ConfigMap's settings, the Secret's variable names
  and the Dockerfile CMD's uvicorn flags (multiprocess metrics dir wiped at each start, as the CMD does).
  Changed, and why: MODEL_ID (a small random DistilBERT, queue_model_dir: no hub here), REDIS_URL
  (local), API_KEYS (the test's own keys), OMP_NUM_THREADS=1 (2 shared cores). Replica b also runs
  MAX_QUEUE=63, below MAX_BATCH_ITEMS, so it refuses every full /predict/batch with 503: the 503s the
  alerts and the dashboard must see. The rolling update replaces it with the ConfigMap's value;
- nginx (deploy/nginx.conf) in front of both, as the Service;
- Prometheus scraping each replica every second with the ServiceMonitor's path and key, labelled as
  prometheus-operator labels pods (job = Service name, namespace, pod), with deploy/prometheus-rules.yml.

Tests run in file order and share what they measured; the last one replaces both replicas.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
import yaml
from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

from serving.model import standin_tokenizer_dir
from serving.settings import Settings
from tests.processes import ROOT, Proc, environ, free_port, need, nginx_config, start, start_nginx
from tests.test_k8s import (
    api_container,
    dockerfile_cmd,
    hpa_desired,
    locust_command,
    one,
    prestop_s,
    render,
    scaled_trigger,
    settings_env,
)

LOAD_KEY, BURST_KEY, DIRECT_KEY, METRICS_KEY = "k-load", "k-burst", "k-direct", "k-metrics"
SCRAPE = "1s"
RATE_INTERVAL = "5s"  # Grafana's $__rate_interval at a 1 s scrape: max(4 x scrape, scrape + interval)
PRESTOP_S = 2.0  # the manifest pauses 10 s for kube-proxy and ingresses; nginx here reloads at once
SHED_QUEUE = "63"  # replica b's MAX_QUEUE until the rollout: a full batch (64 texts) never fits
MODEL_DIM, MODEL_LAYERS, MODEL_HEADS = 384, 4, 6  # see queue_model_dir
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sentimentalyzer.json"


@dataclass
class Cluster:
    tmp: Path
    objects: list[dict[str, Any]]
    env: dict[str, str]  # every replica's environment, before per-replica changes
    ports: dict[str, int]
    replicas: dict[str, Proc] = field(default_factory=dict)
    starts: int = 0
    nginx: Proc | None = None
    nginx_url: str = ""
    prometheus_url: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return one(self.objects, "Namespace")["metadata"]["name"]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_replica(self, name: str, **changes: str) -> Proc:
        """A pod's process: the Dockerfile CMD's uvicorn flags, a fresh PROMETHEUS_MULTIPROC_DIR."""
        self.starts += 1
        metrics_dir = self.tmp / f"multiproc-{name}-{self.starts}"
        metrics_dir.mkdir()
        env = environ({**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **changes})
        graceful = re.search(r"--timeout-graceful-shutdown \d+", dockerfile_cmd()).group(0).split()
        container_env = {v["name"]: v.get("value") for v in api_container(self.objects)["env"]}
        proc = Proc.uvicorn(
            container_env["APP"],
            self.tmp / f"replica-{name}-{self.starts}.log",
            env,
            workers=int(container_env["WORKERS"]),
            port=self.ports[name],
            extra=graceful,
        )
        proc.name = f"replica-{name}"
        self.replicas[name] = proc
        return proc

    def route_to(self, names: list[str]) -> None:
        """Rewrites nginx's upstreams (the Service's endpoints) and reloads it."""
        assert self.nginx is not None
        port = int(self.nginx_url.rsplit(":", 1)[1])
        nginx_config(self.tmp / "nginx", port, [f"127.0.0.1:{self.ports[n]}" for n in names])
        error_log = self.tmp / "nginx" / "error.log"
        before = error_log.read_text().count("reconfiguring")
        os.kill(self.nginx.popen.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while error_log.read_text().count("reconfiguring") == before:
            assert time.monotonic() < deadline, "nginx did not reload"
            time.sleep(0.05)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


def wait_ready(proc: Proc, limit_s: float = 180) -> None:
    try:
        proc.wait_ready(timeout_s=limit_s)
    except RuntimeError as exc:
        pytest.fail(f"{exc}:\n{proc.tail(30)}")


def start_redis(tmp: Path) -> tuple[Proc, str]:
    binary = need("redis-server", "redis-server")
    port = free_port()
    proc = start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], tmp)
    client = redis.Redis(port=port, socket_timeout=1)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.stop()
    pytest.fail(f"redis-server did not answer:\n{proc.text()}")


def start_prometheus(cluster: Cluster) -> Proc:
    """Scrapes as the ServiceMonitor does: its path and key, job = the Service's name, namespace and pod labels."""
    binary = need("prometheus", "prometheus")
    [endpoint] = one(cluster.objects, "ServiceMonitor")["spec"]["endpoints"]
    config = {
        "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
        "rule_files": [str(ROOT / "deploy" / "prometheus-rules.yml")],
        "scrape_configs": [
            {
                "job_name": one(cluster.objects, "Service")["metadata"]["name"],
                "metrics_path": endpoint["path"],
                "scrape_timeout": SCRAPE,
                "authorization": {"type": endpoint["authorization"]["type"], "credentials": METRICS_KEY},
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": cluster.namespace, "pod": f"sentimentalyzer-{name}"},
                    }
                    for name, port in cluster.ports.items()
                ],
            }
        ],
    }
    path = cluster.tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool = need("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    proc = start(
        "prometheus",
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={cluster.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        cluster.tmp,
    )
    cluster.prometheus_url = f"http://127.0.0.1:{port}"
    probe = Proc(proc.name, proc.popen, proc.log, cluster.prometheus_url)
    try:
        probe.wait_ready("/-/ready", 30)
    except RuntimeError as exc:
        proc.stop()
        pytest.fail(f"{exc}:\n{proc.text()[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def queue_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """conftest's tiny DistilBERT made 8x wider and 2x deeper (about a tenth of the real model's cost):
    it still loads in a second, but now computing, not HTTP, limits a replica, as with the real model,
    so a queue forms under load. Under the tiny model's, HTTP was the limit and the queue stayed near 0."""
    path = tmp_path_factory.mktemp("queue-distilbert")
    config = DistilBertConfig(
        vocab_size=30522,
        dim=MODEL_DIM,
        n_layers=MODEL_LAYERS,
        n_heads=MODEL_HEADS,
        hidden_dim=4 * MODEL_DIM,
        max_position_embeddings=512,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        DistilBertForSequenceClassification(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(standin_tokenizer_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cluster(queue_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("k8s-cluster")
    objects = render("cpu")
    settings = settings_env(objects)
    redis_proc, redis_url = start_redis(tmp)
    procs: list[Proc] = [redis_proc]
    env = {
        **settings,
        "MODEL_ID": queue_model_dir,
        "REDIS_URL": redis_url,
        "API_KEYS": ",".join((LOAD_KEY, BURST_KEY, DIRECT_KEY, METRICS_KEY)),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    c = Cluster(tmp, objects, env, {"a": free_port(), "b": free_port()})
    try:
        c.start_replica("a")
        c.start_replica("b", MAX_QUEUE=SHED_QUEUE)
        for proc in c.replicas.values():
            wait_ready(proc)
        c.nginx, c.nginx_url = start_nginx(tmp / "nginx", [f"127.0.0.1:{p}" for p in c.ports.values()])
        procs.append(c.nginx)
        # started just before the load, so its one-minute windows hold the load, not a long idle spell
        procs.append(start_prometheus(c))
        yield c
    finally:
        for proc in [*c.replicas.values(), *reversed(procs)]:
            proc.stop()


def locust(cluster: Cluster, name: str, users: int, rps_per_user: float, seconds: int, *extra: str) -> subprocess.Popen:
    """Locust through nginx with the load key: `users` x `rps_per_user` at most (0: each user as fast as answered)."""
    args = locust_command(cluster.nginx_url, users, seconds, *extra)
    args += ["--target-rps-per-user", str(rps_per_user)] if rps_per_user else []
    args += ["--api-key", LOAD_KEY, "--json-file", str(cluster.tmp / name)]
    with (cluster.tmp / f"{name}.log").open("wb") as log:  # the child keeps its own handle
        return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def locust_totals(cluster: Cluster, name: str, popen: subprocess.Popen) -> tuple[int, int]:
    """(requests, failures) from Locust's JSON stats, once it has exited."""
    rc = popen.wait(60)
    log = (cluster.tmp / f"{name}.log").read_text(errors="replace")
    assert rc == 0, log[-3000:]
    entries = json.loads((cluster.tmp / f"{name}.json").read_text())
    return sum(e["num_requests"] for e in entries), sum(e["num_failures"] for e in entries)


def test_probes_answer_as_the_manifest_expects(cluster: Cluster) -> None:
    container = api_container(cluster.objects)
    for name in cluster.ports:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            # kubelet sends no key, and gives up after timeoutSeconds
            r = httpx.get(cluster.url(name) + probe["httpGet"]["path"], timeout=probe["timeoutSeconds"])
            assert r.status_code == 200, (name, kind, r.text)
        ready = httpx.get(cluster.url(name) + "/ready").json()
        assert ready["status"] == "ready" and ready["model_source"] == "local"
        assert httpx.get(cluster.url(name) + "/health").json() == {"status": "ok"}
    # /metrics needs the ServiceMonitor's key; with it, the autoscaler's metric is there
    [endpoint] = one(cluster.objects, "ServiceMonitor")["spec"]["endpoints"]
    assert httpx.get(cluster.url("a") + endpoint["path"]).status_code == 401
    metrics = httpx.get(cluster.url("a") + endpoint["path"], headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert metrics.status_code == 200 and "\nsentimentalyzer_queue_depth " in metrics.text


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for p in dashboard["panels"]
        for t in p["targets"]
    ]


def rules(cluster: Cluster) -> list[dict[str, Any]]:
    body = httpx.get(f"{cluster.prometheus_url}/api/v1/rules", timeout=10).json()
    return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def test_dashboard_queries_and_rules_return_data_under_load(cluster: Cluster) -> None:
    # what the refusal panel counts besides 503s: a request without a key, a key past its limit
    assert httpx.post(cluster.nginx_url + "/predict", json={"text": "no key"}).status_code == 401
    limit, window = one_limit(cluster)
    with httpx.Client(base_url=cluster.url("a"), headers={"X-API-Key": BURST_KEY}) as client:
        burst = [client.get("/no-such-path").status_code for _ in range(limit + 20)]
    assert 429 in burst, f"{limit} per {window} s never reached: {set(burst)}"

    trigger = scaled_trigger(cluster.objects)
    autoscaling, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    seconds = 15
    # 12 users, each sending its next request when the last is answered; half of them batches of 16
    # texts. Computing is the limit (about 10-25 requests/s here, under RATE_LIMIT's 50/s), so about
    # half of the items in flight wait in the queues, whatever the machine's speed.
    load = locust(cluster, "load", 12, 0, seconds, "--tags", "predict", "batch", "--batch-texts", "16")
    started, series, panels, per_pod, refused = time.monotonic(), [], {}, {}, 0
    # clients that reach b directly, as kube-proxy spreads them (nginx benches a replica that refuses)
    direct = httpx.Client(base_url=cluster.url("b"), headers={"X-API-Key": DIRECT_KEY}, timeout=10)
    full = {"texts": ["I loved it"] * Settings.from_env(cluster.env).max_batch_items}
    try:
        while load.poll() is None:
            series.append((round(time.monotonic() - started, 1), cluster.scalar(autoscaling)))
            recorded = cluster.query("sentimentalyzer:queue_depth:avg1m")  # the same, per pod
            per_pod = {r["metric"]["pod"]: float(r["value"][1]) for r in recorded} if recorded else per_pod
            # about a tenth of all answers, at least 10 a second, whatever the load's rate on this CPU
            # (60 requests/s on AVX-512, over 200 with bf16 on AMX): twice the alert's 5 %
            n = refusals_due(cluster, refused)
            assert {direct.post("/predict/batch", json=full).status_code for _ in range(n)} == {503}
            refused += n
            if not panels and time.monotonic() - started > seconds * 0.7:
                panels = {(title, expr): cluster.query(expr) for title, expr in dashboard_queries()}
            time.sleep(1)
    finally:
        direct.close()
        requests, failures = locust_totals(cluster, "load", load)
    empty = [key for key, result in panels.items() if not result]
    assert panels and not empty, f"dashboard queries with no data: {empty}"

    # every rule evaluated without error; every recorded series and every alert's signal has data
    time.sleep(2)  # one more evaluation after the load's last scrape
    evaluated = rules(cluster)
    assert evaluated and all(r["health"] == "ok" and not r.get("lastError") for r in evaluated), evaluated
    for rule in evaluated:
        if rule["type"] == "recording":
            assert cluster.query(rule["name"]), f"{rule['name']} recorded nothing"
        else:
            signal_expr = re.fullmatch(r"(.+?)\s*(?:>|<|>=|<=)\s*[0-9.]+", rule["query"]).group(1)
            assert cluster.query(signal_expr), f"{rule['name']}: {signal_expr} has no data"
    states = {r["name"]: r["state"] for r in evaluated if r["type"] == "alerting"}
    share = cluster.scalar("sentimentalyzer:predict_errors:ratio_rate5m")
    assert states["SentimentalyzerErrors5xx"] in ("pending", "firing"), (states, share)  # b's refusals, over 5 %

    values = [value for _, value in series if not math.isnan(value)]
    peak, pods = max(values), len(cluster.ports)
    cluster.measured.update(total=values[-1], per_pod=per_pod, threshold=threshold)
    print(
        f"\nload: {requests} requests in {seconds} s, {failures} failed; 503/504 share {share:.1%} (b refusing "
        f"full batches); autoscaling query each second {[round(v, 1) for v in values]} (target {threshold:g} x "
        f"{pods} pods); per pod at the end { ({k: round(v, 1) for k, v in per_pod.items()}) }"
    )
    assert peak / pods > threshold, f"queue per pod never passed the target {threshold}: {series}"


def refusals_due(cluster: Cluster, refused: int, share: float = 0.1) -> int:
    """How many refused requests bring b's refusals to `share` of every prediction answered so far."""
    answered = cluster.scalar(
        'sum(sentimentalyzer_requests_total{job="sentimentalyzer",endpoint=~"/predict|/predict/batch|/v2/models/sentiment/infer"})'
    )
    due = (share * (0 if math.isnan(answered) else answered) - refused) / (1 - share)
    return min(max(10, math.ceil(due)), 200)  # the cap bounds one tick's work if a scrape jumps


def one_limit(cluster: Cluster) -> tuple[int, int]:
    per_window = Settings.from_env(cluster.env).rate_limit_per_window
    assert per_window is not None
    return per_window


def test_autoscaling_query_falls_back_and_the_hpa_formula_follows(cluster: Cluster) -> None:
    assert "per_pod" in cluster.measured, "needs the load test before it"
    spec = one(cluster.objects, "ScaledObject")["spec"]
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    query, threshold = scaled_trigger(cluster.objects)["metadata"]["query"], cluster.measured["threshold"]
    started, after, per_pod_after = time.monotonic(), math.inf, {}
    while time.monotonic() - started < 90:
        after = cluster.scalar(query)
        per_pod_after = {
            r["metric"]["pod"]: float(r["value"][1]) for r in cluster.query("sentimentalyzer:queue_depth:avg1m")
        }
        if after / len(per_pod_after) < threshold:
            break
        time.sleep(1)
    fell_s = time.monotonic() - started
    # the HPA's formula on the scraped per-pod values: desired = ceil(current * average / target)
    under, settled = cluster.measured["per_pod"], per_pod_after
    desired_under = hpa_desired(len(under), sum(under.values()), threshold, low, high)
    desired_after = hpa_desired(len(settled), sum(settled.values()), threshold, low, high)
    total = cluster.measured["total"]
    print(
        f"\nautoscaling: under load {total:.1f} queued ({total / len(under):.1f} per pod, target {threshold:g}) "
        f"-> {desired_under} replicas; {fell_s:.0f} s after it {after:.1f} ({after / len(settled):.1f} per pod) "
        f"-> {desired_after} (the HPA then waits its 300 s scale-down window)"
    )
    assert after / len(settled) < threshold, f"still {after} queued 90 s after the load"
    expected_under = math.ceil(len(under) * (sum(under.values()) / len(under)) / threshold)
    assert desired_under == min(high, expected_under) > len(under)  # scales out
    # KEDA's AverageValue trigger says the same from the query's total: ceil(total / threshold)
    assert hpa_desired(len(under), total, threshold, low, high) == min(high, math.ceil(total / threshold))
    assert desired_after == low  # and back to the floor


def test_rolling_update_loses_no_request(cluster: Cluster) -> None:
    """As Kubernetes replaces a pod (the gpu overlay's order: maxSurge 0), one replica at a time: out of
    the Service's endpoints, the preStop pause, SIGTERM and uvicorn's drain, then the new pod started
    and routed to once /ready answers. Zero failures, and none saved by a retry: nginx would retry a
    refused or dropped request on the other replica, which kube-proxy would not."""
    grace = one(cluster.objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    budget = grace - prestop_s(api_container(cluster.objects))  # what the kubelet leaves uvicorn to drain
    access_log = cluster.tmp / "nginx" / "access.log"
    offset = access_log.stat().st_size
    load = locust(cluster, "rollout", 8, 2, 300)  # 16/s: what one replica computes alone, with room
    steps: list[str] = []
    try:
        time.sleep(3)
        for name in ("a", "b"):
            others = [n for n in cluster.ports if n != name]
            old = cluster.replicas[name]
            cluster.route_to(others)
            time.sleep(PRESTOP_S)
            t0 = time.monotonic()
            old.popen.send_signal(signal.SIGTERM)
            try:
                code = old.popen.wait(budget)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still draining after {budget} s:\n{old.tail()}")
            drained = time.monotonic() - t0
            old.stop()
            # uvicorn re-raises the SIGTERM it handled once shut down, so -15 is a clean exit too
            assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in old.text(), old.tail()
            t1 = time.monotonic()
            new = cluster.start_replica(name)  # the ConfigMap's settings: b gets its MAX_QUEUE back
            not_ready_seen = False
            while True:
                try:
                    if httpx.get(new.url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert new.popen.poll() is None, new.tail()
                assert time.monotonic() - t1 < 180, f"{name} not ready after 180 s"
                pod = f'pod="sentimentalyzer-{name}"'
                not_ready_seen |= bool(cluster.query(f"sentimentalyzer:replica:up_and_ready{{{pod}}} < 1"))
                time.sleep(0.5)
            started = time.monotonic() - t1
            cluster.route_to(list(cluster.ports))
            assert not_ready_seen, f"Prometheus never saw {name} down while it restarted"
            steps.append(f"{name}: drained in {drained:.1f} s, new one ready in {started:.1f} s")
        time.sleep(3)
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGTERM)  # Locust stops its users (--stop-timeout) and writes its stats
        requests, failures = locust_totals(cluster, "rollout", load)
    with access_log.open() as f:
        f.seek(offset)
        lines = [m.groupdict() for m in map(ACCESS.search, f) if m]
    statuses = sorted({line["status"] for line in lines})
    retried = [line for line in lines if "," in line["upstream"]]
    print(f"\nrollout: {requests} requests, {failures} failed, {len(retried)} retried by nginx; " + "; ".join(steps))
    assert requests > 0 and failures == 0
    assert statuses == ["200"] and not retried, (statuses, retried[:5])
    assert len(lines) == requests  # nginx answered every request Locust counted, each once
    cluster.measured["rollout"] = (requests, failures)


ACCESS = re.compile(r'"POST /predict HTTP/[\d.]+" (?P<status>\d{3}) \d+ rt=\S+ upstream=(?P<upstream>.*?) ut=')
