"""DynamicBatcher with a deterministic stub model: batching, order, limits, failures and drain.

    pytest tests/test_batcher.py -q

No timing assertions: batch boundaries are made deterministic with a huge max wait (the first
n-1 items stay pending until the n-th fills the batch) or with a gate that holds the worker.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from batcher import (
    BatchError,
    BatcherStopped,
    BatchInfo,
    DeadlineExceeded,
    DynamicBatcher,
    QueueFull,
    drain_time_s,
    fit_pass_cost,
    retry_after_header,
)
from tests.conftest import StubModel

pytestmark = pytest.mark.anyio
HUGE_WAIT = 3600.0


async def started(fn, **kw) -> DynamicBatcher:
    b = DynamicBatcher(fn, **kw)
    await b.start()
    return b


async def values(*futs: asyncio.Future) -> list:
    """The results of submit_nowait futures (each resolves to a Done)."""
    return [d.value for d in await asyncio.gather(*futs)]


async def until(predicate, limit_s: float = 10.0) -> None:
    """Lets the event loop run until predicate holds (a bound, not a timing assertion)."""
    for _ in range(int(limit_s / 0.001)):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def test_full_batch_forms_only_when_the_last_item_arrives() -> None:
    stub = StubModel()
    b = await started(stub, max_batch_size=4, max_wait_s=HUGE_WAIT)
    futs = [b.submit_nowait(i) for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in futs) and stub.batches == []  # the first n-1 stay pending
    futs.append(b.submit_nowait(3))
    assert await values(*futs) == [0, 2, 4, 6]
    assert stub.sizes == [4]
    await b.stop()


async def test_many_callers_share_batches_and_keep_order() -> None:
    stub = StubModel()
    b = await started(stub, max_batch_size=8, max_wait_s=HUGE_WAIT)
    results = await asyncio.gather(*(b.submit(i) for i in range(32)))
    assert results == [2 * i for i in range(32)]
    assert stub.sizes == [8, 8, 8, 8]
    assert stub.computed == list(range(32))
    await b.stop()


async def test_items_queued_during_compute_form_the_next_batch() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=64, max_wait_s=0)
    first = b.submit_nowait("a")
    await until(stub.entered.is_set)
    rest = [b.submit_nowait(x) for x in "bcdef"]  # arrive while "a" computes
    gate.set()
    assert await values(first, *rest) == ["aa", "bb", "cc", "dd", "ee", "ff"]
    assert stub.sizes == [1, 5]
    await b.stop()


async def test_max_wait_counts_from_when_the_model_is_free() -> None:
    # "b" has queued for longer than max_wait when the model frees, yet still gets max_wait for
    # companions: "c", submitted by a's done callback after the consumer's own turn, shares its batch.
    # Counted from b's arrival instead, b would be taken alone before c existed.
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=2, max_wait_s=0.05)
    first = b.submit_nowait("a")
    await until(stub.entered.is_set)
    second = b.submit_nowait("b")
    await asyncio.sleep(0.2)  # b is now older than max_wait
    later: list[asyncio.Future] = []
    first.add_done_callback(lambda _f: later.append(b.submit_nowait("c")))
    gate.set()
    assert (await first).value == "aa" and (await second).value == "bb"
    assert (await later[0]).value == "cc"
    assert stub.sizes == [1, 2]
    await b.stop()


async def test_max_wait_zero_takes_what_is_queued_at_once() -> None:
    stub = StubModel()
    b = await started(stub, max_batch_size=64, max_wait_s=0)
    assert await b.submit(1) == 2
    assert stub.sizes == [1]
    await b.stop()


async def test_batch_never_exceeds_max_batch_size() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=3, max_wait_s=0)
    futs = [b.submit_nowait(i) for i in range(10)]
    gate.set()
    await asyncio.gather(*futs)
    assert max(stub.sizes) <= 3 and sum(stub.sizes) == 10
    await b.stop()


async def test_queue_full_is_refused_at_once_with_retry_after() -> None:
    gate = threading.Event()
    b = await started(StubModel(gate=gate), max_batch_size=1, max_wait_s=0, max_queue=2)
    held = b.submit_nowait(0)
    await until(lambda: b.depth == 0)  # item 0 is in the worker now
    queued = [b.submit_nowait(1), b.submit_nowait(2)]
    with pytest.raises(QueueFull) as err:
        b.submit_nowait(3)
    assert err.value.depth == 2 and err.value.retry_after_s > 0
    assert b.stats.refused == 1
    gate.set()
    assert await values(held, *queued) == [0, 2, 4]
    await b.stop()


async def test_retry_after_tracks_depth_and_measured_throughput() -> None:
    assert drain_time_s(250, items_per_s=100.0) == pytest.approx(2.5)
    assert drain_time_s(250, items_per_s=0.0) == 1.0  # nothing measured yet
    assert retry_after_header(2.5) == "3" and retry_after_header(0.01) == "1"


async def test_deadline_answers_queued_item_and_never_computes_it() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=1, max_wait_s=0, timeout_s=0.05)
    held = b.submit_nowait("computing")
    await until(stub.entered.is_set)
    late = b.submit_nowait("late")
    with pytest.raises(DeadlineExceeded):
        await late
    gate.set()
    assert (await held).value == "computingcomputing"
    await b.stop()
    assert "late" not in stub.computed and b.stats.expired == 1


async def test_cancelled_caller_is_skipped_not_computed() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=8, max_wait_s=0)
    held = b.submit_nowait("x")
    await until(stub.entered.is_set)
    caller = asyncio.ensure_future(b.submit("gone"))
    kept = b.submit_nowait("kept")
    await asyncio.sleep(0)
    caller.cancel()
    gate.set()
    assert await values(held, kept) == ["xx", "keptkept"]
    await b.stop()
    assert "gone" not in stub.computed and b.stats.cancelled == 1


async def test_failure_reaches_only_the_items_that_cause_it() -> None:
    stub = StubModel(fail_on=5)
    b = await started(stub, max_batch_size=8, max_wait_s=HUGE_WAIT)
    futs = [b.submit_nowait(i) for i in range(8)]
    outcomes = await asyncio.gather(*futs, return_exceptions=True)
    assert [o.value for i, o in enumerate(outcomes) if i != 5] == [2 * i for i in range(8) if i != 5]
    assert isinstance(outcomes[5], ValueError) and "cannot process 5" in str(outcomes[5])
    assert b.stats.items_failed == 1
    assert await asyncio.gather(*(b.submit(i) for i in range(10, 18))) == [2 * i for i in range(10, 18)]  # serving
    await b.stop()


async def test_wrong_output_length_names_both_numbers() -> None:
    b = await started(StubModel(wrong_length=True), max_batch_size=1, max_wait_s=0)
    with pytest.raises(BatchError, match="returned 0 results for 1 inputs"):
        await b.submit(1)
    await b.stop()


async def test_stop_finishes_everything_queued_and_refuses_new_items() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=4, max_wait_s=0)
    futs = [b.submit_nowait(i) for i in range(10)]
    stopping = asyncio.ensure_future(b.stop())
    await asyncio.sleep(0.01)
    with pytest.raises(BatcherStopped):
        b.submit_nowait(99)
    gate.set()
    await stopping
    assert [f.result().value for f in futs] == [2 * i for i in range(10)]


async def test_healthy_turns_false_when_a_batch_stalls() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate)
    b = await started(stub, max_batch_size=1, max_wait_s=0)
    assert b.healthy(stall_s=60)
    fut = b.submit_nowait(1)
    await until(stub.entered.is_set)
    await asyncio.sleep(0.02)
    assert not b.healthy(stall_s=0.01) and b.healthy(stall_s=60)
    gate.set()
    await fut
    await b.stop()
    assert not b.healthy(stall_s=60)


async def test_batching_beats_one_by_one_on_a_fixed_cost_model() -> None:
    """The stub's cost is fixed + per_item * n, so fewer, larger batches do less work: count it."""
    stub = StubModel(fixed_s=0.0, per_item_s=0.0)
    b = await started(stub, max_batch_size=16, max_wait_s=HUGE_WAIT)
    await asyncio.gather(*(b.submit(i) for i in range(64)))
    assert len(stub.batches) == 4  # 4 fixed costs instead of 64
    await b.stop()


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda xs: xs, max_batch_size=0)


