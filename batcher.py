"""A dynamic batcher for any async service: many callers, one batch function, one worker thread.

    batcher = DynamicBatcher(lambda texts: model(texts), max_batch_size=64, max_wait_s=0.002)
    await batcher.start()
    label = await batcher.submit("I loved it")       # one caller, one future
    done = await batcher.submit_nowait("so dull")    # the same, with how it went:
    done.value, done.queue_wait_s, done.batch_size   #   the result, time queued, items in its batch,
    done.predicted_s                                 #   and admission's prediction (admit_by_deadline)
    await batcher.stop()                             # refuses new items, finishes every queued one

The batch function takes a list and returns a list of the same length, in order; it runs in the
batcher's one worker thread, never on the event loop. When the worker is free, the batcher takes
what is queued at once, up to max_batch_size items and (with `cost_of`) max_batch_cost units, e.g.
tokens. With less than a full batch it waits for companions, at most max_wait_s from when the
worker became free, and only while another arrival is likely within max_wait_s (from the measured
arrival rate): a lone caller at low load goes straight to the model. Items arriving while a batch
computes queue, so the next batch is gathered during the current one.

Per item: refused at once with QueueFull past max_queue items (or max_queue_cost units), or, with
`admit_by_deadline`, when the passes ahead of it cannot be computed before its deadline (each pass
timed as fixed + per-cost seconds, fitted to recent passes), plus one median pass of slack, unless
nothing is queued ahead (both carry a retry-after); answered DeadlineExceeded if still queued
timeout_s after it arrived (`arrived`: when the caller's request did, so time spent before submit
counts), and then never computed; skipped if its caller cancelled. If a batch raises, it is
bisected and retried so only the items that fail get the error.
No FastAPI, no torch: the server wires the hooks to metrics.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """No room, or no chance of an answer in time; retry_after_s estimates when there will be."""

    def __init__(self, depth: int, retry_after_s: float, reason: str = "queue_full") -> None:
        what = "queue full" if reason == "queue_full" else "the queue ahead would outlast the deadline"
        super().__init__(f"{what} ({depth} items queued)")
        self.depth, self.retry_after_s, self.reason = depth, retry_after_s, reason


class DeadlineExceeded(Exception):
    """The item was still queued when its deadline passed; it was never computed."""


class BatcherStopped(Exception):
    """The batcher is stopping or has stopped and takes no new items."""


class BatchError(Exception):
    """The batch function broke its contract (e.g. returned the wrong number of results)."""


@dataclass(frozen=True, slots=True)
class Done(Generic[R]):
    """What a caller's future resolves to: the result and how it was reached."""

    value: R
    queue_wait_s: float  # from submit until its batch went to the worker
    batch_size: int  # items computed in the same call of the batch function
    # admission's prediction of its time to answer, counted from `arrived`: set only when it was
    # admitted behind a queue by deadline (admit_by_deadline); its accuracy is worth watching
    predicted_s: float | None = None


@dataclass(slots=True, eq=False)
class _Item(Generic[T, R]):
    seq: int
    payload: T
    cost: int
    future: asyncio.Future[Done[R]]
    enqueued: float  # time.monotonic()
    predicted_s: float | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class BatcherStats:
    """Running totals, read by /metrics, Retry-After and admission."""

    batches: int = 0
    items_computed: int = 0
    items_failed: int = 0
    expired: int = 0
    cancelled: int = 0
    refused: int = 0
    busy_since: float | None = None  # when the batch in flight started, None if idle
    items_per_s: float = 0.0  # moving average of throughput while computing
    # a pass takes pass_fixed_s + pass_s_per_cost * its cost, and pass_gap_s more while work waits
    # (collection, hand-offs): fitted to recent passes (fit_pass_cost), 0 until a window is full,
    # refitted when admission next needs them (a lone request at low load never pays for a fit)
    pass_fixed_s: float = 0.0
    pass_s_per_cost: float = 0.0
    pass_gap_s: float = 0.0
    arrival_gap_s: float | None = None  # moving average of the time between arrivals
    admission_slack_s: float = 0.0  # added to each prediction at admission: one median pass


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Passed to on_batch after each batch: what was computed, why it started, how long it took."""

    size: int
    cost: int
    queue_waits_s: tuple[float, ...]
    compute_s: float
    reason: str  # full (size or cost budget), waited (max_wait_s ran out), idle (no companion likely), stopping


def fit_pass_cost(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(fixed_s, s_per_cost) of a line through (cost, seconds) samples of passes: Theil-Sen, the
    median of the pairwise slopes, then the median intercept. A plain rate (cost over seconds)
    charges a small pass's fixed cost to each of its few units, so a window holding small passes
    predicts a backlog many times too slow; a least-squares line follows a stalled pass. With one
    cost seen there is no slope: (0, the median seconds per unit)."""
    slopes = [(s2 - s1) / (c2 - c1) for (c1, s1), (c2, s2) in itertools.combinations(samples, 2) if c1 != c2]
    if not slopes:
        return 0.0, statistics.median(s / max(c, 1) for c, s in samples)
    per = max(0.0, statistics.median(slopes))
    return max(0.0, statistics.median(s - per * c for c, s in samples)), per


