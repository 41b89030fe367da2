"""deploy/k8s/: both overlays render, validate against the published schemas, and agree with the app.

    pytest tests/test_k8s.py -q                         # ~30 s: one in-process server, its engine killed once
    pytest tests/test_k8s.py -q -s -m slow -k sizing    # the RSS behind the resource figures (3-6 min)
    pytest tests/test_k8s.py -q -s -m slow -k steps     # README "Scaling out": process, workers, replicas (~6 min)

Needs kubectl (its built-in kustomize, v4 or later), promtool (apt: prometheus), node and the CRD
validators: `npm ci --prefix tests/data/crd-validators` (`make test` runs it). No cluster runs here: what
is checked is the rendered YAML against the Kubernetes API schemas (kubernetes-validate, strict: an
unknown field fails), the custom resources against the CRD schemas of pinned prometheus-operator and
KEDA releases, and every value the app reads against the app itself (Settings, the Dockerfile, the
routes, the engine's core plan), and the probes against a server whose engine is killed.
tests/test_cluster.py runs the same settings as processes: probes, Prometheus, a rollout.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import batched_server
from serving import guard
from serving.cores import plan_cores
from serving.settings import Settings
from tests.conftest import serving
from tests.processes import ROOT, Proc, environ, free_port, need, start_nginx

K8S = ROOT / "deploy" / "k8s"
SERVICE_PY = ROOT / "serving" / "service.py"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the API the manifests are written for (kubectl here is v1.32)
CRD_VALIDATORS = ROOT / "tests" / "data" / "crd-validators"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
EXPECTED = {
    ("Namespace", "sentimentalyzer"),
    ("Secret", "sentimentalyzer-api-keys"),
    ("ConfigMap", "sentimentalyzer-settings"),
    ("Deployment", "sentimentalyzer"),
    ("Service", "sentimentalyzer"),
    ("PodDisruptionBudget", "sentimentalyzer"),
    ("ServiceMonitor", "sentimentalyzer"),
    ("PrometheusRule", "sentimentalyzer"),
    ("ScaledObject", "sentimentalyzer"),
    ("Deployment", "sentimentalyzer-redis"),
    ("Service", "sentimentalyzer-redis"),
    ("NetworkPolicy", "sentimentalyzer-redis"),
}


def kubectl() -> str:
    binary = need("kubectl", "kubernetes-client")
    version = json.loads(subprocess.run([binary, "version", "--client", "-o", "json"], capture_output=True).stdout)
    kustomize = version.get("kustomizeVersion", "v0")
    # Debian bookworm's kubernetes-client (1.20) embeds kustomize v2.0.3, which lacks `labels`,
    # `patches` and generator `envs`: say so rather than fail on a parse error
    assert int(kustomize.lstrip("v").split(".")[0]) >= 4, f"kubectl {binary} has kustomize {kustomize}; v4+ needed"
    return binary


def render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str, name: str = "sentimentalyzer") -> dict[str, Any]:
    """The object of that kind and name (a generated ConfigMap: that name plus kustomize's hash)."""
    pattern = rf"{re.escape(name)}(-[a-z0-9]{{10}})?" if kind == "ConfigMap" else re.escape(name)
    [found] = [o for o in objects if o["kind"] == kind and re.fullmatch(pattern, o["metadata"]["name"])]
    return found


def api_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """What a pod's environment holds of the settings: the ConfigMap it loads, then its API_KEYS."""
    container = api_container(objects)
    configmap = one(objects, "ConfigMap", "sentimentalyzer-settings")
    [source] = container["envFrom"]
    assert source["configMapRef"]["name"] == configmap["metadata"]["name"]  # kustomize added the same hash
    env = dict(configmap["data"])
    secret = one(objects, "Secret", "sentimentalyzer-api-keys")
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            env[var["name"]] = secret["stringData"][ref["key"]]
    return env


SETTING_NAMES = {name.upper() for name in Settings.__dataclass_fields__}


def pod_settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """settings_env plus the settings the container sets itself (ENGINE_THREADS sits beside the CPU it
    divides), which win over the ConfigMap's as a pod's env wins over its envFrom."""
    env = settings_env(objects)
    for var in api_container(objects)["env"]:
        if var["name"] in SETTING_NAMES and "value" in var:
            env[var["name"]] = var["value"]
    return env


def pod_settings(objects: list[dict[str, Any]]) -> Settings:
    """What the server in the pod reads: the image's ENV under the pod's own."""
    return Settings.from_env({**dockerfile_env(), **pod_settings_env(objects)})


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def dockerfile() -> str:
    return (ROOT / "deploy" / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    pairs: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", dockerfile(), re.M):
        pairs.update(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))
    return pairs


def dockerfile_cmd() -> str:
    """The shell line of `CMD ["sh", "-c", LINE]`."""
    [cmd] = re.findall(r"^CMD (\[.*\])$", dockerfile(), re.M)
    sh, dash_c, line = json.loads(cmd)
    assert (sh, dash_c) == ("sh", "-c")
    return line


def container_ports(container: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The api container's ports, exactly two: http (PORT) first, then grpc (GRPC_PORT)."""
    http, grpc = container["ports"]
    assert (http["name"], grpc["name"]) == ("http", "grpc")
    return http, grpc


def graceful_shutdown_s() -> float:
    return float(re.search(r"--timeout-graceful-shutdown (\d+)", dockerfile_cmd()).group(1))


def grpc_stop_s(settings: Settings) -> float:
    """How long the gRPC server's stop may take (calls in flight finish): it comes after uvicorn's HTTP
    drain, in the app's lifespan shutdown (serving/service.py); 0 without GRPC_PORT."""
    m = re.search(r"grpc_server\.stop\(grpc, current\.request_timeout_s \+ ([0-9.]+)\)", SERVICE_PY.read_text())
    assert m, "serving/service.py no longer stops gRPC with REQUEST_TIMEOUT_MS + a margin: update grpc_stop_s"
    return settings.request_timeout_s + float(m.group(1)) if settings.grpc_port else 0.0


def prestop_s(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_both_overlays_render_the_same_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        names = {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in objects}
        assert names == EXPECTED, overlay
        for o in objects:  # one namespace for everything namespaced
            if o["kind"] != "Namespace":
                assert o["metadata"]["namespace"] == "sentimentalyzer", (overlay, o["kind"])
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sentimentalyzer"


def test_every_object_validates_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        for o in objects:
            if o["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay} {o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # the validator is awake: a misspelled field and a wrong type both fail
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def validate_custom(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = need("node", "nodejs")
    if not (CRD_VALIDATORS / "node_modules").is_dir():
        pytest.skip(f"CRD validators not installed: npm ci --prefix {CRD_VALIDATORS.relative_to(ROOT)}")
    done = subprocess.run(
        [node, str(CRD_VALIDATORS / "validate.mjs")], input=json.dumps(objects), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_custom_resources_validate_against_their_published_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # versions: tests/data/crd-validators/package.json (prometheus-operator v0.90.1, KEDA v2.10.1)
    for overlay, objects in rendered.items():
        custom = [o for o in objects if o["kind"] in CUSTOM_KINDS]
        assert {o["kind"] for o in custom} == CUSTOM_KINDS
        results = validate_custom(custom)
        assert [r["error"] for r in results] == [None] * len(custom), (overlay, results)
    # and they do reject: a threshold that is not a string (KEDA reads strings) and a bad scrape interval
    scaled = copy.deepcopy(one(rendered["cpu"], "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 16
    monitor = copy.deepcopy(one(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert all(r["error"] for r in validate_custom([scaled, monitor]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_is_real_and_valid(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    env = settings_env(rendered[overlay])
    known = SETTING_NAMES
    assert set(env) - known == set(), "not settings of serving/settings.py"
    Settings.from_env(env)  # raises SettingsError naming the variable on a bad value
    settings = pod_settings(rendered[overlay])  # and with the container's own settings and the image's
    assert settings.model_fallback is False  # a pod that cannot load the model must not serve random weights
    assert settings.log_format == "json"
    assert settings.api_keys and settings.rate_limit is not None
    redis = one(rendered[overlay], "Service", "sentimentalyzer-redis")
    assert settings.redis_url == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    assert settings.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]
    assert not settings.engine_factory  # tests only: the image has no tests/ to load it from
    # a pass may legitimately run up to the deadline on a busy node; only one far past it is stalled
    assert settings.engine_stall_s > settings.request_timeout_s
    # every other variable of the container is one the image's CMD reads
    others = {v["name"] for v in api_container(rendered[overlay])["env"]} - known
    assert others <= set(dockerfile_env()), others


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_runs_the_dockerfiles_cmd(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    container = api_container(rendered[overlay])
    assert "command" not in container and "args" not in container  # the image's CMD, unchanged
    line = dockerfile_cmd()
    assert re.search(r'exec uvicorn "\$APP" .*--port "\$PORT" --workers "\$WORKERS"', line), line
    env = {v["name"]: v.get("value") for v in container["env"]}
    image_env = dockerfile_env()
    assert env["APP"] == "batched_server:app" and hasattr(batched_server, "app")
    http, grpc = container_ports(container)
    assert str(http["containerPort"]) == env["PORT"] == image_env["PORT"]
    # gRPC (GRPC_PORT) on the container's second port: what the server in the pod reads, as the image sets it
    assert str(grpc["containerPort"]) == env["GRPC_PORT"] == image_env["GRPC_PORT"]
    assert pod_settings(rendered[overlay]).grpc_port == grpc["containerPort"] != http["containerPort"]
    assert container["image"].split(":")[0] == "sentimentalyzer"  # what deploy/Dockerfile's header tags
    # the read-only root filesystem leaves writable exactly what the image writes to: the engine's
    # socket and its lock file beside it included, or the first front end could not start the engine
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    socket = pod_settings(rendered[overlay]).engine_socket
    assert socket.startswith("/") and len(socket.encode()) < 108, socket  # an AF_UNIX path (sun_path)
    for path in (image_env["PROMETHEUS_MULTIPROC_DIR"], image_env["HF_HOME"], socket):
        assert any(path.startswith(m + "/") for m in mounts), path
    pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    uid = re.search(r"useradd .*--uid (\d+) app", dockerfile()).group(1)
    assert str(pod["securityContext"]["runAsUser"]) == uid


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_threads_and_front_ends_divide_the_cpu_limit(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = api_container(rendered[overlay])
    resources = container["resources"]
    limit = cpu_cores(resources["limits"]["cpu"])
    assert cpu_cores(resources["requests"]["cpu"]) == limit == int(limit)  # Guaranteed QoS, whole cores
    cores = int(limit)
    settings = pod_settings(rendered[overlay])
    # set, not 0 (auto): auto plans from the cores the process may run on, which in a pod are the
    # node's unless the static CPU manager pins it, and would start a thread for each under this limit
    assert settings.engine_threads >= 1
    # core numbers in a pod are the node's, unknown when the manifest is written (Settings has already
    # parsed any value through parse_cpus; plan_cores would refuse cores the pod was not given)
    assert settings.engine_cpus == ""
    assert settings.dtype != "auto"  # the plan depends on the dtype, and auto resolves per node
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # plan_cores takes it over the core count
    auto = plan_cores(settings.replace(engine_threads=0), range(cores), (settings.backend, settings.dtype))
    # at most what the engine would take on a machine of the limit's cores, never more than the limit
    assert settings.engine_threads <= auto.threads <= cores, auto
    # one front end per core that plan leaves them; on 2 cores none is left (they share), so one
    left = cores - (len(auto.cpus) or cores)
    workers = int(next(v["value"] for v in container["env"] if v["name"] == "WORKERS"))
    assert 1 <= workers <= max(1, left), (workers, auto)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_routes_the_app_serves(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    container = api_container(rendered[overlay])
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: p["path"] for k, p in probes.items()} == {
        "startupProbe": "/ready",
        "readinessProbe": "/ready",
        "livenessProbe": "/health",
    }
    assert {p["port"] for p in probes.values()} == {container_ports(container)[0]["name"]}  # HTTP's
    routes = {r.path for r in batched_server.create_app(Settings()).routes}
    assert {"/ready", "/health", "/metrics"} <= routes
    assert {"/ready", "/health"} <= guard.EXEMPT_PATHS  # probes carry no key
    # the startup budget covers what the image's HEALTHCHECK allows for load and warm-up
    startup = container["startupProbe"]
    start_period = re.search(r"--start-period=(\d+)s", dockerfile()).group(1)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= int(start_period)
    assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] >= 60


@pytest.mark.anyio
async def test_liveness_holds_and_readiness_drops_while_the_engine_restarts(
    rendered: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    """The probes' paths against a server whose engine is killed: the front end restarts the engine,
    so the kubelet must take the pod out of the Service meanwhile and must not restart the container."""
    container = api_container(rendered["cpu"])
    live, ready = container["livenessProbe"], container["readinessProbe"]
    live_path, ready_path = live["httpGet"]["path"], ready["httpGet"]["path"]
    lives, readies, refused = [], [], None
    async with serving(batched_server.create_app(settings)) as client:
        first = (await client.get(ready_path)).json()["engine_pid"]
        os.kill(first, signal.SIGKILL)  # from outside, as the OOM killer would
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            asked = time.monotonic()
            alive = await client.get(live_path)
            lives.append((alive.status_code, time.monotonic() - asked))
            answer = await client.get(ready_path)
            readies.append(answer.status_code)
            if answer.status_code == 503 and refused is None:
                refused = await client.post("/predict", json={"text": "while it restarts"})
            if answer.status_code == 200 and answer.json()["engine_pid"] != first:
                break
            await asyncio.sleep(0.05)
        metrics = {
            s.name: s.value
            for family in text_string_to_metric_families((await client.get("/metrics")).text)
            for s in family.samples
        }
    assert {status for status, _ in lives} == {200}, "the liveness probe failed while the engine restarted"
    assert max(took for _, took in lives) < live["timeoutSeconds"]
    assert 503 in readies and readies[-1] == 200, readies  # out of the Service, then back with a new engine
    assert refused is not None and refused.status_code in (200, 503)  # 200 only if the new engine was warm
    if refused.status_code == 503:
        assert "Retry-After" in refused.headers
    # what the alerts read (deploy/prometheus-rules.yml): one restart, and the engine up again
    assert metrics["sentimentalyzer_engine_restarts_total"] == 1
    assert metrics["sentimentalyzer_engine_up"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_prestop_pause_and_the_drain(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    container = api_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    settings = Settings.from_env(settings_env(objects))
    pause, drain = prestop_s(container), graceful_shutdown_s()
    # a request queued at SIGTERM is answered (or 504) within REQUEST_TIMEOUT_MS, inside uvicorn's own cap
    assert drain >= settings.request_timeout_s + 5
    # the grace period counts from deletion, the preStop pause included; then uvicorn's HTTP drain, the
    # gRPC server's stop (GRPC_PORT is set in the pod), and 5 s left for the process to exit
    grpc_stop = grpc_stop_s(pod_settings(objects))
    assert grpc_stop > 0
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + grpc_stop + 5
    assert pause >= 5  # endpoint removal reaches every kube-proxy and ingress in a few seconds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_every_pod_with_a_key(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    service, monitor = one(objects, "Service"), one(objects, "ServiceMonitor")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port, grpc = service["spec"]["ports"]
    http_target, grpc_target = container_ports(api_container(objects))
    assert port["targetPort"] == http_target["name"] and port["name"] == "http"
    # gRPC by the container's port name; h2c: plaintext HTTP/2, for meshes and gateways that read it
    assert (grpc["name"], grpc["targetPort"], grpc["appProtocol"]) == ("grpc", grpc_target["name"], "kubernetes.io/h2c")
    assert grpc["port"] != port["port"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    credentials = endpoint["authorization"]["credentials"]
    secret = one(objects, "Secret", credentials["name"])
    assert secret["stringData"][credentials["key"]] in Settings.from_env(settings_env(objects)).api_keys
    # the budget covers these pods, and only these pods may reach Redis
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(objects, "NetworkPolicy", "sentimentalyzer-redis")["spec"]
    redis_pods = one(objects, "Deployment", "sentimentalyzer-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pods.items()
    [allowed] = policy["ingress"][0]["from"]
    assert allowed["podSelector"]["matchLabels"].items() <= pod_labels.items()


def scaled_trigger(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [trigger] = one(objects, "ScaledObject")["spec"]["triggers"]
    return trigger


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_reads_the_queue_of_these_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    scaled, deployment = one(objects, "ScaledObject"), one(objects, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert scaled["spec"]["minReplicaCount"] >= 2 > one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    trigger = scaled_trigger(objects)
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"  # per pod; fallback needs it
    query = trigger["metadata"]["query"]
    selectors = dict(re.findall(r'(\w+)="([^"]*)"', query))
    assert selectors == {
        "namespace": deployment["metadata"]["namespace"],
        "job": one(objects, "Service")["metadata"]["name"],
    }
    assert re.findall(r"sentimentalyzer_\w+", query) == ["sentimentalyzer_queue_depth"]
    assert "queue_depth = Gauge" in (ROOT / "serving" / "ops.py").read_text().replace("self.", "")
    assert float(trigger["metadata"]["threshold"]) == {"cpu": 16, "gpu": 256}[overlay]


def hpa_desired(current: int, total: float, target: float, low: int, high: int, tolerance: float = 0.1) -> int:
    """The HPA's replica count for an AverageValue metric (what KEDA's trigger becomes): the ratio of the
    per-pod average to the target, left alone within the tolerance (kube-controller-manager's 0.1)."""
    ratio = (total / current) / target
    desired = current if abs(ratio - 1) <= tolerance else int(-(-current * ratio // 1))
    return max(low, min(high, desired))


def test_hpa_formula() -> None:
    assert hpa_desired(2, 80, 16, 2, 8) == 5  # 40 per pod, 2.5x the target
    assert hpa_desired(2, 34, 16, 2, 8) == 2  # 6 % over: inside the tolerance
    assert hpa_desired(2, 36, 16, 2, 8) == 3  # 12.5 % over: ceil(2.25)
    assert hpa_desired(4, 10, 16, 2, 8) == 2  # ceil(0.625) = 1, held at minReplicaCount
    assert hpa_desired(2, 1000, 16, 2, 8) == 8  # held at maxReplicaCount


def prometheus_rules() -> list[dict[str, Any]]:
    return yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yml").read_text())["groups"]


def alert_signals() -> dict[str, tuple[str, str, float]]:
    """alert name -> (signal, operator, threshold): every alert is `<signal> <op> <number>`."""
    out = {}
    for group in prometheus_rules():
        for rule in group["rules"]:
            if "alert" in rule:
                m = re.fullmatch(r"(.+?)\s*(>|<|>=|<=)\s*([0-9.]+)", rule["expr"].strip())
                assert m, rule["expr"]
                out[rule["alert"]] = (m.group(1), m.group(2), float(m.group(3)))
    return out


def duration_s(text: str) -> float:
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", text))


def test_alert_rules_are_one_set_and_agree_with_the_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for objects in rendered.values():
        assert one(objects, "PrometheusRule")["spec"]["groups"] == prometheus_rules()
    signals = alert_signals()
    assert set(signals) == {
        "SentimentalyzerQueueSaturating",
        "SentimentalyzerErrors5xx",
        "SentimentalyzerReplicaNotReady",
        "SentimentalyzerLatencyP99High",
        "SentimentalyzerEngineDown",
        "SentimentalyzerEngineRestarting",
    }
    recorded = {r["record"]: r["expr"] for g in prometheus_rules() for r in g["rules"] if "record" in r}
    assert {signal for signal, _, _ in signals.values()} <= set(recorded)
    # the engine alerts read the front end's own metrics of the engine (it answers scrapes while the
    # engine is down): the gauge that /ready follows and the supervisor's restart counter
    metrics = {s: re.findall(r"\bsentimentalyzer_\w+", recorded[s]) for s in recorded}
    assert metrics[signals["SentimentalyzerEngineDown"][0]] == ["sentimentalyzer_engine_up"]
    assert metrics[signals["SentimentalyzerEngineRestarting"][0]] == ["sentimentalyzer_engine_restarts_total"]
    alerts = {r["alert"]: r for g in prometheus_rules() for r in g["rules"] if "alert" in r}
    # the engine's alert comes first and says why; the pod's not-ready alert follows
    engine_down, not_ready = alerts["SentimentalyzerEngineDown"], alerts["SentimentalyzerReplicaNotReady"]
    assert duration_s(engine_down["for"]) < duration_s(not_ready["for"])
    settings = Settings.from_env(settings_env(rendered["cpu"]))
    assert signals["SentimentalyzerQueueSaturating"][2] == settings.request_timeout_s / 2
    assert signals["SentimentalyzerLatencyP99High"][2] < settings.request_timeout_s
    # the compose stack's Prometheus loads the same file
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    mounted = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounted["./prometheus-rules.yml"] in scrape["rule_files"]


def test_promtool_checks_the_rules_and_passes_their_unit_tests() -> None:
    promtool = need("promtool", "prometheus")
    deploy = ROOT / "deploy"
    for args in (["check", "rules", "prometheus-rules.yml"], ["test", "rules", "prometheus-rules.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=deploy, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_overlay_asks_for_one_gpu_on_gpu_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu"]
    container = api_container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    settings = Settings.from_env(settings_env(objects))
    assert (settings.device, settings.dtype) == ("cuda", "fp16")
    # no spare GPU to surge onto: one pod down at a time, never one extra
    rolling = one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
    assert one(rendered["cpu"], "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1,
        "maxUnavailable": 0,
    }
    assert "nvidia.com/gpu" not in api_container(rendered["cpu"])["resources"]["limits"]


def memory_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) << {"Mi": 20, "Gi": 30}[unit]


@pytest.mark.slow
def test_sizing_measured_rss_fits_the_memory_limit(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The stand-in (the real model's architecture and size) under the reviews corpus, then under the
    heaviest batches the settings admit (MAX_BATCH_ITEMS texts of 512+ tokens), on the CPU settings."""
    psutil = pytest.importorskip("psutil")
    # REQUEST_TIMEOUT_MS raised so that the heaviest batch is computed even on a slow shared machine
    env = {**pod_settings_env(rendered["cpu"]), "MODEL_ID": "stand-in", "REQUEST_TIMEOUT_MS": "300000"}
    env["GRPC_PORT"] = str(free_port())  # served as in the pod, on a port free here
    for name in ("REDIS_URL", "API_KEYS", "RATE_LIMIT"):  # no Redis or keys needed to measure memory
        env.pop(name)
    proc = Proc.uvicorn(
        "batched_server:app", tmp_path / "standin.log", environ(env, drop=("PROMETHEUS_MULTIPROC_DIR",))
    )
    done = threading.Event()
    try:
        proc.wait_ready(timeout_s=600)
        process = psutil.Process(proc.popen.pid)
        # the front end and the engine process it started, which holds the model: the pod's memory
        processes = [process, *process.children(recursive=True)]
        assert len(processes) >= 2, "no engine process beside the front end"

        def rss() -> int:
            return sum(p.memory_info().rss for p in processes)

        idle = rss()
        peak = [idle]

        def watch() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started, cpu0 = time.monotonic(), sum(sum(p.cpu_times()[:2]) for p in processes)
        locust = subprocess.run(
            [*locust_command(proc.url, 32, 20), "--csv", str(tmp_path / "sizing")], cwd=ROOT, capture_output=True
        )
        assert locust.returncode == 0, locust.stderr[-2000:]
        cores = (sum(sum(p.cpu_times()[:2]) for p in processes) - cpu0) / (time.monotonic() - started)
        corpus_peak = peak[0]
        texts = ["a long review that goes on and on " * 80] * Settings().max_batch_items
        for _ in range(3):
            assert httpx.post(f"{proc.url}/predict/batch", json={"texts": texts}, timeout=300).status_code == 200
    finally:
        done.set()
        proc.stop()
    limit = memory_bytes(api_container(rendered["cpu"])["resources"]["limits"]["memory"])
    print(
        f"\nsizing: idle {idle / 2**20:.0f} MiB, corpus peak {corpus_peak / 2**20:.0f} MiB, "
        f"long-batch peak {peak[0] / 2**20:.0f} MiB, {cores:.2f} cores busy under 32 users; limit {limit >> 20} MiB"
    )
    assert peak[0] < 0.8 * limit  # 20 % headroom over the worst measured


def locust_command(url: str, users: int, seconds: int, *extra: str) -> list[str]:
    """Locust headless on locustfile.py, as harness/bench.py runs it."""
    return [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless", "-u", str(users),
        "-r", str(users), "-t", f"{seconds}s", "--host", url, "--only-summary", "--exit-code-on-error", "0",
        "--stop-timeout", "10", *extra,
    ]  # fmt: skip


def serve_and_measure(name: str, url: str, roots: list[Proc], tmp: Path) -> dict[str, Any]:
    """32 closed-loop users for 20 s on url: requests/s, p50 and p99 from Locust, RSS of every process."""
    psutil = pytest.importorskip("psutil")
    done = subprocess.run([*locust_command(url, 32, 20), "--json-file", str(tmp / name)], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    [entry] = json.loads((tmp / f"{name}.json").read_text())
    times = sorted((float(ms), n) for ms, n in entry["response_times"].items())

    def quantile(q: float) -> float:
        seen = 0
        for ms, n in times:
            seen += n
            if seen >= q * entry["num_requests"]:
                return ms
        return math.nan

    processes = [psutil.Process(p.popen.pid) for p in roots]
    processes += [c for p in processes for c in p.children(recursive=True)]
    return {
        "step": name,
        "req_s": entry["num_requests"] / (entry["last_request_timestamp"] - entry["start_time"]),
        "p50_s": quantile(0.5) / 1000,
        "p99_s": quantile(0.99) / 1000,
        "failures": entry["num_failures"],
        "rss_mib": sum(p.memory_info().rss for p in processes) / 2**20,
    }


@pytest.mark.slow
def test_scaling_out_steps_on_one_machine(tmp_path: Path) -> None:
    """deploy/k8s/README.md "Scaling out": one front end, `--workers 2` (two front ends, still one
    engine), two replicas behind nginx, on this machine's cores, the stand-in on CPU. torch gets the
    same cores in all three (one engine on 2 threads, or two on 1 each)."""
    base = {"MODEL_ID": "stand-in", "DEVICE": "cpu", "DTYPE": "fp32", "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
    rows = []
    one_process = Proc.uvicorn(
        "batched_server:app",
        tmp_path / "one.log",
        environ({**base, "OMP_NUM_THREADS": "2"}, drop=("PROMETHEUS_MULTIPROC_DIR",)),
    )
    try:
        one_process.wait_ready(timeout_s=600)
        rows.append(serve_and_measure("one process", one_process.url, [one_process], tmp_path))
    finally:
        one_process.stop()
    (tmp_path / "multiproc").mkdir()
    workers = Proc.uvicorn(
        "batched_server:app",
        tmp_path / "workers.log",
        environ({**base, "OMP_NUM_THREADS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc")}),
        workers=2,
    )
    try:
        workers.wait_ready(timeout_s=600)
        time.sleep(5)  # /ready answers once one front end is attached; let the other hear the engine too
        rows.append(serve_and_measure("--workers 2", workers.url, [workers], tmp_path))
    finally:
        workers.stop()
    env = environ({**base, "OMP_NUM_THREADS": "1"}, drop=("PROMETHEUS_MULTIPROC_DIR",))
    replicas = [Proc.uvicorn("batched_server:app", tmp_path / f"replica-{i}.log", env) for i in range(2)]
    nginx = None
    try:
        for replica in replicas:
            replica.wait_ready(timeout_s=600)
        nginx, url = start_nginx(tmp_path / "nginx", [r.url.removeprefix("http://") for r in replicas])
        rows.append(serve_and_measure("2 replicas + nginx", url, replicas, tmp_path))
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()
    print("\n| step | req/s | p50 s | p99 s | failures | RSS MiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        figures = f"{r['req_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['failures']} | {r['rss_mib']:.0f}"
        print(f"| {r['step']} | {figures} |")
    assert [r["failures"] for r in rows] == [0, 0, 0]
