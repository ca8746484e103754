"""Leases and shared state in the real embedded Valkey: one holder, take-over, fencing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.queueing.coordination import Fence, LeaseLost, Leases, SharedState
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from gateway.testing import eventually

TTL = 0.6
"""For the tests of expiry and loss: short, so that they run quickly."""
HOLD_TTL = 3.6
"""For the tests that assert a holder keeps its lease. A holder renews every third of the TTL
and gives up at two thirds without a renewal; a pause of the machine (this process, Valkey)
that begins as a renewal is sent can end the belief after just over a third (the renewal's
answer read after its deadline, the retry given 10 ms): with ``TTL`` a pause of 0.2 s could
make the holder let go and the other contender take over, with this one 1.2 s."""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.from_url(redis_url)
    yield c
    await c.aclose()


class Recorder:
    """Work that records who runs, and how many run at once."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.most_at_once = 0
        self.fences: list[tuple[str, int]] = []
        self.cancelled: list[str] = []

    def work(self, who: str) -> Any:
        async def run(fence: Fence) -> None:
            self.running.add(who)
            self.fences.append((who, fence.token))
            self.most_at_once = max(self.most_at_once, len(self.running))
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(who)
                raise
            finally:
                self.running.discard(who)

        return run


async def test_of_two_contenders_exactly_one_holds(client: Any, prefix: str) -> None:
    keys = Keys(prefix)
    a, b = Leases(client, keys, "same", HOLD_TTL), Leases(client, keys, "same", HOLD_TTL)
    rec = Recorder()
    tasks = [
        asyncio.create_task(a.exclusive("job", rec.work("a"))),
        asyncio.create_task(b.exclusive("job", rec.work("b"))),
    ]
    await eventually(lambda: _true(rec.running))
    first = next(iter(rec.running))
    # several renewal periods pass: the other never starts while the first holds
    for _ in range(4):  # longer than the TTL
        await asyncio.sleep(HOLD_TTL / 3)
        assert rec.running == {first}
    holder = await a.holder_of("job")
    assert holder is not None
    assert holder[0] == (a if first == "a" else b).holder
    # the holder stops cleanly: the other takes over with a larger fence
    tasks[0 if first == "a" else 1].cancel()
    second = "b" if first == "a" else "a"
    await eventually(lambda: _true(rec.running == {second}))
    assert rec.most_at_once == 1
    assert [w for w, _ in rec.fences] == [first, second]
    assert rec.fences[1][1] > rec.fences[0][1]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert await client.exists(keys.lease("job")) == 0  # released on the way out


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from gateway.queueing.coordination import Leases
    from gateway.queueing.keys import Keys

    async def main():
        client = aioredis.from_url(sys.argv[1])
        leases = Leases(client, Keys(sys.argv[2]), "doomed", float(sys.argv[3]))
        async def work(fence):
            print("held", fence.token, flush=True)
            await asyncio.Event().wait()
        await leases.exclusive("job", work)

    asyncio.run(main())
    """
)


async def test_a_killed_holder_is_replaced_after_its_lease_expires(
    client: Any, redis_url: str, prefix: str
) -> None:
    keys = Keys(prefix)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, prefix, "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.startswith("held"), line
        killed_fence = int(line.split()[1])
        ours = Leases(client, keys, "survivor", 3)
        rec = Recorder()
        task = asyncio.create_task(ours.exclusive("job", rec.work("survivor")))
        for _ in range(3):  # the living holder keeps it through several renewals
            await asyncio.sleep(1.0)
            assert not rec.running
        os.kill(proc.pid, signal.SIGKILL)  # no release: its renewals just stop
        await eventually(lambda: _true(rec.running))
        assert rec.fences == [("survivor", rec.fences[0][1])]
        assert rec.fences[0][1] > killed_fence
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        proc.kill()
        proc.wait()


async def test_fencing_tokens_grow_and_a_stale_fence_cannot_write(
    client: Any, prefix: str
) -> None:
    keys = Keys(prefix)
    a, b = Leases(client, keys, "a", TTL), Leases(client, keys, "b", TTL)
    state = SharedState(client, keys, "sms")
    first, _ = await a.acquire("job")
    assert first is not None
    assert (await b.acquire("job"))[0] is None
    assert await state.put("k", "under first", 60, fence=first)
    assert await a.release(first)
    second, _ = await b.acquire("job")
    assert second is not None and second.token > first.token
    assert not await a.renew(first)  # the old acquisition can neither renew ...
    assert not await a.release(first)  # ... nor delete its successor's lease
    with pytest.raises(LeaseLost):
        await state.put("k", "stale", 60, fence=first)
    assert await state.get("k") == b"under first"
    third, _ = await a.acquire("other")
    assert third is not None  # another name, its own counter
    assert await b.renew(second)


async def test_a_lost_lease_cancels_the_work_and_the_holder_contends_again(
    client: Any, prefix: str
) -> None:
    keys = Keys(prefix)
    leases = Leases(client, keys, "a", TTL)
    rec = Recorder()
    task = asyncio.create_task(leases.exclusive("job", rec.work("a")))
    await eventually(lambda: _true(rec.running))
    # someone else holds it now (as after a pause longer than the TTL)
    await client.set(keys.lease("job"), "intruder/999", px=int(TTL * 1000))
    # (a pause of the machine may add a give-up and a re-take of its own: counted, not exact)
    await eventually(lambda: _true(rec.cancelled and not rec.running))
    # the intruder's key expires: the holder takes the lease back with a new fence
    await eventually(lambda: _true(len(rec.fences) >= 2 and rec.running))
    assert rec.fences[-1][1] > rec.fences[0][1]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_redis_away_cancels_the_work_then_it_resumes(own_redis: EmbeddedRedis) -> None:
    client = aioredis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    leases = Leases(client, Keys("gw"), "a", TTL)
    rec = Recorder()
    task = asyncio.create_task(leases.exclusive("job", rec.work("a")))
    try:
        await eventually(lambda: _true(rec.running))
        own_redis.stop_sync()
        fences = len(rec.fences)  # a pause of the machine may have made one more already
        await eventually(lambda: _true(rec.cancelled and not rec.running and not leases.held))
        await asyncio.to_thread(own_redis.start_sync)
        await eventually(lambda: _true(len(rec.fences) > fences and rec.running))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_work_that_ends_releases_and_an_error_propagates(client: Any, prefix: str) -> None:
    keys = Keys(prefix)
    leases = Leases(client, keys, "a", TTL)
    seen: list[int] = []

    async def once(fence: Fence) -> None:
        seen.append(fence.token)

    await leases.exclusive("job", once)
    assert seen and await client.exists(keys.lease("job")) == 0

    async def broken(fence: Fence) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await leases.exclusive("job", broken)
    assert await client.exists(keys.lease("job")) == 0


async def test_shared_state_expires_and_is_taken_once(client: Any, prefix: str) -> None:
    keys = Keys(prefix)
    one, two = SharedState(client, keys, "sms"), SharedState(client, keys, "sms")
    assert await one.put("ref", b"v1", 60)
    assert not await two.put("ref", b"v2", 60, only_new=True)
    assert await two.get("ref") == b"v1"
    assert await two.pop("ref") == b"v1"
    assert await one.pop("ref") is None
    assert await one.put("short", "x", 0.05)
    await eventually(lambda: _none(one.get("short")))
    # parts arriving at two instances: both see the count, only one takes them
    assert await one.hash_add("msg", "1", "Hel", 60) == 1
    assert await two.hash_add("msg", "2", "lo", 60) == 2
    assert await one.hash_all("msg") == {"1": b"Hel", "2": b"lo"}
    taken = await asyncio.gather(one.hash_take("msg"), two.hash_take("msg"))
    assert sorted(len(t) for t in taken) == [0, 2]
    assert await client.pttl(keys.state("sms", "msg")) == -2
    await one.hash_add("ttl", "1", "x", 60)
    assert 0 < await client.pttl(keys.state("sms", "ttl")) <= 60_000
    # scopes do not see each other
    assert await SharedState(client, keys, "mail").get("ttl") is None


async def test_hash_set_writes_many_fields_in_one_fenced_step(client: Any, prefix: str) -> None:
    """``hash_set``: several fields at once (the call tracker's flush), the hash's TTL
    restarted, the field count returned; under a stale fence nothing is written."""
    keys = Keys(prefix)
    state = SharedState(client, keys, "pbx")
    assert await state.hash_add("calls", "old", b"kept", 60) == 1
    records = {f"1733.{n}": f"record {n} \u9648".encode() for n in range(250)}
    assert await state.hash_set("calls", records, 120) == 251
    assert await state.hash_all("calls") == {"old": b"kept", **records}
    assert 60_000 < await client.pttl(keys.state("pbx", "calls")) <= 120_000
    assert await state.hash_set("calls", {}, 120) == 251
    assert await state.hash_remove("calls", *records) == 1
    leases = Leases(client, keys, "a", TTL)
    fence, _ = await leases.acquire("pbx")
    assert fence is not None
    assert await state.hash_set("calls", {"a": b"1", "b": "2"}, 60, fence=fence) == 3
    assert await leases.release(fence)
    with pytest.raises(LeaseLost):
        await state.hash_set("calls", {"c": b"3"}, 60, fence=fence)
    assert sorted(await state.hash_all("calls")) == ["a", "b", "old"]


async def test_remove_if_deletes_only_the_value_it_was_given(client: Any, prefix: str) -> None:
    """Compare-and-delete: a claim that expired and was taken by another is theirs."""
    keys = Keys(prefix)
    state = SharedState(client, keys, "wechat:wx")
    assert await state.put("claim", "mine", 60, only_new=True)
    await client.delete(keys.state("wechat:wx", "claim"))  # expired ...
    assert await state.put("claim", "theirs", 60, only_new=True)  # ... and taken again
    assert not await state.remove_if("claim", "mine")
    assert await state.get("claim") == b"theirs"
    assert await state.remove_if("claim", b"theirs")
    assert await state.get("claim") is None
    assert not await state.remove_if("claim", "theirs")  # absent: nothing to delete
    leases = Leases(client, keys, "a", TTL)
    fence, _ = await leases.acquire("tok")
    assert fence is not None
    assert await state.put("claim", "fenced", 60)
    assert await leases.release(fence)
    with pytest.raises(LeaseLost):
        await state.remove_if("claim", "fenced", fence=fence)
    assert await state.get("claim") == b"fenced"


async def test_admit_counts_across_instances_in_a_window(client: Any, prefix: str) -> None:
    keys = Keys(prefix)
    one, two = SharedState(client, keys, "mail"), SharedState(client, keys, "mail")
    answers = [await (one if i % 2 else two).admit("a@example.org", 3, 3600) for i in range(7)]
    assert answers == [True, True, True, False, False, False, False]
    assert await one.admit("b@example.org", 3, 3600)  # per key
    assert await one.admit("w", 1, 0.05)
    assert not await two.admit("w", 1, 0.05)
    await eventually(lambda: one.admit("w", 1, 0.05))


async def _true(value: object) -> bool:
    return bool(value)


async def _none(value: Any) -> bool:
    return await value is None


async def test_a_frozen_redis_ends_the_belief_in_the_lease_on_time(
    own_redis: EmbeddedRedis,
) -> None:
    """Redis stops answering (SIGSTOP: connections open, no replies, as a frozen server or a
    cut network): the holder stops its work and no longer says it holds the lease, while Redis
    is still frozen, whatever the client's own socket timeout."""
    client = aioredis.from_url(own_redis.url, socket_timeout=30, socket_connect_timeout=30)
    leases = Leases(client, Keys("gw"), "a", TTL)
    rec = Recorder()
    task = asyncio.create_task(leases.exclusive("job", rec.work("a")))
    assert own_redis.process is not None
    pid = own_redis.process.pid
    try:
        await eventually(lambda: _true(rec.running))
        os.kill(pid, signal.SIGSTOP)
        await eventually(lambda: _true(rec.cancelled and not rec.running and not leases.held))
    finally:
        os.kill(pid, signal.SIGCONT)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


class _StopAt(Leases):
    """Leases whose holder is stopped (its task cancelled) just as one Redis call completes:
    the moment Python 3.11's ``asyncio.wait_for`` loses a cancellation."""

    def __init__(self, *args: Any, at: str) -> None:
        super().__init__(*args)
        self.at = at
        self.task: asyncio.Task[None] | None = None

    def _stop_once(self, call: str) -> None:
        if call == self.at and self.task is not None:
            self.task.cancel()
            self.at = ""

    async def acquire(self, name: str) -> tuple[Fence | None, float]:
        result = await super().acquire(name)
        self._stop_once("acquire")
        return result

    async def _extend(self, fence: Fence) -> tuple[bool, bool]:  # the keeper's renewal
        ok = await super()._extend(fence)
        self._stop_once("renew")
        return ok


@pytest.mark.parametrize("at", ["acquire", "renew"])
async def test_a_stop_that_meets_a_completing_lease_call_ends_the_holder(
    client: Any, prefix: str, at: str
) -> None:
    keys = Keys(prefix)
    leases = _StopAt(client, keys, "a", TTL, at=at)
    rec = Recorder()
    task = leases.task = asyncio.create_task(leases.exclusive("job", rec.work("a")))
    # the stop is not lost (with wait_for the holder ran on for ever), its work ends, and the
    # lease is given up at once (not left to expire after the TTL, delaying a take-over)
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done == {task} and task.cancelled()
    assert not rec.running and not leases.held
    assert await leases.holder_of("job") is None


async def test_with_min_replicas_an_acquisition_no_replica_has_is_not_taken(
    client: Any, prefix: str
) -> None:
    """Behind Sentinel a failover may lose an acquisition that no replica had yet, and another
    instance could then take the lease while this one believes in it: with ``min_replicas``
    only an acquisition ``WAIT`` confirms counts (this server has no replica)."""
    keys = Keys(prefix)
    strict = Leases(client, keys, "a", TTL, min_replicas=1, replica_timeout_ms=50)
    fence, _ = await strict.acquire("job")
    assert fence is None
    assert await client.exists(keys.lease("job")) == 0  # given back at once
    loose, _ = await Leases(client, keys, "b", TTL).acquire("job")
    assert loose is not None


async def test_a_wind_down_finishes_through_repeated_cancellations() -> None:
    """Supervisor.stop cancels every 0.1 s while a loop runs on; a lease's wind-down (stop
    the work, release the lease) runs under ``finish``: it ends, then the cancellation goes on."""
    from gateway.queueing.coordination import finish

    released = asyncio.Event()
    step = asyncio.Event()

    async def wind_down() -> None:
        await step.wait()  # e.g. the work still ending, then the compare-and-delete
        released.set()

    task = asyncio.ensure_future(finish(wind_down()))
    for _ in range(3):
        await asyncio.sleep(0)
        task.cancel()
    await asyncio.sleep(0)
    assert not task.done()
    step.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert released.is_set()