async def test_a_lone_request_goes_straight_to_the_model() -> None:
    # no arrival history, so no companion is likely: even a huge max_wait is not waited out
    stub = StubModel()
    infos: list[BatchInfo] = []
    b = await started(stub, max_batch_size=64, max_wait_s=HUGE_WAIT, on_batch=infos.append)
    assert await asyncio.wait_for(b.submit(1), 10) == 2
    assert stub.sizes == [1] and [i.reason for i in infos] == ["idle"]
    await b.stop()


async def test_done_carries_queue_wait_and_batch_size() -> None:
    stub = StubModel()
    b = await started(stub, max_batch_size=3, max_wait_s=HUGE_WAIT)
    done = await asyncio.gather(*(b.submit_nowait(i) for i in range(3)))
    assert [d.value for d in done] == [0, 2, 4] and {d.batch_size for d in done} == {3}
    assert all(d.queue_wait_s >= 0 for d in done)
    await b.stop()


async def test_a_pass_is_cut_at_the_cost_budget() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate, f=len)
    infos: list[BatchInfo] = []
    b = await started(stub, max_batch_size=64, max_wait_s=0, cost_of=len, max_batch_cost=10, on_batch=infos.append)
    held = b.submit_nowait("x")
    await until(stub.entered.is_set)
    queued = [b.submit_nowait(t) for t in ("aaaa", "bbbb", "cccc", "dddddddddddd")]
    assert b.queued_cost == 24
    gate.set()
    assert await values(held, *queued) == [1, 4, 4, 4, 12]
    assert stub.batches == [["x"], ["aaaa", "bbbb"], ["cccc"], ["dddddddddddd"]]  # an item over budget goes alone
    assert [i.cost for i in infos] == [1, 8, 4, 12] and b.queued_cost == 0
    await b.stop()


