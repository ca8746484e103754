"""The coalescer's batch deadlines (``gateway/queueing/batching.py``): each batch in flight
fails at its own oldest item's submission plus ``timeout``, kept by one timer for them all;
and ``start``: a lone item's batch sent from its submitter's own step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gateway.queueing.batching import Coalescer


class Gate:
    """A batch process that answers each batch when the test opens its gate."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []
        self.seen: list[list[str]] = []

    async def __call__(self, items: list[str]) -> list[str]:
        gate = asyncio.Event()
        self.gates.append(gate)
        self.seen.append(items)
        await gate.wait()
        return [f"ok:{item}" for item in items]


async def test_a_late_batch_fails_at_its_deadline_and_the_batches_behind_keep_theirs() -> None:
    process = Gate()
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=4, timeout=0.6)
    late = coalescer.submit("a")
    await asyncio.sleep(0.4)  # the second batch starts 0.4 s after the first: its deadline too
    behind = coalescer.submit("b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert process.seen == [["a"], ["b"]]
    with pytest.raises(TimeoutError):
        await late
    assert not behind.done()  # its own deadline is 0.4 s later
    process.gates[1].set()
    assert await behind == "ok:b"
    after = coalescer.submit("c")  # a batch after a quiet spell still has its deadline
    with pytest.raises(TimeoutError):
        await after
    await coalescer.drain()
    assert not coalescer.busy and coalescer._watch is None


async def test_batches_answered_in_time_one_after_another_are_never_timed_out() -> None:
    process = Gate()
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=2, timeout=1.0)
    for n in range(3):  # 0.4 s each, 1.2 s in all: longer than timeout, each within it
        future = coalescer.submit(str(n))
        await asyncio.sleep(0)
        await asyncio.sleep(0.4)
        process.gates[-1].set()
        assert await future == f"ok:{n}"
    await coalescer.drain()
    assert not coalescer.busy


async def test_a_caller_giving_up_is_not_a_deadline() -> None:
    """The caller's cancellation cancels its future only: the batch goes on and its outcome
    goes to ``orphan``; the deadline still applies to the batch."""
    process = Gate()
    orphaned: list[tuple[str, str | None, Exception | None]] = []
    coalescer: Coalescer[str, str] = Coalescer(
        process, timeout=5.0, orphan=lambda item, result, error: orphaned.append(
            (item, result, error))
    )
    future = coalescer.submit("x")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    future.cancel()
    process.gates[0].set()
    await coalescer.drain()
    assert orphaned == [("x", "ok:x", None)]


async def test_a_batch_past_its_deadline_while_it_waited_for_a_slot_still_fails() -> None:
    """Review finding on baccdfa: the loop stalls as the batch before it ends, so the next
    batch starts (``_kick``) with its deadline already past and the timer's ``_check`` right
    behind it in the same turn of the loop. Cancelled before its first step, the batch never
    entered ``_run``, and its caller's future was never resolved (fails before: not done)."""
    process = Gate()
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=1, timeout=0.2)
    first = coalescer.submit("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    waiting = coalescer.submit("b")  # no slot: it waits for a's batch
    first.add_done_callback(lambda _: time.sleep(0.3))  # the stall, past b's deadline
    process.gates[0].set()
    assert await first == "ok:a"
    await coalescer.drain()
    assert waiting.done()
    assert isinstance(waiting.exception(), TimeoutError)
    assert not coalescer.busy and coalescer._watch is None


class Starter:
    """A ``start`` that sends a batch at once (True) and keeps its answer, or declines."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.started: list[list[str]] = []
        self.answers: list[Callable[[list[str] | None, Exception | None], None]] = []

    def __call__(
        self, items: list[str], answer: Callable[[list[str] | None, Exception | None], None]
    ) -> bool:
        if not self.accept:
            return False
        self.started.append(items)
        self.answers.append(answer)
        return True


async def test_a_lone_item_is_started_in_its_submitters_step_and_the_next_ones_coalesce() -> None:
    """Nothing in flight: the item is handed to ``start`` before ``submit`` returns (no task,
    no turn of the loop); what comes while it is in flight waits and goes as one batch."""
    process = Gate()
    start = Starter()
    coalescer: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=start)
    lone = coalescer.submit("a")
    assert start.started == [["a"]] and process.seen == []
    behind = [coalescer.submit("b"), coalescer.submit("c")]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert start.started == [["a"]] and process.seen == [["b", "c"]]
    start.answers[0](["ok:a"], None)
    assert await lone == "ok:a"
    process.gates[0].set()
    assert [await f for f in behind] == ["ok:b", "ok:c"]
    await asyncio.sleep(0)  # the batch task's end is seen (its done callback)
    after = coalescer.submit("d")  # idle again: started at once
    assert start.started[-1] == ["d"]
    start.answers[-1](None, ConnectionError("lost"))
    with pytest.raises(ConnectionError):
        await after
    await coalescer.drain()
    assert not coalescer.busy


async def test_a_started_batch_fails_at_its_deadline_and_its_late_answer_is_dropped() -> None:
    start = Starter()
    coalescer: Coalescer[str, str] = Coalescer(Gate(), timeout=0.2, start=start)
    late = coalescer.submit("a")
    with pytest.raises(TimeoutError):
        await late
    assert not coalescer.busy and coalescer._watch is None
    start.answers[0](["ok:a"], None)  # its replies came after all: read and dropped
    assert isinstance(late.exception(), TimeoutError)
    nxt = coalescer.submit("b")  # the next one is started: nothing is in flight
    assert start.started[-1] == ["b"]
    start.answers[-1](["ok:b"], None)
    assert await nxt == "ok:b"


async def test_a_caller_giving_up_on_a_started_batch_leaves_its_outcome_to_orphan() -> None:
    orphaned: list[tuple[str, str | None, Exception | None]] = []
    start = Starter()
    coalescer: Coalescer[str, str] = Coalescer(
        Gate(), timeout=5.0, start=start,
        orphan=lambda item, result, error: orphaned.append((item, result, error)),
    )
    future = coalescer.submit("x")
    future.cancel()
    assert coalescer.busy  # the batch goes on
    drained = asyncio.ensure_future(coalescer.drain())
    await asyncio.sleep(0.05)
    assert not drained.done()  # drain waits for a started batch too
    start.answers[0](["ok:x"], None)
    await drained
    assert orphaned == [("x", "ok:x", None)]


async def test_a_start_that_declines_or_raises() -> None:
    """Declined: the item takes the task's way, as without ``start``. Raised: the item fails
    with the error, as when ``process`` raises."""
    process = Gate()
    coalescer: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=Starter(False))
    declined = coalescer.submit("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert process.seen == [["a"]]
    process.gates[0].set()
    assert await declined == "ok:a"

    def broken(items: list[str], answer: object) -> bool:
        raise OSError("write failed")

    failing: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=broken)
    with pytest.raises(OSError, match="write failed"):
        await failing.submit("b")
    assert not failing.busy
