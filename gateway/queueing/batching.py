"""Coalescing: concurrent callers' items are processed together, one batch per round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 256,
        max_inflight: int = 2,
        timeout: float | None = None,
        orphan: Callable[[T, R | None, Exception | None], None] | None = None,
    ) -> None:
        self._process = process
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._orphan = orphan
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._due: dict[asyncio.Task[None], float] = {}
        """The batches in flight under ``timeout``, in the order they started, with their
        deadlines (the loop's clock). ``_check`` takes out a batch it cancels for its
        deadline: a batch in flight and not here was cancelled so (not from outside)."""
        self._watch: asyncio.TimerHandle | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves with its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future, loop.time()))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and len(self._inflight) < self._max_inflight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            task = loop.create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._done)
            if self._timeout is not None:
                due = self._due[task] = batch[0][2] + self._timeout
                if self._watch is None:  # else it is due by an earlier batch's deadline
                    self._watch = loop.call_at(due, self._check)

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
        loop = asyncio.get_running_loop()
        now = loop.time()
        for task, due in list(self._due.items()):
            if due > now:
                self._watch = loop.call_at(due, self._check)
                return
            del self._due[task]
            if not task.done():
                loop.call_soon(self._expire, task)

    @staticmethod
    def _expire(task: asyncio.Task[None]) -> None:
        if not task.done():
            task.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._due.pop(task, None)
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)

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
            for item, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
                elif self._orphan is not None:  # cancelled: its caller gave up
                    self._orphan(item, None, exc)
            return
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
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
                await asyncio.wait(set(self._inflight))
            else:
                await asyncio.sleep(0)
