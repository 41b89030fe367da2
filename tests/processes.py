"""Real processes for tests, through the harness's one launcher (harness/launch.py), plus nginx.

    from tests.processes import Proc, free_port, start_nginx, start_uvicorn, stub_http
    proc, url = start_uvicorn("replica", tmp_path, "batched_server:app", {"MODEL_ID": model_dir})
    wait_until_ok(proc, f"{url}/ready"); ...; proc.stop()
    with stub_http(lambda request: (200, b"{}")) as url: ...   # a scripted stdlib server

A missing binary skips the test and names the Debian package to install.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.launch import ROOT, environ, free_port
from harness.launch import Process as Proc

__all__ = [
    "ROOT",
    "Proc",
    "delta",
    "eventually",
    "free_port",
    "metrics_at",
    "need",
    "start",
    "start_nginx",
    "start_uvicorn",
    "StubRequest",
    "stub_http",
    "wait_until_ok",
]


@dataclass(frozen=True)
class StubRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@contextmanager
def stub_http(
    answer: Callable[[StubRequest], tuple[int, bytes]], headers: Mapping[str, str] | None = None
) -> Iterator[str]:
    """A stdlib HTTP/1.1 server on 127.0.0.1 (keep-alive and no Nagle, as wrk and nginx expect) that
    answers every GET and POST with answer(request) and the given headers; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, page = answer(StubRequest(self.command, self.path, dict(self.headers), body))
            self.send_response(status)
            for name, value in {**(headers or {}), "Content-Length": str(len(page))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(page)

        do_GET = do_POST = reply

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def need(binary: str, package: str) -> str:
    return shutil.which(binary) or pytest.skip(f"{binary} not installed: apt-get install {package}")


def start(name: str, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> Proc:
    return Proc.start(name, args, tmp / f"{name}.log", env)


def wait_until_ok(proc: Proc, url: str, limit_s: float = 120) -> None:
    """Fails the test (with the log's tail) unless url answers 200 within limit_s."""
    probe = Proc(proc.name, proc.popen, proc.log, url)
    try:
        probe.wait_ready("", limit_s)
    except RuntimeError as exc:
        pytest.fail(f"{exc}:\n{proc.text()[-3000:]}")


def metrics_at(url: str, timeout_s: float = 10) -> dict[str, float]:
    """Samples of GET url/metrics keyed like `name{label="v"}`, for before/after deltas."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=timeout_s).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def eventually(condition: Callable[[], bool], limit_s: float = 5) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_uvicorn(name: str, tmp: Path, app: str, env: dict[str, str], workers: int = 1) -> tuple[Proc, str]:
    """`uvicorn app` on a free port, with env over os.environ (less any PROMETHEUS_MULTIPROC_DIR)."""
    # 2 shared cores: one thread each
    full = environ({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}, drop=("PROMETHEUS_MULTIPROC_DIR",))
    proc = Proc.uvicorn(app, tmp / f"{name}.log", full, workers=workers)
    proc.name = name
    return proc, proc.url


def nginx_config(
    tmp: Path,
    listen: int,
    upstreams: list[str],
    grpc_listen: int | None = None,
    grpc_upstreams: list[str] | None = None,
) -> Path:
    """deploy/nginx.conf itself, with test upstreams, ports and log paths; fails if those lines moved.

    Its gRPC listener gets grpc_listen (a free port if None) over grpc_upstreams; without those, over
    the HTTP upstreams' addresses, which nginx only resolves at start: no call goes there."""

    def servers_of(addresses: list[str]) -> str:
        return "\n        ".join(f"server {u} max_fails=3 fail_timeout=5s;" for u in addresses)

    servers, grpc_servers = servers_of(upstreams), servers_of(grpc_upstreams or upstreams)
    temp = "".join(
        f"\n    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    for pattern, replacement in (
        (r"server api1:8000[^;]*;\s*server api2:8000[^;]*;", servers),
        (r"server api1:8001[^;]*;\s*server api2:8001[^;]*;", grpc_servers),
        (r"listen 8080;", f"listen 127.0.0.1:{listen};"),
        (r"listen 8081 http2;", f"listen 127.0.0.1:{grpc_listen or free_port()} http2;"),
        (r"access_log /dev/stdout main;", f"access_log {tmp}/access.log main;"),
        (r"error_log /dev/stderr warn;", f"error_log {tmp}/error.log info;"),
        (r"\nhttp \{", "\nhttp {" + temp),
        (r"\nuser nginx;", "\nuser root;" if os.geteuid() == 0 else "\n"),
    ):
        text, n = re.subn(pattern, lambda _, r=replacement: r, text)
        assert n == 1, f"deploy/nginx.conf no longer has {pattern!r}"
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def start_nginx(
    tmp: Path, upstreams: list[str], grpc_listen: int | None = None, grpc_upstreams: list[str] | None = None
) -> tuple[Proc, str]:
    """nginx on deploy/nginx.conf (nginx_config); its URL. gRPC: on grpc_listen, over grpc_upstreams."""
    binary = need("nginx", "nginx")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = nginx_config(tmp, port, upstreams, grpc_listen, grpc_upstreams)
    main = f"daemon off; pid {tmp}/nginx.pid;"
    checked = subprocess.run(
        [binary, "-t", "-p", str(tmp), "-e", f"{tmp}/error.log", "-c", str(conf), "-g", main],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    proc = start("nginx", [binary, "-p", str(tmp), "-e", f"{tmp}/error.log", "-c", str(conf), "-g", main], tmp)
    wait_until_ok(proc, f"http://127.0.0.1:{port}/nginx-health", 20)
    return proc, f"http://127.0.0.1:{port}"
