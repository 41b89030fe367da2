"""Start engine processes from a template that has already imported torch and transformers.

    proc = await EngineProcess.start(["--socket", path, "--parent", str(os.getpid()), ...], env)
    code = await proc.wait()     # the exit code; -N for signal N, as asyncio's subprocesses report it
    proc.kill()

Most of an engine's start is importing torch and transformers (~7 s of ~8.5 s on a 2-core CPU,
py-spy). The first start launches multiprocessing's forkserver, which imports them once; every
engine, the first and each one started again after a crash, is forked from it, so a restart costs
the model's load and warm-up only. The forkserver is single-purpose (it never runs the model, so
no thread pool exists to be broken by fork) and exits with the process that started it, which
takes its engines with it (PR_SET_PDEATHSIG, serving/engine_core.py).

Settings travel as arguments and the environment is set again in the child: what the forkserver
read at import (its environment at the first start) matters only to modules that read it then.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import os
from multiprocessing.process import BaseProcess

PRELOAD = ["serving.model"]  # torch, transformers and the model code; no prometheus_client (see _run)
_live: set[BaseProcess] = set()


def _run(argv: list[str], env: dict[str, str]) -> None:
    """The engine's first code in the forked child."""
    os.environ.clear()
    os.environ.update(env)  # before prometheus_client is imported: it reads PROMETHEUS_MULTIPROC_DIR then
    from serving import engine_core

    engine_core.main(argv)


def _fork(argv: list[str], env: dict[str, str]) -> BaseProcess:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver starts: the first call
    proc = ctx.Process(target=_run, args=(argv, env), name="sentimentalyzer-engine")
    proc.start()
    atexit.unregister(_kill_left)  # registered once, however many engines this process starts
    atexit.register(_kill_left)
    _live.add(proc)
    return proc


def _kill_left() -> None:
    # A front end that exits without its lifespan's stop takes its engine with it, at once; without
    # this, multiprocessing's own exit handler would join an engine that waits for that front end.
    for proc in list(_live):
        if proc.exitcode is None:
            proc.kill()


class EngineProcess:
    """One engine process: pid, returncode, kill() and an awaitable exit, like asyncio's Process."""

    def __init__(self, proc: BaseProcess) -> None:
        self._proc = proc
        self.pid: int = proc.pid or 0
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        loop.add_reader(proc.sentinel, self._on_exit)

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str]) -> EngineProcess:
        # the first start launches the forkserver and waits while it imports: off the event loop
        return cls(await asyncio.to_thread(_fork, argv, env))

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        self._proc.join()  # immediate: the sentinel is readable once the forkserver has reaped it
        _live.discard(self._proc)
        code = self._proc.exitcode
        self._exited.set_result(255 if code is None else code)
        self._proc.close()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        if not self._exited.done():
            self._proc.kill()
