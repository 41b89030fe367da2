"""A peer's process as the bench starts, waits for and stops it: harness.launch.Process with a peer's habits.

    from harness.peers import PEERS
    from harness.peers.process import PeerProcess
    proc = PeerProcess.launch(PEERS["triton"], Path("/tmp/triton.log"), env=os.environ)
    info = proc.wait_ready()        # {"model_source": ..., "dtype": ..., "peer": {...}} once it answers
    proc.stop()                     # its own way to stop (Ctrl+C), then every process it started

What differs from the project's servers: the interpreter is the peer's own environment; readiness is
its own health path and then a few answered requests (BentoML's adaptive batcher, for one, spends its
first batches learning their cost one item at a time); a failure's message carries the error the peer
printed, not only its exit code; and stopping also ends the processes a peer moves out of its session
(BentoML's worker) or its process group (Ray's actors).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from harness.launch import Process, free_port
from harness.peers import Peer
from harness.peers.envs import problem

WARMUP_REQUESTS = 40  # BentoML's dispatcher trains on about 25 batches before it batches freely
WARMUP_S = 120.0
ENGINE_LINE = re.compile(r"PEER_ENGINE (\{.*\})")
BATCH_LINE = re.compile(r"PEER_BATCH (\d+) (\d+) (\d+)")
ERROR_LINE = re.compile(r"\b(\w+(Error|Exception)|error|failed|Traceback)\b", re.IGNORECASE)


def peer_error(log: str) -> str | None:
    """The most telling line of a failed peer's log: the last exception line, else the last error line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^(\w+\.)*\w+(Error|Exception|Exit)\b", line.split(") ", 1)[-1]):
            return line[:300]
    return next((line[:300] for line in reversed(lines) if ERROR_LINE.search(line)), lines[-1][:300] if lines else None)


@dataclass
class PeerProcess(Process):
    peer: Peer | None = None
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @classmethod
    def launch(cls, peer: Peer, log: Path, env: Mapping[str, str], name: str | None = None) -> PeerProcess:
        """Starts it on a free port under `name` (its configuration's, default the peer's own)."""
        name = name or peer.name
        port = free_port()
        why = problem(peer)
        if why:  # a process that says why and exits: reported like any peer that could not start
            args = [sys.executable, "-c", "import sys; sys.exit(sys.argv[1])", f"{name}: {why}"]
        else:
            args = [str(peer.python), "-m", peer.module, "--port", str(port)]
        env = {
            **env,
            "VIRTUAL_ENV": str(peer.env_dir),
            "PATH": os.pathsep.join([str(peer.env_dir / "bin"), env.get("PATH", "")]),
            "PYTHONUNBUFFERED": "1",  # its log is read while it runs
        }
        proc = cls.start(name, args, log, env, f"http://127.0.0.1:{port}")
        proc.peer = peer
        return proc

    def wait_ready(self, path: str | None = None, timeout_s: float = 180.0) -> dict[str, Any]:
        """Its health path answering 200, then WARMUP_REQUESTS answered one after another; returns what it
        said it serves (model source, device, dtype). RuntimeError with the peer's own error otherwise."""
        assert self.peer is not None
        t0 = time.monotonic()
        try:
            super().wait_ready(path or self.peer.ready_path, timeout_s)
            self._remember_descendants()
            route, body = self.peer.probe()
            deadline = time.monotonic() + WARMUP_S
            with httpx.Client(base_url=self.url, timeout=60) as client:
                for _ in range(WARMUP_REQUESTS):
                    r = client.post(route, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{self.name}: warm-up request answered {r.status_code}: {r.text[:200]}")
                    if time.monotonic() > deadline:
                        break
        except (RuntimeError, httpx.HTTPError) as exc:
            why = peer_error(self.text())
            raise RuntimeError(f"{str(exc).splitlines()[0]}: {why}" if why else str(exc)) from exc
        self._remember_descendants()
        found = ENGINE_LINE.search(self.text())
        engine = json.loads(found.group(1)) if found else {}
        return {**engine, "peer": {"name": self.peer.name, "ready_s": round(time.monotonic() - t0, 1)}}

    def counters(self) -> dict[str, float]:
        """Its forward passes so far, under the names of the servers' /metrics counters, so the bench's
        metrics_delta gives a peer's average batch size and padding efficiency as it gives theirs."""
        passes = items = real = computed = 0
        for m in BATCH_LINE.finditer(self.text()):
            passes, items = passes + 1, items + int(m.group(1))
            real, computed = real + int(m.group(2)), computed + int(m.group(3))
        return {
            "sentimentalyzer_batch_size_count": passes,
            "sentimentalyzer_batch_size_sum": items,
            "sentimentalyzer_real_tokens_total": real,
            "sentimentalyzer_computed_tokens_total": computed,
        }

    def _remember_descendants(self) -> None:
        """Adds the processes it has started so far (psutil keeps each one's identity: a pid reused
        later is not mistaken for it)."""
        try:
            for child in psutil.Process(self.popen.pid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def stop(self, sig: int | None = None, grace_s: float | None = None, group: bool | None = None) -> int | None:
        """Stops it the peer's way (its registry entry: signal, main process or group, grace), whatever the
        caller asked for, then kills its session and every process it had started."""
        assert self.peer is not None
        if self.popen.poll() is None:
            self._remember_descendants()
        if self.peer.stop_group:
            rc = super().stop(self.peer.stop_signal, self.peer.grace_s, group=True)
        else:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                    self.popen.send_signal(self.peer.stop_signal)
                    self.popen.wait(self.peer.grace_s)
            rc = super().stop(signal.SIGKILL, 5.0, group=True)
        left = [child for child in self.descendants.values() if child.is_running()]
        for child in left:  # moved out of its session or group, or orphaned by a supervisor that exited
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(left, timeout=5)
        return rc
