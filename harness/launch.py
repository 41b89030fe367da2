"""The one launcher: start a server process, wait until it answers, stop it and everything it spawned.

    from harness.launch import Process, free_port
    proc = Process.uvicorn("batched_server:app", log=Path("/tmp/b.log"), env={"MODEL_ID": "stand-in"})
    ready = proc.wait_ready()          # the /ready body, once it answers 200
    ...                                # load proc.url
    proc.stop()                        # SIGTERM (uvicorn drains), then SIGKILL to what is left

Every process binds 127.0.0.1, runs in a session of its own (so `stop` also ends uvicorn's workers,
nginx's or a peer's), and writes stdout and stderr to one log. The bench, overload, profiling runs
and the tests all start servers through this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environ(env: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    """os.environ less `drop`, with `env` on top."""
    dropped = set(drop)
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, **(env or {})}


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    grpc_url: str = ""  # grpc://127.0.0.1:PORT where the server was started with GRPC_PORT

    @classmethod
    def start(
        cls, name: str, args: list[str], log: Path, env: Mapping[str, str] | None = None, url: str = ""
    ) -> Process:
        """Runs args from the repository root; env is the whole environment (None: inherit)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:  # the child keeps its own handle
            popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env=None if env is None else dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(name, popen, log, url)

    @classmethod
    def uvicorn(
        cls,
        app: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        extra: Iterable[str] = (),
    ) -> Process:
        """`uvicorn app` on 127.0.0.1 (a free port unless given); env is the whole environment."""
        port = port or free_port()
        args = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        args += ["--workers", str(workers)] if workers > 1 else []
        return cls.start(app, [*args, *extra], log, env, f"http://127.0.0.1:{port}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of this process and every process under it now: uvicorn's
        workers, the engine, a peer's helpers. A process that has ended takes its seconds with it, so
        take the difference of two readings over a window in which the server's processes live."""
        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:  # the server is gone: nothing of it to count
            return 0.0
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_ready(self, path: str = "/ready", timeout_s: float = 180.0) -> dict[str, Any]:
        """The JSON body of url+path once it answers 200 ({} if not JSON); raises RuntimeError if the
        process exits first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.popen.returncode}")
            try:
                r = httpx.get(self.url + path, timeout=2)
                if r.status_code == 200:
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    return r.json() if is_json else {}
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {self.url}{path} not ready after {timeout_s:.0f} s")

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0, group: bool = False) -> int | None:
        """Signals the process, or its whole session with group=True (Ctrl+C for a peer that runs
        workers of its own), waits up to grace_s, then kills the session. Returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig) if group else self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        # uvicorn's workers, nginx's and a peer's children share its session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None
