"""Coalescing: concurrent callers' items are processed together, one batch per round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Answer = Callable[[list[R] | None, Exception | None], None]
"""Where a batch sent by ``start`` reports: ``(results, None)`` or ``(None, error)``, once."""


class Coalescer(Generic[T, R]):
    """Collects items from concurrent callers and hands them to ``process`` in batches.

    While ``max_inflight`` batches are being processed, new items wait and join the next batch,
    so the batch size grows with the load and a lone caller is never delayed by a timer.
    ``process`` returns one result per item, or raises to fail the whole batch.

    ``timeout``: one deadline per batch, not one per caller: a batch is processed under a
    deadline of its oldest item's submission plus ``timeout`` (items are taken in order), so no
    item waits longer than ``timeout`` for its outcome, and a batch that misses its deadline
    fails every item with ``TimeoutError``. The deadlines of the batches in flight are kept by
    one timer, due by the oldest's (batches start in order, so theirs come first), and set
    again for the next when it fires early: one timer a ``timeout`` while batches follow each
    other, instead of an ``asyncio.timeout`` set and cancelled per batch (a libuv timer each
    on uvloop, about 10 us; at low rates every contact is a batch of its own).

    ``orphan``: a caller that gives up cancels its future, not the item (the batch goes on);
    ``orphan(item, result, error)`` is then called with the item's outcome once it is known
    (``error`` when the batch raised), so that the owner can settle it.

    ``start``: a way to send a batch without a wait, when there is one. An item submitted while
    nothing waits and fewer than ``max_inflight`` batches are in flight, all of them sent so
    (the common case at low and moderate rates, where every item is a batch of its own and often
    comes while the one before is still at the server), is handed to ``start([item], answer)``
    in the submitter's own step: it sends it at once and returns True, and later calls
    ``answer(results, None)`` or ``answer(None, error)`` once, from a callback (the reply's
    arrival); or returns False, having done nothing, and the item takes the task's way. This
    saves the hand-offs of a batch of one (a callback to start its batch, a task, its first
    step, and on the way back the task's wake and the caller's): each a turn of the event loop
    in which whatever else is ready (other sessions, background loops) runs first. One item a
    turn of the loop goes so: the items submitted after it in the same turn (a burst read at
    once) wait and are coalesced as before, as do items while all the slots are taken, while
    others wait, or while a batch is in flight in a task (which may not have written yet): no
    item is written before one submitted earlier (but for a batch sent again after a server
    lost its scripts, by ``start`` or by ``process``: ``RedisQueue``). While batch tasks
    follow each other (contacts coming faster than a round trip after a burst), items keep
    the task's way until none is in flight. The deadline, ``orphan`` and ``drain`` hold for
    such a batch as for the others; a raise from ``start`` fails the item as a raise from
    ``process`` would.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 256,
        max_inflight: int = 2,
        timeout: float | None = None,
        orphan: Callable[[T, R | None, Exception | None], None] | None = None,
        start: Callable[[list[T], Answer[R]], bool] | None = None,
    ) -> None:
        self._process = process
        self._start = start
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._orphan = orphan
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._inflight: set[_Batch] = set()
        self._scheduled = False
        self._due: dict[_Batch, float] = {}
        """The batches in flight under ``timeout``, in the order they started, with their
        deadlines (the loop's clock). ``_check`` takes out a batch it cancels for its
        deadline: a batch in flight and not here was cancelled so (not from outside)."""
        self._watch: asyncio.TimerHandle | None = None
        self._tasks = 0
        """Batches in flight in a task of their own (``_kick``): while there is one, no item
        goes by ``start``, which would write it before the task's batch, submitted earlier
        (a task writes in its first step, a turn of the loop or more later; ``intake.lua``
        counts a sender's repeats in the order the contacts are written)."""
        self._sent_this_turn = False
        """A batch went by ``start`` in this turn of the loop: the items that follow in the
        same turn wait and are coalesced (``_turn_over``, called soon, clears it)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        """The running loop, kept (``_running``): on Python 3.11 each
        ``asyncio.get_running_loop()`` is a ``getpid`` system call."""

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            running = asyncio.get_running_loop()
            if running is not loop:  # a new loop: the last one's turn is over (a batch
                # task or a scheduled kick left on a closed loop is not undone here: a
                # serving process has one loop, tests one per coalescer)
                self._sent_this_turn = False
            loop = self._loop = running
        return loop

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves with its result."""
        loop = self._running()
        future: asyncio.Future[R] = loop.create_future()
        entry = (item, future, loop.time())
        if (
            self._start is not None
            and not self._pending
            and not self._tasks
            and not self._sent_this_turn
            and len(self._inflight) < self._max_inflight
        ):
            sent = _Sent(self, [entry])
            try:
                started = self._start([item], sent.answer)
            except Exception as exc:  # as process raising: this batch fails
                future.set_exception(exc)
                return future
            if started:
                self._sent_this_turn = True
                loop.call_soon(self._turn_over)
                self._track(loop, sent, entry[2])
                return future
        self._pending.append(entry)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._kick)
        return future

    def _turn_over(self) -> None:
        self._sent_this_turn = False

    def _track(self, loop: asyncio.AbstractEventLoop, batch: _Batch, oldest: float) -> None:
        """``batch`` is in flight: under its deadline, kept by the one timer."""
        self._inflight.add(batch)
        if self._timeout is not None:
            due = self._due[batch] = oldest + self._timeout
            if self._watch is None:  # else it is due by an earlier batch's deadline
                self._watch = loop.call_at(due, self._check)

    def _kick(self) -> None:
        self._scheduled = False
        loop = self._running()
        while self._pending and len(self._inflight) < self._max_inflight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            task = loop.create_task(self._run(batch))
            task.add_done_callback(self._done)
            self._tasks += 1
            self._track(loop, task, batch[0][2])

    def _check(self) -> None:
        """The timer: cancel the batches whose deadline has passed, then set it again for
        the first one still in flight, if any.

        The cancellation is sent one callback later (``_expire``): a batch started by a
        ``_kick`` that ran just before this, in the same turn of the loop, has not run its
        first step yet (its items waited their whole ``timeout`` for a slot, as after a stall
        of the loop), and a task cancelled before its first step never enters ``_run``: its
        callers' futures would never be resolved. Its first step was scheduled before this
        callback, so it comes first and the cancellation finds it inside ``_run``."""
        self._watch = None
        loop = self._running()
        now = loop.time()
        for task, due in list(self._due.items()):
            if due > now:
                self._watch = loop.call_at(due, self._check)
                return
            del self._due[task]
            if not task.done():
                loop.call_soon(self._expire, task)

    @staticmethod
    def _expire(task: _Batch) -> None:
        if not task.done():
            task.cancel()

    def _done(self, task: _Batch) -> None:
        # called once a batch (a task's done callback, a _Sent's first answer); only the
        # tasks are counted in _tasks
        if task in self._inflight and task.__class__ is not _Sent:
            self._tasks -= 1
        self._inflight.discard(task)
        self._due.pop(task, None)
        if self._pending and not self._scheduled:
            self._scheduled = True
            self._running().call_soon(self._kick)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R], float]]) -> None:
        items = [item for item, _, _ in batch]
        try:
            try:
                results = await self._process(items)
            except asyncio.CancelledError as cancelled:
                task = asyncio.current_task()
                # its deadline (and no cancellation from outside as well): TimeoutError, as
                # asyncio.timeout would raise
                expired = self._timeout is not None and task not in self._due
                if expired and task is not None and task.uncancel() == 0:
                    raise TimeoutError from cancelled
                raise
        except Exception as exc:
            self._deliver(batch, None, exc)
            return
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        self._deliver(batch, results, None)

    def _deliver(
        self,
        batch: list[tuple[T, asyncio.Future[R], float]],
        results: list[R] | None,
        error: Exception | None,
    ) -> None:
        """A batch's outcome to its callers, or to ``orphan`` for those who gave up."""
        if error is not None or results is None:
            exc = error if error is not None else RuntimeError("a batch without results")
            for item, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
                elif self._orphan is not None:  # cancelled: its caller gave up
                    self._orphan(item, None, exc)
            return
        for (item, future, _), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
            elif self._orphan is not None:
                self._orphan(item, result, None)

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._inflight)

    async def drain(self) -> None:
        """Wait until every queued item has been processed."""
        while self._pending or self._inflight:
            if self._inflight:
                waits: set[asyncio.Future[Any]] = {
                    b.finished() if isinstance(b, _Sent) else b for b in self._inflight
                }
                await asyncio.wait(waits)
            else:
                await asyncio.sleep(0)


