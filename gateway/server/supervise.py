"""Supervised background loops: restarted after an error, visible in ``/readyz`` and metrics.

The whole API::

    supervisor = Supervisor(metrics)              # one per Gateway (``Gateway.supervisor``)
    supervisor.spawn("replayer", intake.replay_forever, required=True)
    supervisor.spawn("telegram-bot1", poll, backoff=(1.0, 60.0))
    ok, detail = supervisor.ready()               # False while a required loop is down
    supervisor.states()                           # {"replayer": LoopState(...), ...}
    await supervisor.stop("telegram-bot1")        # cancel one loop and wait for it
    await supervisor.close()                      # cancel all (Gateway.stop)

``spawn(name, run, ...)`` calls ``run()`` (a coroutine function without arguments) in a task
of its own. When the coroutine raises, the failure is logged with the loop's name (ERROR with
the traceback for the first failure in a row, WARNING for the ones that follow), the loop is
``restarting`` from that moment, and ``run()`` is called again after a back-off that starts at
``backoff[0]`` seconds and doubles up to ``backoff[1]`` (±10 % jitter, so a fleet does not
retry in step). The back-off starts again from ``backoff[0]`` once a run has lasted at least
``backoff[1]`` seconds. A coroutine that returns is ``finished`` and not restarted (a loop
ends itself when its owner stops it); cancelling it through ``stop``/``close`` is ``stopped``.

While a ``required`` loop is ``restarting`` (or ``finished`` without being stopped), ``ready()``
answers False: ``/readyz`` fails. Metrics: ``gateway_loop_up{loop}`` (1 while running) and
``gateway_loop_restarts_total{loop}``.

A loop may also report a problem it survives without raising (a replay that makes no
progress): ``supervisor.degrade(name, reason)`` marks it ``degraded`` (readiness fails if it
is required, WARNING logged once) and ``supervisor.degrade(name, None)`` clears it.

Work that retries inside a loop (a send, a connect, a poll) uses the same back-off, ``Backoff``
(doubling pauses with jitter, ``reset()`` after a success), or ``retry(call, on=..., ...)``
around one call, bounded by a number of ``attempts`` or a time ``within`` (``asyncio.timeout``,
not ``asyncio.wait_for``: on Python 3.11 that loses a cancellation that meets a completing
call)::

    backoff = Backoff(1.0, 30.0)
    while True:
        try:
            updates = await poll()
        except NetworkError:
            await backoff.sleep()
            continue
        backoff.reset()

    receipt = await retry(lambda: intake.submit(inbound), on=IntakeUnavailable,
                          backoff=Backoff(0.1, 1.0), within=4.0)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from gateway.contact.clock import format_time
from gateway.server.metrics import Metrics

log = logging.getLogger(__name__)

State = Literal["running", "restarting", "degraded", "finished", "stopped"]

LoopFunction = Callable[[], Coroutine[Any, Any, None]]


@dataclasses.dataclass(slots=True)
class LoopState:
    """What ``/readyz`` shows of one loop; ``since`` is wall-clock microseconds."""

    name: str
    required: bool
    state: State = "running"
    since: int = 0
    restarts: int = 0
    last_error: str | None = None
    failing_since: int | None = None
    """The first failure of the current row of failures (cleared after a long enough run)."""
    problem: str | None = None

    @property
    def down(self) -> bool:
        """True when a required loop is not doing its work."""
        return self.required and self.state in ("restarting", "degraded", "finished")

    def as_dict(self) -> dict[str, object]:
        detail: dict[str, object] = {
            "state": self.state,
            "since": format_time(self.since),
            "restarts": self.restarts,
        }
        if self.last_error is not None:
            detail["last_error"] = self.last_error
        if self.failing_since is not None:
            detail["failing_since"] = format_time(self.failing_since)
        if self.problem is not None:
            detail["problem"] = self.problem
        return detail


T = TypeVar("T")


class Backoff:
    """Pauses that start at ``first`` seconds and double up to ``most``, each varied by
    ``jitter`` (±10 %: a fleet does not retry in step); ``reset()`` starts again from ``first``."""

    def __init__(self, first: float, most: float, *, jitter: float = 0.1) -> None:
        self.first = first
        self.most = max(first, most)
        self.jitter = jitter
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next(self) -> float:
        """The pause to wait now (the following one doubles)."""
        pause, self._next = self._next, min(self._next * 2, self.most)
        return pause * random.uniform(1 - self.jitter, 1 + self.jitter)

    async def sleep(self, at_least: float = 0.0) -> float:
        """Wait the next pause (or ``at_least``, when the peer asked for longer); return it."""
        pause = max(self.next(), at_least)
        await asyncio.sleep(pause)
        return pause

    def nth(self, attempt: int) -> float:
        """The pause after failed ``attempt`` (1, 2, ...), without jitter, for work that keeps
        its own count of attempts (a scheduled item, a delivery)."""
        return min(self.most, self.first * (1 << min(max(attempt - 1, 0), 62)))


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    on: type[BaseException] | tuple[type[BaseException], ...],
    backoff: Backoff,
    attempts: int | None = None,
    within: float | None = None,
    note: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call ``call()`` until it returns, pausing by ``backoff`` after each failure ``on``;
    other exceptions pass through.

    With ``attempts``, at most that many calls: the last failure is raised. With ``within``
    seconds, the calls and pauses all end by then: a call still running is cancelled and
    ``TimeoutError`` raised; a failure with too little time left for another call is raised.
    ``note(attempt, exc, pause)`` is told of each failure that is retried (to log it).
    """
    loop = asyncio.get_running_loop()
    deadline = None if within is None else loop.time() + within
    attempt = 0
    while True:
        attempt += 1
        try:
            if deadline is None:
                return await call()
            async with asyncio.timeout_at(deadline):
                return await call()
        except on as exc:
            pause = backoff.next()
            if attempts is not None and attempt >= attempts:
                raise
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise
                pause = min(pause, left)
            if note is not None:
                note(attempt, exc, pause)
            await asyncio.sleep(pause)