async def test_queue_cost_bound_refuses_at_once() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate, f=len)
    b = await started(stub, max_batch_size=1, max_wait_s=0, cost_of=len, max_queue_cost=8)
    held = b.submit_nowait("x")
    await until(lambda: b.depth == 0)
    kept = b.submit_nowait("aaaaaa")
    with pytest.raises(QueueFull) as err:
        b.submit_nowait("bbb")  # 6 + 3 > 8
    assert err.value.reason == "queue_full"
    small = b.submit_nowait("cc")  # 6 + 2 fits
    gate.set()
    assert await values(held, kept, small) == [1, 6, 2]
    await b.stop()


async def test_a_request_that_would_miss_its_deadline_is_refused_on_arrival() -> None:
    gate = threading.Event()
    stub = StubModel(gate=gate, f=len)
    drops: list[str] = []
    b = await started(
        stub, max_batch_size=1, max_wait_s=0, timeout_s=1.0, cost_of=len, admit_by_deadline=True, on_drop=drops.append
    )
    assert b.predicted_answer_s(100) is None  # nothing measured yet: admitted, the 504 path guards it
    b.stats.pass_s_per_cost = 0.1  # as if fitted: 10 cost units a second, no fixed cost
    held = b.submit_nowait("x" * 5)  # 0.5 s
    await until(lambda: b.depth == 0)
    kept = b.submit_nowait("z" * 3)  # 0.3 s, and nothing queued ahead: admitted whatever is predicted
    with pytest.raises(QueueFull) as err:
        b.submit_nowait("y" * 3)  # 0.5 + 0.3 + 0.3 s: cannot be answered within 1 s
    assert err.value.reason == "would_miss_deadline" and err.value.retry_after_s > 0
    assert drops == ["would_miss_deadline"] and b.stats.refused == 1
    gate.set()
    assert await values(held, kept) == [5, 3]
    await b.stop()


