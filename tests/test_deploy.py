"""deploy/: the dashboard and scrape config read real metric names, and the compose stack is wired up.

    pytest tests/test_deploy.py -q

No Docker engine runs here, so images are neither built nor started: the compose file is checked as
YAML (and with `docker compose config` or `docker-compose config` when a client is installed), the
Dockerfile as text against the code it copies and the settings it sets, and nginx.conf is run for real
by tests/test_scaleout.py.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

import batched_server
from serving.settings import Settings
from tests.conftest import serving
from tests.test_k8s import dockerfile_cmd, dockerfile_env, duration_s, graceful_shutdown_s, grpc_stop_s
from tests.test_ops import metric_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sentimentalyzer.json"
REPLICAS = {"api1", "api2"}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.anyio
async def test_dashboard_queries_only_metrics_the_servers_export(attached_settings: Settings) -> None:
    async with serving(batched_server.create_app(attached_settings)) as client:
        await client.post("/predict", json={"text": "I loved it"})
        exported = metric_names((await client.get("/metrics")).text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bsentimentalyzer_\w+", e)}
    assert used - exported == set()
    for needed in (
        "requests_total",
        "request_latency_seconds_bucket",
        "batch_size_bucket",
        "queue_wait_seconds_bucket",
        "compute_seconds_bucket",
        "queue_depth",
        "real_tokens_total",
        "computed_tokens_total",
        "dropped_total",
        "ready",
        "engine_up",
        "engine_restarts_total",
    ):
        assert f"sentimentalyzer_{needed}" in used, needed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(e.count("(") == e.count(")") for e in exprs)


def nginx_blocks(text: str, head: str) -> list[str]:
    """The bodies of every `head {...}` block of an nginx config (nested blocks included in them)."""
    text = re.sub(r"#.*", "", text)  # comments may hold braces and directives' names
    bodies = []
    for match in re.finditer(rf"(?:^|[;{{}}\s]){re.escape(head)}\s*\{{", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        bodies.append(text[match.end() : end - 1])
    return bodies


def test_prometheus_and_nginx_target_every_replica_and_only_those() -> None:
    services = compose()["services"]
    port = re.search(r"^ENV .*\bPORT=(\d+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    replicas = {f"{name}:{port}" for name in services if name.startswith("api")}
    assert {r.split(":")[0] for r in replicas} == REPLICAS
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert [c["metrics_path"] for c in scrape] == ["/metrics"]
    assert set(scrape[0]["static_configs"][0]["targets"]) == replicas
    conf = (DEPLOY / "nginx.conf").read_text()
    [upstream] = nginx_blocks(conf, "upstream sentimentalyzer")
    assert set(re.findall(r"server (\S+?)\s", upstream)) == replicas
    # gRPC: each replica's GRPC_PORT (the image's, unless compose sets another), and only those
    grpc_ports = {
        Settings.from_env(
            {**dockerfile_env(), **{k: compose_value(v) for k, v in services[name]["environment"].items()}}
        ).grpc_port
        for name in REPLICAS
    }
    [grpc_port] = grpc_ports  # one port for both: nginx.conf names it per server line
    assert grpc_port and str(grpc_port) != port  # on by default, beside HTTP
    [grpc_upstream] = nginx_blocks(conf, "upstream sentimentalyzer_grpc")
    assert set(re.findall(r"server (\S+?)\s", grpc_upstream)) == {f"{name}:{grpc_port}" for name in REPLICAS}
    # HTTP on one listener to the HTTP upstream, gRPC (HTTP/2 without TLS) on another to the gRPC one
    servers = {}
    for server in nginx_blocks(conf, "server"):
        [listen] = re.findall(r"\blisten ([^;]+);", server)
        servers[listen] = server
    http = [s for listen, s in servers.items() if "http2" not in listen.split()]
    grpc = [s for listen, s in servers.items() if "http2" in listen.split()]
    assert len(http) == len(grpc) == 1
    assert re.findall(r"\bproxy_pass (\S+);", http[0]) == ["http://sentimentalyzer"] and "grpc_pass" not in http[0]
    assert re.findall(r"\bgrpc_pass (\S+);", grpc[0]) == ["grpc://sentimentalyzer_grpc"]
    assert "proxy_pass" not in grpc[0]
    # compose publishes nginx's listeners, each on its own number, and nothing else of nginx
    listened = {listen.split()[0] for listen in servers}
    assert set(services["nginx"]["ports"]) == {f"{p}:{p}" for p in listened}
    # the image declares both of its ports
    [exposed] = re.findall(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert sorted(exposed.split()) == sorted([port, str(grpc_port)])


def test_compose_wires_redis_health_and_mounted_files() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == REPLICAS | {"redis", "nginx", "prometheus", "grafana"}
    for name in REPLICAS:
        env = services[name]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:")  # one store for every replica: shared limits
        assert env["LOG_FORMAT"] == "json"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "ports" not in services[name]  # only nginx is reachable, so X-Forwarded-For can be trusted
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in spec["volumes"], source
    assert "/ready" in re.search(r"^HEALTHCHECK.*(?:\n .*)*", (DEPLOY / "Dockerfile").read_text(), re.M).group(0)
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/sentimentalyzer.yml").read_text())
    mounted = services["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provisioned['providers'][0]['options']['path']}:ro" in mounted


def compose_value(value: object) -> str:
    """A compose environment value as the stack gets it with nothing exported: ${VAR:-default} is default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_replicas_run_valid_engine_settings_on_a_fresh_tmp() -> None:
    services = compose()["services"]
    image = dockerfile_env()
    known = {name.upper() for name in Settings.__dataclass_fields__}
    for name in REPLICAS:
        service = services[name]
        env = {key: compose_value(value) for key, value in service["environment"].items()}
        assert set(env) - known <= set(image), "neither a setting nor read by the image's CMD"
        settings = Settings.from_env({**image, **env})  # ENGINE_* included: a bad value names its variable
        assert not settings.engine_factory  # tests only: the image has no tests/ to load it from
        assert "ENGINE_CPUS" not in env  # core numbers are the host's: give a replica cores with cpuset
        assert settings.engine_stall_s > settings.request_timeout_s  # a slow pass is not a stalled one
        # the engine's socket (and its lock beside it) and the metrics files start afresh with the container
        for path in (settings.engine_socket, image["PROMETHEUS_MULTIPROC_DIR"]):
            assert any(path.startswith(mount.rstrip("/") + "/") for mount in service["tmpfs"]), path
        # with WORKERS > 1 an engine orphaned by its dead worker goes to PID 1, which must reap it
        assert service["init"] is True
        # docker stop waits for uvicorn's drain (the engine drains behind it), then the gRPC server's
        # stop (calls in flight finish), before it kills
        assert duration_s(service["stop_grace_period"]) >= graceful_shutdown_s() + grpc_stop_s(settings) + 5