class Supervisor:
    """Runs named background loops and restarts each after an error (see the module docs)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._loops: dict[str, LoopState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def spawn(
        self,
        name: str,
        run: LoopFunction,
        *,
        required: bool = True,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> LoopState:
        """Start ``run()`` as loop ``name`` (a name not running already) and return its state."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"loop {name!r} is already running")
        state = LoopState(name, required, since=_now_us())
        self._loops[name] = state
        self._set_up(name, True)
        task = asyncio.get_running_loop().create_task(self._supervise(state, run, backoff))
        task.set_name(f"loop:{name}")
        self._tasks[name] = task
        return state

    def states(self) -> dict[str, LoopState]:
        return dict(self._loops)

    def ready(self) -> tuple[bool, dict[str, object]]:
        """(False if a required loop is down, each loop's state) for ``/readyz``."""
        ok = not any(state.down for state in self._loops.values())
        return ok, {name: state.as_dict() for name, state in self._loops.items()}

    def degrade(self, name: str, problem: str | None) -> None:
        """Mark a running loop as not making progress (``problem``), or clear it (None)."""
        state = self._loops.get(name)
        if state is None or state.state not in ("running", "degraded"):
            return
        if problem is None:
            if state.state == "degraded":
                log.warning("loop %s: recovered from: %s", name, state.problem)
                state.state, state.problem, state.since = "running", None, _now_us()
                self._set_up(name, True)
            return
        if state.state != "degraded":
            log.warning("loop %s: %s", name, problem)
            state.state, state.since = "degraded", _now_us()
            self._set_up(name, False)
        state.problem = problem

    async def stop(self, name: str, timeout_s: float = 10.0) -> None:
        """Cancel loop ``name`` and wait for it to end.

        The cancellation is repeated every 0.1 s while the loop runs on: on Python 3.11
        ``asyncio.wait_for`` loses a cancellation that arrives as its inner future completes
        (redis-py sends every command through it), and the loop then goes on into its next
        blocking read (a second of shutdown for the reply router, the aggregator, a push
        lane) or for ever. Clean-up that must finish despite a repeated cancellation (a
        lease's release) shields itself (``queueing.coordination.finish``). A loop still
        running after ``timeout_s`` is logged with where it is and left behind.
        """
        task = self._tasks.pop(name, None)
        if task is None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while not task.done() and loop.time() < until:
            task.cancel()
            await asyncio.wait({task}, timeout=min(0.1, max(0.0, until - loop.time())))
        if not task.done():
            frames = "; ".join(
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()
            )
            log.error(
                "loop %s: still running %.0f s after its cancellation: %s", name, timeout_s, frames
            )
        elif not task.cancelled():
            task.exception()  # retrieved: the runner only ends by cancellation
        state = self._loops.get(name)
        if state is not None:
            state.state, state.since = "stopped", _now_us()
        self._set_up(name, False)

    async def close(self) -> None:
        """Stop every loop."""
        for name in list(self._tasks):
            await self.stop(name)

    async def _supervise(
        self, state: LoopState, run: LoopFunction, backoff: tuple[float, float]
    ) -> None:
        delays = Backoff(*backoff)
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await run()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                exc: BaseException = asyncio.CancelledError("the loop cancelled itself")
            except Exception as error:
                exc = error
            else:
                state.state, state.since = "finished", _now_us()
                self._set_up(state.name, False)
                if state.required and failures:
                    log.warning("loop %s: finished after %d restarts", state.name, failures)
                return
            if time.monotonic() - started >= delays.most:
                failures, state.failing_since = 0, None
                delays.reset()
            failures += 1
            state.restarts += 1
            state.last_error = f"{type(exc).__name__}: {exc}"[:500]
            now = _now_us()
            if failures == 1:
                state.failing_since = now
            state.state, state.since, state.problem = "restarting", now, None
            self._set_up(state.name, False)
            if self.metrics is not None:
                self.metrics.loop_restarts.labels(state.name).inc()
            wait = delays.next()
            if failures == 1:
                log.error("loop %s failed, restarting in %.2f s", state.name, wait, exc_info=exc)
            else:
                log.warning(
                    "loop %s failed again (%d in a row: %s), restarting in %.2f s",
                    state.name,
                    failures,
                    state.last_error,
                    wait,
                )
            await asyncio.sleep(wait)
            self._running_again(state)

    def _running_again(self, state: LoopState) -> None:
        state.state, state.since = "running", _now_us()
        self._set_up(state.name, True)

    def _set_up(self, name: str, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.loop_up.labels(name).set(1 if up else 0)


def _now_us() -> int:
    return time.time_ns() // 1000
