"""The coalescer's batch deadlines (``gateway/queueing/batching.py``): each batch in flight
fails at its own oldest item's submission plus ``timeout``, kept by one timer for them all;
and ``start``: a batch of one sent from its submitter's own step, while only such batches are
in flight."""

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
    # (a pause of the machine longer than the gap between the two deadlines, before the late
    # one's timer runs, would find both past them: the gap is 1.5 s)
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=4, timeout=2.5)
    late = coalescer.submit("a")
    await asyncio.sleep(1.5)  # the second batch starts 1.5 s after the first: its deadline too
    behind = coalescer.submit("b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert process.seen == [["a"], ["b"]]
    with pytest.raises(TimeoutError):
        await late
    assert not behind.done()  # its own deadline is 1.5 s later
    process.gates[1].set()
    assert await behind == "ok:b"
    after = coalescer.submit("c")  # a batch after a quiet spell still has its deadline
    with pytest.raises(TimeoutError):
        await after
    await coalescer.drain()
    assert not coalescer.busy and coalescer._watch is None


async def test_batches_answered_in_time_one_after_another_are_never_timed_out() -> None:
    process = Gate()
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=2, timeout=2.0)
    for n in range(5):  # 0.6 s each, 3 s in all: longer than timeout, each within it
        future = coalescer.submit(str(n))
        await asyncio.sleep(0)
        await asyncio.sleep(0.6)
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
    coalescer: Coalescer[str, str] = Coalescer(process, max_inflight=1, timeout=1.0)
    first = coalescer.submit("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    waiting = coalescer.submit("b")  # no slot: it waits for a's batch
    first.add_done_callback(lambda _: time.sleep(1.1))  # the stall, past b's deadline
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


async def test_an_item_is_started_while_others_are_in_flight_if_a_slot_is_free() -> None:
    """Not only a lone item: an item that comes in a later turn of the loop, while nothing
    waits and fewer than ``max_inflight`` batches are in flight, is started in its
    submitter's step too (at paced rates a call arrives while the one before is still at
    Valkey). The slots bound it: once they are all taken, items wait and coalesce, and
    while items wait none goes past them."""
    process = Gate()
    start = Starter()
    coalescer: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=start,
                                               max_inflight=2)
    first = coalescer.submit("a")
    await asyncio.sleep(0)  # a later turn: "a" is still in flight
    second = coalescer.submit("b")
    assert start.started == [["a"], ["b"]] and process.seen == []
    await asyncio.sleep(0)
    waiting = [coalescer.submit("c"), coalescer.submit("d")]  # both slots taken
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert start.started == [["a"], ["b"]] and process.seen == []
    start.answers[0](["ok:a"], None)  # a slot frees; "c" and "d" are due next
    late = coalescer.submit("e")  # in the same step: it must not go before them
    assert start.started == [["a"], ["b"]]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert process.seen == [["c", "d", "e"]]
    start.answers[1](["ok:b"], None)
    process.gates[0].set()
    assert [await f for f in (first, second, *waiting, late)] == [
        "ok:a", "ok:b", "ok:c", "ok:d", "ok:e"]
    await coalescer.drain()
    assert not coalescer.busy


async def test_items_of_one_turn_after_a_started_one_coalesce_even_with_free_slots() -> None:
    """One item a turn of the loop goes by ``start``: those submitted in the same turn after
    it (a burst read at once) wait and go as one batch, as at the peak, not one batch each."""
    process = Gate()
    start = Starter()
    coalescer: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=start,
                                               max_inflight=8)
    held = coalescer.submit("a")
    await asyncio.sleep(0)
    burst = [coalescer.submit(x) for x in "bcd"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert start.started == [["a"], ["b"]] and process.seen == [["c", "d"]]
    start.answers[0](["ok:a"], None)
    start.answers[1](["ok:b"], None)
    process.gates[0].set()
    assert [await f for f in (held, *burst)] == ["ok:a", "ok:b", "ok:c", "ok:d"]


async def test_no_item_is_written_before_a_batch_task_submitted_earlier() -> None:
    """A batch in a task writes in its first step, a turn of the loop or more after it was
    made: an item submitted meanwhile waits for it (and goes by ``start`` again only once
    no such batch is in flight), so the writes keep the order of the submits."""
    log: list[tuple[str, list[str]]] = []
    start = Starter()

    def starting(items: list[str], answer: Callable[[list[str] | None, Exception | None],
                                                    None]) -> bool:
        log.append(("start", items))
        return start(items, answer)

    async def process(items: list[str]) -> list[str]:
        log.append(("process", items))
        return [f"ok:{item}" for item in items]

    coalescer: Coalescer[str, str] = Coalescer(process, timeout=5.0, start=starting,
                                               max_inflight=8)
    a, b = coalescer.submit("a"), coalescer.submit("b")  # "b" waits: one a turn goes by start
    await asyncio.sleep(0)  # the turn in which "b"'s batch task is made
    c = coalescer.submit("c")
    for _ in range(4):
        await asyncio.sleep(0)
    assert log == [("start", ["a"]), ("process", ["b"]), ("process", ["c"])]
    start.answers[0](["ok:a"], None)
    assert [await f for f in (a, b, c)] == ["ok:a", "ok:b", "ok:c"]
    await asyncio.sleep(0)  # the tasks' ends seen: the next item goes by start again
    d = coalescer.submit("d")
    assert log[-1] == ("start", ["d"])
    start.answers[-1](["ok:d"], None)
    assert await d == "ok:d"


async def test_started_batches_and_a_task_batch_in_flight_each_fail_at_their_own_deadline(
) -> None:
    """Several batches sent by ``start`` (a slot each) and a batch task, all unanswered under
    the one timer: each fails with ``TimeoutError``, none before its own oldest item's
    submission plus ``timeout``; their late answers are dropped, and once none is in flight
    the next item goes by ``start`` again."""
    process = Gate()
    start = Starter()
    timeout = 0.3
    coalescer: Coalescer[str, str] = Coalescer(process, timeout=timeout, start=start,
                                               max_inflight=8)
    submitted: dict[str, float] = {}

    def submit(item: str) -> asyncio.Future[str]:
        submitted[item] = time.monotonic()
        return coalescer.submit(item)

    a = submit("a")
    await asyncio.sleep(0.05)
    b = submit("b")
    await asyncio.sleep(0.05)
    x, y = submit("x"), submit("y")  # one turn: "x" by start, "y" in a batch task
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert start.started == [["a"], ["b"], ["x"]] and process.seen == [["y"]]
    failed: dict[str, float] = {}
    for name, future in (("a", a), ("b", b), ("x", x), ("y", y)):
        with pytest.raises(TimeoutError):
            await future
        failed[name] = time.monotonic()
    for name in "abxy":
        assert failed[name] - submitted[name] >= timeout - 0.02, name
    await asyncio.sleep(0)  # the batch task's end is seen (its done callback)
    assert not coalescer.busy and coalescer._tasks == 0
    for answer, items in zip(start.answers, start.started, strict=True):
        answer([f"ok:{i}" for i in items], None)  # their replies came after all: dropped
    assert isinstance(a.exception(), TimeoutError)
    nxt = coalescer.submit("n")
    assert start.started[-1] == ["n"]
    start.answers[-1](["ok:n"], None)
    assert await nxt == "ok:n"


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