async def test_the_deadline_counts_from_when_the_request_arrived() -> None:
    """Time spent before submit (tokenizing, the event loop) is part of REQUEST_TIMEOUT_MS."""
    gate = threading.Event()
    b = await started(StubModel(gate=gate, f=len), max_batch_size=1, timeout_s=1.0, cost_of=len, admit_by_deadline=True)
    b.stats.pass_s_per_cost = 0.1
    held = b.submit_nowait("x" * 3)  # computing (gate closed): at most 0.3 s in flight
    await until(lambda: b.depth == 0)
    queued = b.submit_nowait("q")  # 0.1 s queued ahead
    now = time.monotonic()
    with pytest.raises(QueueFull):
        b.submit_nowait("yy", arrived=now - 0.7)  # 0.7 s gone, up to 0.3 + 0.1 + 0.2 s to come
    kept = b.submit_nowait("yy", arrived=now - 0.1)  # 0.1 s gone: answered within the second
    gate.set()
    assert await values(held, queued, kept) == [3, 1, 2]
    await b.stop()

    gate.clear()  # and the 504 timer: admitted (no fit), it expires when the second since arrival ends
    b = await started(StubModel(gate=gate), max_batch_size=1, timeout_s=1.0)
    held = b.submit_nowait(1)
    await until(lambda: b.depth == 0)
    fresh = b.submit_nowait(3)  # its second starts now
    expiring = b.submit_nowait(2, arrived=time.monotonic() - 0.98)  # queued later, due earlier
    done, _ = await asyncio.wait([expiring, fresh], return_when=asyncio.FIRST_COMPLETED)
    assert done == {expiring} and isinstance(expiring.exception(), DeadlineExceeded)
    gate.set()
    assert await values(held, fresh) == [2, 6]
    await b.stop()


async def test_the_answer_carries_admissions_prediction_when_one_was_made() -> None:
    gate = threading.Event()
    b = await started(StubModel(gate=gate, f=len), max_batch_size=1, timeout_s=1.0, cost_of=len, admit_by_deadline=True)
    b.stats.pass_s_per_cost = 0.1
    held = b.submit_nowait("x" * 3)  # nothing queued ahead: admitted unpredicted
    await until(lambda: b.depth == 0)
    queued = b.submit_nowait("q")  # nothing queued ahead (only the pass in flight): admitted unpredicted
    behind = b.submit_nowait("yy", arrived=time.monotonic() - 0.2)  # 0.2 s gone, then 0.3 + 0.1 + 0.2 at most
    gate.set()
    first, second, third = [await f for f in (held, queued, behind)]
    assert first.predicted_s is None and second.predicted_s is None
    assert third.predicted_s is not None and 0.5 <= third.predicted_s <= 0.8  # counted from its arrival
    await b.stop()


async def test_check_admission_refuses_at_the_door_without_queueing() -> None:
    gate = threading.Event()
    drops: list[str] = []
    b = await started(
        StubModel(gate=gate, f=len),
        max_batch_size=1,
        timeout_s=1.0,
        cost_of=len,
        admit_by_deadline=True,
        on_drop=drops.append,
    )
    b.check_admission(100)  # nothing measured: admitted
    b.stats.pass_s_per_cost = 0.1
    b.check_admission(100)  # nothing queued ahead: always admitted, it would go in the next pass
    held = b.submit_nowait("x" * 3)  # computing (gate closed): 0.3 s in flight
    await until(lambda: b.depth == 0)
    b.check_admission(100)  # still nothing queued ahead
    queued = b.submit_nowait("y")  # 0.1 s queued ahead
    b.check_admission(6)  # at most 0.3 + 0.1 + 0.6 s: within the deadline
    with pytest.raises(QueueFull) as err:
        b.check_admission(7)  # the pass in flight counts: 0.3 + 0.1 + 0.7 s would not be
    assert err.value.reason == "would_miss_deadline" and b.depth == 1
    assert drops == ["would_miss_deadline"] and b.stats.refused == 1
    gate.set()
    assert await values(held, queued) == [3, 1]
    await b.stop()


