"""Real processes for tests: start, wait until they answer, stop them and everything they spawned.

    from tests.processes import Proc, free_port, start_nginx, start_uvicorn
    proc, url = start_uvicorn("replica", tmp_path, "batched_server:app", {"MODEL_ID": model_dir})
    wait_until_ok(proc, f"{url}/ready"); ...; proc.stop()

Everything binds 127.0.0.1 on a free port and runs in its own session, so `stop` also ends uvicorn's
workers and nginx's. A missing binary skips the test and names the Debian package to install.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str, package: str) -> str:
    return shutil.which(binary) or pytest.skip(f"{binary} not installed: apt-get install {package}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> Proc:
        log = tmp / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, popen, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # uvicorn's workers and nginx's are in the same session
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(5)


def wait_until_ok(proc: Proc, url: str, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"{proc.name} exited {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{proc.name} not ready at {url} after {limit_s}s:\n{proc.text()[-3000:]}")


def eventually(condition: Callable[[], bool], limit_s: float = 5) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_uvicorn(name: str, tmp: Path, app: str, env: dict[str, str], workers: int = 1) -> tuple[Proc, str]:
    """`uvicorn app` on a free port, with env over os.environ (less any PROMETHEUS_MULTIPROC_DIR)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)  # 2 shared cores: one thread each
    args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]
    return Proc.start(name, args, tmp, environ), f"http://127.0.0.1:{port}"


def nginx_config(tmp: Path, listen: int, upstreams: list[str]) -> Path:
    """deploy/nginx.conf itself, with test upstreams, port and log paths; fails if those lines moved."""
    servers = "\n        ".join(f"server {u} max_fails=3 fail_timeout=5s;" for u in upstreams)
    temp = "".join(f"\n    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                        "uwsgi", "scgi"))
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    for pattern, replacement in ((r"server api1:8000[^;]*;\s*server api2:8000[^;]*;", servers),
                                 (r"listen 8080;", f"listen 127.0.0.1:{listen};"),
                                 (r"access_log /dev/stdout main;", f"access_log {tmp}/access.log main;"),
                                 (r"error_log /dev/stderr warn;", f"error_log {tmp}/error.log info;"),
                                 (r"\nhttp \{", "\nhttp {" + temp),
                                 (r"\nuser nginx;", "\nuser root;" if os.geteuid() == 0 else "\n")):
        text, n = re.subn(pattern, lambda _: replacement, text)
        assert n == 1, f"deploy/nginx.conf no longer has {pattern!r}"
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def start_nginx(tmp: Path, upstreams: list[str]) -> tuple[Proc, str]:
    binary = need("nginx", "nginx")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = nginx_config(tmp, port, upstreams)
    main = f"daemon off; pid {tmp}/nginx.pid;"
    checked = subprocess.run([binary, "-t", "-p", str(tmp), "-e", f"{tmp}/error.log", "-c", str(conf), "-g", main],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = Proc.start("nginx", [binary, "-p", str(tmp), "-e", f"{tmp}/error.log", "-c", str(conf), "-g", main], tmp)
    wait_until_ok(proc, f"http://127.0.0.1:{port}/nginx-health", 20)
    return proc, f"http://127.0.0.1:{port}"
