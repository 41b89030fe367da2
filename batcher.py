"""A dynamic batcher for any async service: many callers, one batch function, one worker thread.

    batcher = DynamicBatcher(lambda texts: model(texts), max_batch_size=64, max_wait_s=0.002)
    await batcher.start()
    label = await batcher.submit("I loved it")       # one caller, one future
    await batcher.stop()                             # refuses new items, finishes every queued one

The batch function takes a list and returns a list of the same length, in order; it runs in the
batcher's one worker thread, never on the event loop. When the worker is free, the batcher takes
what is queued at once (up to max_batch_size); when that is less than a full batch, it waits for
companions until the oldest taken item has waited max_wait_s, and no longer. Items arriving while
a batch computes simply queue, so the next batch is gathered during the current one.

Per item: refused at once with QueueFull past max_queue (with a retry-after from the measured
drain rate); answered DeadlineExceeded if still queued after timeout_s, and then never computed;
skipped if its caller cancelled. If a batch raises, it is bisected and retried so only the items
that fail get the error. No FastAPI, no torch: the server wires the hooks to its metrics.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue holds max_queue items; retry_after_s estimates when there will be room."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"queue full ({depth} items queued)")
        self.depth, self.retry_after_s = depth, retry_after_s


class DeadlineExceeded(Exception):
    """The item was still queued when its deadline passed; it was never computed."""


class BatcherStopped(Exception):
    """The batcher is stopping or has stopped and takes no new items."""


class BatchError(Exception):
    """The batch function broke its contract (e.g. returned the wrong number of results)."""


@dataclass(slots=True, eq=False)
class _Item(Generic[T, R]):
    payload: T
    future: asyncio.Future[R]
    enqueued: float  # time.monotonic()
    timer: asyncio.TimerHandle | None = None
    taken: bool = False
    settled: bool = False  # left the live count already (done callbacks run a loop turn late)


@dataclass(slots=True)
class BatcherStats:
    """Running totals, read by /metrics and by Retry-After."""

    batches: int = 0
    items_computed: int = 0
    items_failed: int = 0
    expired: int = 0
    cancelled: int = 0
    refused: int = 0
    busy_since: float | None = None  # when the batch in flight started, None if idle
    items_per_s: float = 0.0  # moving average of throughput while computing
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Passed to on_batch after each batch: what was computed and how long it took."""

    size: int
    queue_waits_s: tuple[float, ...]
    compute_s: float


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 2048,
        timeout_s: float | None = None,
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
        self.on_batch, self.on_drop = on_batch, on_drop
        self.stats = BatcherStats()
        self._queue: collections.deque[_Item[T, R]] = collections.deque()
        self._live = 0  # queued items whose callers still wait; the deque also holds dropped ones
        self._arrived = asyncio.Event()
        self._accepting = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free_since = 0.0  # monotonic time the last batch finished computing

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
        return self._live

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
        rate = self.stats.items_per_s
        if rate <= 0:
            return 1.0
        return max(0.001, self._live / rate)

    # -------------------------------------------------------------------------------------- callers

    def submit_nowait(self, payload: T) -> asyncio.Future[R]:
        """Queues one item and returns its future; raises QueueFull or BatcherStopped at once."""
        if not self._accepting or self._loop is None:
            raise BatcherStopped(f"{self.name} is not accepting items")
        if self._live >= self.max_queue:
            self.stats.refused += 1
            if self.on_drop:
                self.on_drop("queue_full")
            raise QueueFull(self._live, self.retry_after_s())
        loop = self._loop
        item: _Item[T, R] = _Item(payload, loop.create_future(), time.monotonic())
        if self.timeout_s is not None:
            item.timer = loop.call_at(loop.time() + self.timeout_s, self._expire, item)
        item.future.add_done_callback(lambda _f, it=item: self._settled(it))
        self._queue.append(item)
        self._live += 1
        self._arrived.set()
        return item.future

    async def submit(self, payload: T) -> R:
        """Queues one item and waits for its result; cancelling the caller drops the item."""
        return await self.submit_nowait(payload)

    def _expire(self, item: _Item[T, R]) -> None:
        if not item.taken and not item.future.done():
            self.stats.expired += 1
            if self.on_drop:
                self.on_drop("deadline")
            item.future.set_exception(DeadlineExceeded(f"still queued after {self.timeout_s:.3f} s"))

    def _settled(self, item: _Item[T, R]) -> None:
        """An item answered before it was taken leaves the live count here, exactly once: from its
        done callback, or earlier from `_take` when it meets the item before the callback has run."""
        if item.taken or item.settled:
            return
        item.settled = True
        self._live -= 1
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
                batch = await self._collect()
                if batch is None:
                    return
                if batch:
                    await self._compute(batch)
        finally:
            self._accepting = False
            self._fail_queued(BatcherStopped(f"{self.name} stopped"))

    async def _collect(self) -> list[_Item[T, R]] | None:
        """Waits for work; returns the next batch, [] if all it held was dropped, None to exit."""
        while not self._live:
            if not self._accepting:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        # max_wait counts from when the model is free (or from the first arrival, if it was already
        # free): items that queued during the last pass still get max_wait for companions to arrive.
        wait_until = max(self._first_live_enqueued(), self._free_since) + self.max_wait_s
        # Only while there is room, still accepting, and the oldest item may wait longer.
        while self._live < self.max_batch_size and self._accepting and time.monotonic() < wait_until:
            self._arrived.clear()
            try:
                async with asyncio.timeout(wait_until - time.monotonic()):
                    await self._arrived.wait()
            except TimeoutError:
                break
        return self._take()

    def _first_live_enqueued(self) -> float:
        for item in self._queue:
            if not item.future.done():
                return item.enqueued
        return time.monotonic()

    def _take(self) -> list[_Item[T, R]]:
        batch: list[_Item[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled or expired while queued: never computed
                self._settled(item)  # its callback may not have run yet; _live must not count it
                continue
            item.taken = True
            self._live -= 1
            if item.timer is not None:
                item.timer.cancel()
            batch.append(item)
        return batch

    async def _compute(self, batch: list[_Item[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.stats.busy_since = started
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
        compute_s = time.monotonic() - started
        for item, outcome in zip(batch, outcomes):
            if item.future.done():  # the caller went away while we computed
                continue
            if isinstance(outcome, _Failure):
                self.stats.items_failed += 1
                item.future.set_exception(outcome.error)
            else:
                item.future.set_result(outcome)
        self._account(batch, started, compute_s)

    def _account(self, batch: list[_Item[T, R]], started: float, compute_s: float) -> None:
        st = self.stats
        st.batches += 1
        st.items_computed += len(batch)
        st.sizes[len(batch)] += 1
        rate = len(batch) / max(compute_s, 1e-6)
        st.items_per_s = rate if st.items_per_s == 0 else 0.8 * st.items_per_s + 0.2 * rate
        if self.on_batch:
            self.on_batch(BatchInfo(len(batch), tuple(started - it.enqueued for it in batch), compute_s))

    def _fail_queued(self, error: BaseException) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(error)


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
    except Exception as exc:
        if len(payloads) == 1:
            return [_Failure(exc)]
        mid = len(payloads) // 2
        return _call_isolated(fn, payloads[:mid]) + _call_isolated(fn, payloads[mid:])


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds: round up so a client never comes back too early."""
    return str(max(1, math.ceil(seconds)))
