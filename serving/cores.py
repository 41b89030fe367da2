"""Which cores the engine process computes on, and with how many intra-op threads.

    from serving.cores import plan_cores, apply_plan
    plan = plan_cores(settings, os.sched_getaffinity(0))   # ENGINE_THREADS, ENGINE_CPUS, or per engine
    apply_plan(plan)                                       # affinity + torch/ORT threads, before any thread starts

Every intra-op thread of a pass waits at each parallel region's barrier for the slowest one, so a
thread whose core is taken by HTTP (a front end, the load generator) stalls the whole pass. With
cores to spare the engine gets its own (all but a quarter, at least one left to the front ends),
one thread each, pinned. On two cores there is nothing to spare: with the model in a process of its
own, two threads won at every engine measured under load (`python -m harness.threads`, results/
cpu-2core-threads: torch fp32 1.70x one thread, torch bf16 1.07x, ONNX int8 1.52x; README "Cores for
the model"), so TWO_CORE_THREADS lists no exception today. OMP_NUM_THREADS, when set, is the user's choice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from serving.settings import Settings, parse_cpus

# (backend, dtype) -> intra-op threads on a 2-core machine whose cores the front ends share, where
# `python -m harness.threads` finds fewer than 2 faster (served under 32 wrk connections); none today
TWO_CORE_THREADS: dict[tuple[str, str], int] = {}


@dataclass(frozen=True, slots=True)
class CorePlan:
    threads: int
    cpus: tuple[int, ...]  # () = not pinned: whatever the process was given
    why: str

    def describe(self) -> dict[str, object]:
        return {"threads": self.threads, "cpus": list(self.cpus), "why": self.why}


def plan_cores(settings: Settings, available: Iterable[int], backend_dtype: tuple[str, str] | None = None) -> CorePlan:
    """The engine's threads and cores: ENGINE_THREADS / ENGINE_CPUS where set, else by core count."""
    cores = tuple(sorted(available))
    cpus = parse_cpus(settings.engine_cpus)
    if cpus and not set(cpus) <= set(cores):
        raise ValueError(f"ENGINE_CPUS={settings.engine_cpus!r} names cores this process may not use: {cores}")
    if settings.engine_threads:
        return CorePlan(settings.engine_threads, cpus, "ENGINE_THREADS")
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return CorePlan(int(os.environ["OMP_NUM_THREADS"]), cpus, "OMP_NUM_THREADS")
    if cpus:
        return CorePlan(len(cpus), cpus, "one thread per core of ENGINE_CPUS")
    if len(cores) >= 3:
        spare = max(1, len(cores) // 4)
        return CorePlan(len(cores) - spare, cores[spare:], f"{spare} of {len(cores)} cores left to the front ends")
    if len(cores) == 2:
        key = backend_dtype or engine_of(settings)
        threads = TWO_CORE_THREADS.get(key, 2)
        return CorePlan(threads, (), f"2 shared cores: {threads} measured fastest for {key[0]} {key[1]}")
    return CorePlan(1, (), "one core")


def engine_of(settings: Settings) -> tuple[str, str]:
    """(backend, dtype) as the engine will resolve them (DTYPE=auto depends on the device and CPU)."""
    from serving.model import pick_device, pick_dtype  # torch: only in the engine process

    return settings.backend, pick_dtype(settings.dtype, pick_device(settings.device), settings.backend)


def apply_plan(plan: CorePlan) -> None:
    """Pins the process and sets the intra-op threads that PyTorch and ONNX Runtime sessions take."""
    import torch

    if plan.cpus:
        os.sched_setaffinity(0, plan.cpus)
    torch.set_num_threads(plan.threads)
