"""The coalescer's batch deadlines (``gateway/queueing/batching.py``): each batch in flight
fails at its own oldest item's submission plus ``timeout``, kept by one timer for them all."""

from __future__ import annotations

import asyncio
import time

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
