"""The Supervisor: background loops restarted after an error, with bounded back-off, and shown
in /readyz and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import aiohttp
import pytest

from gateway.server.metrics import Metrics
from gateway.server.supervise import Backoff, Supervisor, retry
from gateway.testing import eventually


async def test_a_failing_loop_is_restarted_with_bounded_backoff_and_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.server.supervise")
    metrics = Metrics()
    supervisor = Supervisor(metrics)
    runs = 0
    healed = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 6:
            raise OSError(24, "Too many open files")
        healed.set()
        await asyncio.Event().wait()  # runs for good now

    supervisor.spawn("flaky", flaky, backoff=(0.01, 0.04))
    await asyncio.wait_for(healed.wait(), 10)
    state = supervisor.states()["flaky"]
    assert state.state == "running" and state.restarts == 6
    assert state.last_error == "OSError: [Errno 24] Too many open files"
    assert supervisor.ready()[0]
    waits = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"restarting in ([0-9.]+) s", r.getMessage()))
    ]
    assert len(waits) == 6
    assert all("flaky" in r.getMessage() for r in caplog.records)
    assert caplog.records[0].levelno == logging.ERROR and caplog.records[0].exc_info
    assert {r.levelno for r in caplog.records[1:6]} == {logging.WARNING}
    assert waits == [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]  # doubling, bounded (jitter ±10 %)
    text = metrics.render().decode()
    assert 'gateway_loop_restarts_total{loop="flaky"} 6.0' in text
    assert 'gateway_loop_up{loop="flaky"} 1.0' in text
    await supervisor.close()
    assert supervisor.states()["flaky"].state == "stopped"
    assert 'gateway_loop_up{loop="flaky"} 0.0' in metrics.render().decode()


async def test_a_required_loop_that_is_down_fails_readiness_and_a_finished_one_does_not() -> None:
    supervisor = Supervisor()
    release = asyncio.Event()

    async def broken() -> None:
        await release.wait()
        raise ValueError("broken")

    async def done() -> None:
        return

    supervisor.spawn("optional", broken, required=False, backoff=(60.0, 60.0))
    supervisor.spawn("required", broken, backoff=(60.0, 60.0))
    assert supervisor.ready()[0]
    release.set()
    await eventually(lambda: supervisor.states()["required"].state == "restarting")
    await eventually(lambda: supervisor.states()["optional"].state == "restarting")
    ok, detail = supervisor.ready()
    assert not ok
    assert detail["required"]["state"] == "restarting"  # type: ignore[index]
    assert detail["required"]["last_error"] == "ValueError: broken"  # type: ignore[index]
    assert "failing_since" in detail["required"]  # type: ignore[operator]
    await supervisor.stop("required")
    assert supervisor.ready()[0]  # an optional loop being down does not fail readiness
    supervisor.degrade("optional", "no progress")  # only a running loop can be degraded
    assert supervisor.states()["optional"].state == "restarting"
    await supervisor.close()


async def test_degraded_loop_fails_readiness_until_cleared(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.server.supervise")
    supervisor = Supervisor()
    supervisor.spawn("replay", asyncio.Event().wait)
    supervisor.degrade("replay", "spool not draining for 30 s")
    supervisor.degrade("replay", "spool not draining for 31 s")
    ok, detail = supervisor.ready()
    assert not ok and detail["replay"]["problem"] == "spool not draining for 31 s"  # type: ignore[index]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    supervisor.degrade("replay", None)
    assert supervisor.ready()[0]
    await supervisor.close()


async def test_gateway_readyz_and_metrics_show_a_loop_that_is_down(start_gateway) -> None:
    gw = await start_gateway()
    assert {"replayer", "replies"} <= set(gw.supervisor.states())

    async def broken() -> None:
        raise ConnectionResetError("peer went away")

    gw.supervisor.spawn("poller", broken, backoff=(30.0, 30.0))
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{gw.http_port}"
        async with session.get(f"{url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503, body
        assert body["loops"]["poller"]["state"] == "restarting"
        assert body["loops"]["replayer"]["state"] == "running"
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
        assert 'gateway_loop_up{loop="poller"} 0.0' in text
        assert 'gateway_loop_restarts_total{loop="poller"} 1.0' in text
        assert 'gateway_loop_up{loop="replayer"} 1.0' in text
        await gw.supervisor.stop("poller")
        async with session.get(f"{url}/readyz") as resp:
            assert resp.status == 200


async def test_embedded_server_killed_under_the_gateway_is_started_again(start_gateway) -> None:
    """The embedded server is SIGKILLed while the gateway runs: contacts go to the spool, the
    supervised loop ``embedded-redis`` starts the server again, and the spool is replayed."""
    from tests.queueing.test_intake import inbound

    gw = await start_gateway(url="", redis={"write_timeout": "300ms"})
    assert gw.embedded is not None and gw.embedded.process is not None
    first_pid = gw.embedded.process.pid
    before = await gw.intake.submit(inbound(external_id="before"))
    gw.embedded.kill_sync()
    await eventually(lambda: gw.supervisor.states()["embedded-redis"].restarts >= 1)
    during = await gw.intake.submit(inbound(external_id="during"))
    assert during.status in ("spooled", "enqueued")  # spooled unless the server is back yet
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up, 30)
    assert gw.embedded.process is not None and gw.embedded.process.pid != first_pid
    ids = sorted(c.id for c in await gw.read_contacts())
    assert ids == sorted([before.contact_id, during.contact_id])  # the AOF kept the first
    await eventually(lambda: gw.supervisor.ready()[0], 30)


async def test_stop_ends_a_loop_that_lost_its_cancellation(caplog) -> None:
    """On Python 3.11 ``asyncio.wait_for`` can lose a cancellation that arrives as its inner
    future completes; a loop around it goes on. stop() cancels again; a loop that never ends
    is logged and left behind instead of hanging the gateway's shutdown."""
    supervisor = Supervisor()
    lost = 0

    async def loses_one() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()  # what the lost cancellation looks like to the loop

    released = False

    async def never_ends() -> None:  # ignores every cancellation until the test releases it
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    supervisor.spawn("loses-one", loses_one)
    supervisor.spawn("never-ends", never_ends)
    await asyncio.sleep(0)
    await asyncio.wait_for(supervisor.stop("loses-one"), 10)
    assert lost == 1 and supervisor.states()["loses-one"].state == "stopped"
    caplog.set_level(logging.ERROR, logger="gateway.server.supervise")
    await asyncio.wait_for(supervisor.stop("never-ends", timeout_s=0.5), 10)
    assert any("never-ends: still running" in r.getMessage() for r in caplog.records)
    released = True