class _Sent(Generic[T, R]):
    """A batch ``start`` sent from its submitter's step: in flight, with no task, until its
    answer or its deadline (``cancel``, from the coalescer's timer), whichever comes first;
    the other is then ignored (a late answer's replies were read and dropped)."""

    __slots__ = ("_waiter", "batch", "coalescer", "ended")

    def __init__(
        self, coalescer: Coalescer[T, R], batch: list[tuple[T, asyncio.Future[R], float]]
    ) -> None:
        self.coalescer = coalescer
        self.batch = batch
        self.ended = False
        self._waiter: asyncio.Future[None] | None = None

    def done(self) -> bool:
        return self.ended

    def cancel(self) -> bool:
        """Its deadline passed: ``TimeoutError`` for its callers, as a task's batch gets."""
        if self.ended:
            return False
        self.answer(None, TimeoutError())
        return True

    def answer(self, results: list[R] | None, error: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        coalescer = self.coalescer
        try:
            coalescer._deliver(self.batch, results, error)
        finally:
            coalescer._done(self)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def finished(self) -> asyncio.Future[None]:
        """A future done once the batch has ended (``drain``)."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
            if self.ended:
                self._waiter.set_result(None)
        return self._waiter


_Batch = asyncio.Task[None] | _Sent[Any, Any]
"""A batch in flight: a task running ``process``, or one ``start`` sent."""