def distribution(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def test_the_image_holds_the_serving_code_and_everything_it_imports() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = [source for line in re.findall(r"^COPY (.+)$", text, re.M) for source in line.split()[:-1]]
    assert copied == ["requirements.txt", "naive_server.py", "batched_server.py", "batcher.py", "serving/"]
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line[:1] == "!"]
    assert sorted(allowed) == sorted(copied)  # the build context holds nothing else (no harness/, no tests/)
    # the engine process runs from the copied tree: `python -m serving.engine_core`
    assert (ROOT / "serving" / "engine_core.py").is_file()
    modules: set[str] = set()
    for path in [ROOT / c for c in copied[1:-1]] + sorted((ROOT / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {"serving", "batcher", "batched_server", "naive_server"}
    assert modules & {"harness", "tests", "locust"} == set()  # nothing the image leaves out
    required = {
        distribution(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    installed = packages_distributions()
    for module in sorted(modules - local - set(sys.stdlib_module_names)):
        provided_by = {distribution(d) for d in installed.get(module, [module])}
        assert provided_by & required, f"{module}: not in requirements.txt"
    assert {"pyzmq", "msgspec"} <= required  # the front ends' and the engine's socket and frames
    assert re.search(r"\bexec uvicorn ", dockerfile_cmd()) and "uvicorn" in required
    # the front ends' metrics files of a previous run are gone before the first worker starts
    assert dockerfile_cmd().index('rm -rf "$PROMETHEUS_MULTIPROC_DIR"') < dockerfile_cmd().index("exec uvicorn")


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_passes_the_compose_client() -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose plugin or Debian's docker-compose): YAML checks only")
    checked = subprocess.run(
        [*client, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
