"""Real uvicorn + Locust: both servers on free ports, a few seconds of headless load, zero failures.

pytest tests/test_smoke.py -q
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.launch import ROOT, environ
from harness.launch import Process as Proc


@pytest.fixture
def server(tiny_model_dir: str, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    procs: list[Proc] = []

    def start(module: str) -> str:
        env = environ({"MODEL_ID": tiny_model_dir, "MODEL_FALLBACK": "0"})
        proc = Proc.uvicorn(f"{module}:app", tmp_path / f"{module}.log", env)
        procs.append(proc)
        proc.wait_ready(timeout_s=90)
        return proc.url

    yield start
    for proc in procs:
        proc.stop(grace_s=30)


@pytest.mark.parametrize("module", ["naive_server", "batched_server"])
def test_locust_headless_run_has_requests_and_no_failures(
    server: Callable[[str], str], module: str, tmp_path: Path
) -> None:
    url = server(module)
    prefix = tmp_path / module
    subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            "locustfile.py",
            "--headless",
            "-u",
            "8",
            "-r",
            "8",
            "-t",
            "4s",
            "--host",
            url,
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
        capture_output=True,
    )
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert "/predict" in rows
