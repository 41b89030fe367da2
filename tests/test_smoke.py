"""Real uvicorn + Locust: both servers on free ports, a few seconds of headless load, zero failures.

    pytest tests/test_smoke.py -q
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {limit_s} s")


@pytest.fixture
def server(tiny_model_dir: str, tmp_path: Path) -> Iterator[callable]:
    procs: list[subprocess.Popen] = []

    def start(module: str, **env: str) -> str:
        port = free_port()
        log = open(tmp_path / f"{module}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0", **env})
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("module", ["naive_server", "batched_server"])
def test_locust_headless_run_has_requests_and_no_failures(server, module: str, tmp_path: Path) -> None:
    url = server(module)
    prefix = tmp_path / module
    subprocess.run([sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", "8", "-r", "8",
                    "-t", "4s", "--host", url, "--csv", str(prefix), "--only-summary"],
                   cwd=ROOT, check=True, timeout=60, capture_output=True)
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert "/predict" in rows