def test_backoff_doubles_to_its_bound_and_starts_again_after_reset() -> None:
    backoff = Backoff(0.5, 3.0, jitter=0.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5
    assert [backoff.nth(n) for n in (1, 2, 3, 4, 100)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = Backoff(1.0, 1.0)
    assert all(0.9 <= jittered.next() <= 1.1 for _ in range(50))


async def test_retry_gives_up_after_its_attempts_with_the_last_failure() -> None:
    calls: list[int] = []
    noted: list[int] = []

    async def failing() -> None:
        calls.append(len(calls) + 1)
        raise ConnectionError(f"try {len(calls)}")

    with pytest.raises(ConnectionError, match="try 3"):
        await retry(failing, on=ConnectionError, backoff=Backoff(0.001, 0.001), attempts=3,
                    note=lambda attempt, exc, pause: noted.append(attempt))
    assert calls == [1, 2, 3] and noted == [1, 2]


async def test_retry_returns_once_a_call_passes_and_lets_other_errors_through() -> None:
    answers: list[BaseException | str] = [OSError("away"), OSError("away"), "done"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await retry(call, on=OSError, backoff=Backoff(0.001, 0.001)) == "done"

    async def wrong() -> None:
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        await retry(wrong, on=OSError, backoff=Backoff(0.001, 0.001), attempts=5)


async def test_retry_within_cancels_a_call_that_outlives_the_time() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hangs() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await retry(hangs, on=OSError, backoff=Backoff(0.01, 0.01), within=0.05)
    assert started.is_set() and cancelled.is_set()


async def test_retry_is_cancelled_from_outside_even_inside_its_time_bound() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    task = asyncio.ensure_future(
        retry(hangs, on=OSError, backoff=Backoff(0.01, 0.01), within=60.0)
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_lost_cancellation_does_not_let_the_next_blocking_read_finish() -> None:
    """The reply router, the aggregator and the push lanes block up to 1 s in XREADGROUP;
    redis-py sends each command through ``asyncio.wait_for``, which on Python 3.11 loses the
    stop's cancellation about once in five gateway stops. stop() waited 1 s before cancelling
    again, so the next read ran to its end: a second added to shutdown, and to the teardown of
    one gateway test in several. Here the loop loses the cancellation, then starts a read that
    ends on its own after 0.9 s: the repeated cancellation must interrupt it (nine times the
    0.1 s the supervisor now waits before repeating; the old 1 s let it end)."""
    supervisor = Supervisor()
    reads_done = 0

    async def reader() -> None:
        nonlocal reads_done
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # lost, as in wait_for
        await asyncio.sleep(0.9)  # the next blocking read: XREADGROUP ... BLOCK
        reads_done += 1

    supervisor.spawn("reader", reader)
    await asyncio.sleep(0)
    await supervisor.stop("reader")
    assert reads_done == 0
