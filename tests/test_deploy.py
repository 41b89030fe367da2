"""deploy/: the dashboard and scrape config read real metric names, and the compose stack is wired up.

    pytest tests/test_deploy.py -q

No Docker engine runs here, so images are neither built nor started: the compose file is checked as
YAML (and with `docker compose config` or `docker-compose config` when a client is installed), and
nginx.conf is run for real by tests/test_scaleout.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import batched_server
from serving.settings import Settings
from tests.conftest import serving
from tests.test_ops import metric_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sentimentalyzer.json"
REPLICAS = {"api1", "api2"}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.anyio
async def test_dashboard_queries_only_metrics_the_servers_export(settings: Settings) -> None:
    async with serving(batched_server.create_app(settings)) as client:
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
    ):
        assert f"sentimentalyzer_{needed}" in used, needed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(e.count("(") == e.count(")") for e in exprs)


def test_prometheus_and_nginx_target_every_replica_and_only_those() -> None:
    services = compose()["services"]
    port = re.search(r"^ENV .*\bPORT=(\d+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    replicas = {f"{name}:{port}" for name in services if name.startswith("api")}
    assert {r.split(":")[0] for r in replicas} == REPLICAS
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert [c["metrics_path"] for c in scrape] == ["/metrics"]
    assert set(scrape[0]["static_configs"][0]["targets"]) == replicas
    upstream = re.search(r"upstream sentimentalyzer \{(.*?)\}", (DEPLOY / "nginx.conf").read_text(), re.S).group(1)
    assert set(re.findall(r"server (\S+?)\s", upstream)) == replicas


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