def drain_time_s(depth: int, items_per_s: float) -> float:
    """Seconds until `depth` queued items are computed at the measured rate (1 s while unmeasured)."""
    return 1.0 if items_per_s <= 0 else max(0.001, depth / items_per_s)


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 2048,
        timeout_s: float | None = None,
        cost_of: Callable[[T], int] | None = None,
        max_batch_cost: int | None = None,
        max_queue_cost: int | None = None,
        admit_by_deadline: bool = False,
        on_batch: Callable[[BatchInfo], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0; got "
                f"{max_batch_size}, {max_queue}, {max_wait_s}"
            )
        self.fn, self.max_batch_size, self.max_wait_s = fn, max_batch_size, max_wait_s
        self.max_queue, self.timeout_s, self.name = max_queue, timeout_s, name
        self.cost_of, self.max_batch_cost, self.max_queue_cost = cost_of, max_batch_cost, max_queue_cost
        self.admit_by_deadline = admit_by_deadline and timeout_s is not None
        self.on_batch, self.on_drop = on_batch, on_drop
        self.stats = BatcherStats()
        # Only items whose callers still wait, in arrival order: a caller that cancels or expires
        # leaves it from its future's done callback (and `_take` skips one whose callback is pending).
        self._queue: collections.OrderedDict[int, _Item[T, R]] = collections.OrderedDict()
        self._queued_cost = 0
        self._seq = itertools.count()
        self._arrived = asyncio.Event()
        self._accepting = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free_since = 0.0  # monotonic time the last batch finished computing
        self._last_arrival: float | None = None
        self._in_flight_cost = 0  # cost of the batch computing now: how long it may still take
        # recent passes as (cost, compute seconds), every one of them: the fit separates a pass's
        # fixed cost from its per-cost part, so a lone item after idle time teaches it as much as a
        # full batch does; and the gaps between passes while work waited
        self._passes: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)
        self._gaps_s: collections.deque[float] = collections.deque(maxlen=16)
        self._fit_stale = False  # a pass ended since the last fit

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-consumer")

    async def stop(self) -> None:
        """Refuses new items, computes every item already queued, then returns."""
        self._accepting = False
        self._arrived.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def queued_cost(self) -> int:
        return self._queued_cost

    @property
    def accepting(self) -> bool:
        return self._accepting

    def healthy(self, stall_s: float) -> bool:
        """False once the consumer died or a batch has computed for longer than stall_s."""
        if self._task is None or self._task.done():
            return False
        busy = self.stats.busy_since
        return busy is None or time.monotonic() - busy < stall_s

    def retry_after_s(self) -> float:
        """Seconds until the queue has drained, from its depth and the measured throughput."""
        return drain_time_s(len(self._queue), self.stats.items_per_s)

    def predicted_answer_s(self, cost: int) -> float | None:
        """When an item of this cost, queued now, would be answered: the rest of the pass in flight,
        then the passes that the items queued ahead and its own fill (each its fixed cost and gap,
        all their cost at the fitted per-cost time). None until 16 passes ran."""
        self._refit()
        st = self.stats
        if st.pass_fixed_s <= 0 and st.pass_s_per_cost <= 0:
            return None
        busy = st.busy_since
        in_flight = 0.0
        if busy is not None:
            in_flight_s = st.pass_fixed_s + st.pass_s_per_cost * self._in_flight_cost
            in_flight = max(0.0, in_flight_s - (time.monotonic() - busy))
        ahead = self._queued_cost + cost
        passes = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        if self.max_batch_cost is not None:
            passes = max(passes, math.ceil(ahead / self.max_batch_cost))
        return in_flight + passes * (st.pass_fixed_s + st.pass_gap_s) + st.pass_s_per_cost * ahead

    # -------------------------------------------------------------------------------------- callers

    def submit_nowait(self, payload: T, arrived: float | None = None) -> asyncio.Future[Done[R]]:
        """Queues one item and returns its future; raises QueueFull or BatcherStopped at once.
        `arrived` (time.monotonic()) is when the caller's request arrived: its deadline counts from
        there, not from now."""
        if not self._accepting or self._loop is None:
            raise BatcherStopped(f"{self.name} is not accepting items")
        cost = self.cost_of(payload) if self.cost_of is not None else 1
        loop, now = self._loop, time.monotonic()
        elapsed = 0.0 if arrived is None else max(0.0, now - arrived)
        predicted = self._admit(cost, elapsed)
        item: _Item[T, R] = _Item(next(self._seq), payload, cost, loop.create_future(), now, predicted)
        if self.timeout_s is not None:
            item.timer = loop.call_at(loop.time() + self.timeout_s - elapsed, self._expire, item)
        item.future.add_done_callback(functools.partial(self._on_done, item))
        self._queue[item.seq] = item
        self._queued_cost += cost
        if self._last_arrival is not None:
            gap, st = now - self._last_arrival, self.stats
            st.arrival_gap_s = gap if st.arrival_gap_s is None else 0.8 * st.arrival_gap_s + 0.2 * gap
        self._last_arrival = now
        self._arrived.set()
        return item.future

    async def submit(self, payload: T) -> R:
        """Queues one item and waits for its result; cancelling the caller drops the item."""
        return (await self.submit_nowait(payload)).value

    def check_admission(self, cost: int = 1) -> None:
        """Raises QueueFull (counted as refused) if an item of `cost` would be refused now: lets a
        caller refuse at the door before it spends work (e.g. tokenizing) on a request."""
        self._admit(cost)

    def _admit(self, cost: int, elapsed_s: float = 0.0) -> float | None:
        """Raises QueueFull unless an item of `cost`, `elapsed_s` into its deadline, is admitted;
        returns the predicted seconds from its arrival to its answer, if one was made."""
        full = len(self._queue) >= self.max_queue or (
            self.max_queue_cost is not None and self._queued_cost + cost > self.max_queue_cost
        )
        reason = "queue_full" if full else None
        answer_s = None
        if reason is None and self.admit_by_deadline and self._queue and self.timeout_s is not None:
            # One typical pass of slack: the prediction is a fit, and a pass that runs slow must not
            # push the requests admitted at the edge past their deadline. With nothing queued ahead
            # it is always admitted: it goes in the next pass whatever is predicted, and a refusal
            # there feeds on itself (clients retrying at once slow the passes the fit is taken from).
            predicted = self.predicted_answer_s(cost)
            answer_s = None if predicted is None else elapsed_s + predicted
            if answer_s is not None and answer_s + self.stats.admission_slack_s > self.timeout_s:
                reason = "would_miss_deadline"
        if reason is None:
            return answer_s
        self.stats.refused += 1
        if self.on_drop:
            self.on_drop(reason)
        raise QueueFull(len(self._queue), self.retry_after_s(), reason)

    def _expire(self, item: _Item[T, R]) -> None:
        if item.seq in self._queue and not item.future.done():
            self.stats.expired += 1
            if self.on_drop:
                self.on_drop("deadline")
            item.future.set_exception(DeadlineExceeded(f"still queued after {self.timeout_s:.3f} s"))

    def _on_done(self, item: _Item[T, R], _future: asyncio.Future[Done[R]]) -> None:
        self._discard(item)

    def _discard(self, item: _Item[T, R]) -> None:
        """Takes an answered-while-queued item out of the queue, exactly once (pop is idempotent)."""
        if self._queue.pop(item.seq, None) is None:
            return
        self._queued_cost -= item.cost
        if item.timer is not None:
            item.timer.cancel()
        if item.future.cancelled():
            self.stats.cancelled += 1
            if self.on_drop:
                self.on_drop("cancelled")

    # ------------------------------------------------------------------------------------- consumer

    async def _run(self) -> None:
        try:
            while True:
                collected = await self._collect()
                if collected is None:
                    return
                batch, reason = collected
                if batch:
                    await self._compute(batch, reason)
        finally:
            self._accepting = False
            self._fail_queued(BatcherStopped(f"{self.name} stopped"))

    def _room(self) -> bool:
        if len(self._queue) >= self.max_batch_size:
            return False
        return self.max_batch_cost is None or self._queued_cost < self.max_batch_cost

    def _companion_likely(self) -> bool:
        gap = self.stats.arrival_gap_s
        return gap is not None and gap < self.max_wait_s

    async def _collect(self) -> tuple[list[_Item[T, R]], str] | None:
        """Waits for work; returns the next batch ([] if all it held was dropped) and why it
        started, or None to exit."""
        while not self._queue:
            if not self._accepting:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        # max_wait counts from when the model is free (or from the first arrival, if it was already
        # free): items that queued during the last pass still get max_wait for companions to arrive.
        first = next(iter(self._queue.values())).enqueued
        wait_until = max(first, self._free_since) + self.max_wait_s
        reason = "idle"
        while self._room() and self._accepting and self._companion_likely():
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                reason = "waited"
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                reason = "waited"
                break
        if not self._room():
            reason = "full"
        elif not self._accepting:
            reason = "stopping"
        return self._take(), reason

    def _take(self) -> list[_Item[T, R]]:
        batch: list[_Item[T, R]] = []
        cost = 0
        while self._queue and len(batch) < self.max_batch_size:
            item = next(iter(self._queue.values()))
            if item.future.done():  # cancelled or expired, its done callback not run yet
                self._discard(item)
                continue
            if batch and self.max_batch_cost is not None and cost + item.cost > self.max_batch_cost:
                break
            del self._queue[item.seq]
            self._queued_cost -= item.cost
            cost += item.cost
            if item.timer is not None:
                item.timer.cancel()
            batch.append(item)
        return batch

    async def _compute(self, batch: list[_Item[T, R]], reason: str) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.stats.busy_since = started
        cost = self._in_flight_cost = sum(it.cost for it in batch)  # a long text alone outlasts a typical pass
        waits = tuple(started - it.enqueued for it in batch)
        # Queued while the last batch computed: the worker had work waiting since the last one's end,
        # so the time until this one started is what a backlog pays between passes.
        gap_s = started - self._free_since if batch[0].enqueued <= self._free_since else None
        try:
            outcomes = await loop.run_in_executor(self._executor, _call_isolated, self.fn, [it.payload for it in batch])
        except BaseException as exc:  # the worker itself died (not the batch fn: that is isolated)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherStopped(f"{self.name} worker died: {exc!r}"))
            raise
        finally:
            self.stats.busy_since = None
            self._free_since = time.monotonic()
        compute_s = self._free_since - started
        for item, wait, outcome in zip(batch, waits, outcomes, strict=True):
            if item.future.done():  # the caller went away while we computed
                continue
            if isinstance(outcome, _Failure):
                self.stats.items_failed += 1
                item.future.set_exception(outcome.error)
            else:
                item.future.set_result(Done(outcome, wait, len(batch), item.predicted_s))
        self._account(BatchInfo(len(batch), cost, waits, compute_s, reason), gap_s)

    def _account(self, info: BatchInfo, gap_s: float | None) -> None:
        st = self.stats
        st.batches += 1
        st.items_computed += info.size
        elapsed = max(info.compute_s, 1e-6)
        st.items_per_s = _ewma(st.items_per_s, info.size / elapsed)
        self._passes.append((info.cost, info.compute_s))
        if gap_s is not None:
            self._gaps_s.append(gap_s)
        # A full window only: a new process's first passes are slow (new shapes, cold caches).
        self._fit_stale = len(self._passes) == self._passes.maxlen
        if self.on_batch:
            self.on_batch(info)

    def _refit(self) -> None:
        if not self._fit_stale:
            return
        self._fit_stale = False
        # A prediction that errs late refuses a request that might have made it (503, retry), one
        # that errs early lets it time out (504): medians, and one typical pass of slack on top.
        st = self.stats
        st.pass_fixed_s, st.pass_s_per_cost = fit_pass_cost(self._passes)
        st.pass_gap_s = statistics.median(self._gaps_s) if self._gaps_s else 0.0
        st.admission_slack_s = statistics.median(s for _, s in self._passes)

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            _, item = self._queue.popitem(last=False)
            if not item.future.done():
                item.future.set_exception(error)


def _ewma(old: float, new: float) -> float:
    return new if old == 0 else 0.8 * old + 0.2 * new


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


def _call_isolated(fn: Callable[[list[T]], list[R]], payloads: list[T]) -> list[R | _Failure]:
    """Runs fn; if it raises, bisects so that only the items that fail get the error."""
    try:
        results = fn(payloads)
        if len(results) != len(payloads):
            raise BatchError(f"batch function returned {len(results)} results for {len(payloads)} inputs")
        return list(results)
    except Exception as exc:  # any failure is the callers' to see, not ours
        if len(payloads) == 1:
            return [_Failure(exc)]
        mid = len(payloads) // 2
        return _call_isolated(fn, payloads[:mid]) + _call_isolated(fn, payloads[mid:])


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds: round up so a client never comes back too early."""
    return str(max(1, math.ceil(seconds)))