async def test_every_pass_teaches_the_pass_cost_fit_lone_ones_included() -> None:
    """A lone item after idle time is a pass like any other to an affine fit (its fixed cost is the
    intercept), so 16 of them are enough to predict with."""
    b = await started(
        StubModel(f=len), max_batch_size=1, max_wait_s=0, timeout_s=60.0, cost_of=len, admit_by_deadline=True
    )
    for i in range(15):  # one at a time: the worker idles before each
        assert await values(b.submit_nowait("x" * (i + 1))) == [i + 1]
    assert b.predicted_answer_s(1) is None  # 15 passes: the window is not full yet
    assert await values(b.submit_nowait("x" * 16)) == [16]
    assert b.predicted_answer_s(1) is not None and b.stats.pass_fixed_s + b.stats.pass_s_per_cost > 0
    await b.stop()


def test_fit_pass_cost_splits_fixed_from_per_cost_and_shrugs_off_a_stall() -> None:
    """Passes alternating big (a batch) and small (the stragglers queued behind it), as a closed loop
    makes them, one of them stalled: the fit recovers both terms; a rate would not."""
    samples = [(c, 0.03 + 0.0004 * c) for c in (1400, 10, 1250, 40, 1320, 5, 1500, 80) * 2]
    samples[3] = (40, 1.5)  # a stalled pass (a profiler, a page fault storm)
    fixed, per = fit_pass_cost(samples)
    assert fixed == pytest.approx(0.03, rel=0.05) and per == pytest.approx(0.0004, rel=0.05)
    lowest_rate = min(c / s for c, s in samples)  # what a rate-based prediction risks
    assert 1400 / lowest_rate > 10 * (fixed + per * 1400)
    assert fit_pass_cost([(10, 0.5), (10, 0.7), (10, 0.6)]) == (0.0, pytest.approx(0.06))  # no slope


async def test_prediction_pays_a_fixed_cost_per_pass_ahead() -> None:
    gate = threading.Event()
    b = await started(
        StubModel(gate=gate, f=len),
        max_batch_size=2,
        timeout_s=1.0,
        cost_of=len,
        admit_by_deadline=True,
    )
    b.stats.pass_fixed_s, b.stats.pass_gap_s, b.stats.pass_s_per_cost = 0.1, 0.05, 0.01
    held = b.submit_nowait("x")  # computing (gate closed)
    await until(lambda: b.depth == 0)
    queued = [b.submit_nowait("y" * 10) for _ in range(3)]
    predicted = b.predicted_answer_s(10)  # 4 items of 10 in passes of 2: 2 x (0.1 + 0.05) + 40 x 0.01,
    # plus what remains of the pass in flight: at most its 0.1 + 1 x 0.01
    assert predicted is not None and 0.7 <= predicted <= 0.81
    gate.set()
    assert await values(held, *queued) == [1, 10, 10, 10]
    await b.stop()


async def test_dispatch_reason_says_why_a_batch_started() -> None:
    stub = StubModel()
    infos: list[BatchInfo] = []
    b = await started(stub, max_batch_size=2, max_wait_s=0.05, on_batch=infos.append)
    await asyncio.gather(*(b.submit_nowait(i) for i in range(2)))  # full at once
    third = b.submit_nowait(3)  # arrivals are frequent now, so it waits for a companion that never comes
    await third
    assert [i.reason for i in infos] == ["full", "waited"]
    await b.stop()
