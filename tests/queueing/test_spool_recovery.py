"""The spool after hard times: a torn line on a full disk, a segment that cannot be set aside,
a replay that makes no progress, and a restart while Redis is away."""

from __future__ import annotations

import logging
import os

import aiohttp
import redis

from gateway.server.runtime import Gateway
from gateway.server.workers import WorkerRole, run_dir
from gateway.testing import eventually
from tests.harness import settings_for
from tests.queueing.test_intake import inbound


async def readyz(gw: Gateway) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gw.http_port}/readyz") as resp:
            return resp.status, await resp.json()


async def spool_with_torn_line(gw: Gateway, own_redis, count: int) -> os.PathLike:
    """Spool ``count`` contacts while Redis is down, close the segment, and tear its end the
    way a crash mid-write would."""
    own_redis.stop_sync()
    for i in range(count):
        assert (await gw.intake.submit(inbound(external_id=f"t{i}"))).status == "spooled"
    await gw.spool.rotate()
    (segment,) = gw.spool.segments(include_active=True)
    with open(segment, "ab") as fh:
        fh.write(b'0badc0de {"id": "torn')
    return segment


async def test_torn_line_on_a_full_disk_does_not_stall_the_replay(start_gateway, own_redis):
    """The torn line cannot be copied to quarantine (the write answers ENOSPC, as on a full
    disk): the other records are replayed and the segment is moved to quarantine whole."""
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    segment = await spool_with_torn_line(gw, own_redis, 3)
    gw.spool.quarantine_dir.mkdir(exist_ok=True)
    os.symlink("/dev/full", gw.spool.quarantine_dir / segment.name)
    own_redis.start_sync()
    await eventually(lambda: gw.intake.redis_up and not gw.spool.segments(include_active=True), 30)
    contacts = await gw.read_contacts()
    assert sorted(c.external_id for c in contacts) == ["t0", "t1", "t2"]
    moved = gw.spool.quarantine_dir / f"{segment.name}.unsettled"
    assert moved.read_bytes().endswith(b'0badc0de {"id": "torn')
    assert (await gw.intake.submit(inbound(external_id="after"))).status == "enqueued"
    status, body = await readyz(gw)
    assert status == 200, body


async def test_a_segment_that_cannot_be_set_aside_fails_readiness_not_intake(
    start_gateway, own_redis, caplog
):
    """Quarantine is not a folder (ENOTDIR for every write and rename into it): the segment is
    stuck, readiness fails with a WARNING, new contacts still go to Redis; once the operator
    clears the way, the segment is settled and the gateway is ready again."""
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    segment = await spool_with_torn_line(gw, own_redis, 2)
    gw.spool.stuck_retry_s = 0.2
    gw.spool.quarantine_dir.rmdir()
    gw.spool.quarantine_dir.write_text("not a folder")
    own_redis.start_sync()
    await eventually(lambda: gw.spool.stuck, 30)
    await eventually(lambda: gw.intake.redis_up, 30)
    assert sorted(c.external_id for c in await gw.read_contacts()) == ["t0", "t1"]
    assert (await gw.intake.submit(inbound(external_id="meanwhile"))).status == "enqueued"
    status, body = await readyz(gw)
    assert status == 503
    assert body["loops"]["replayer"]["state"] == "degraded"
    assert segment.name in body["loops"]["replayer"]["problem"]
    assert any(
        r.levelno == logging.WARNING and "replayer" in r.getMessage() for r in caplog.records
    )
    gw.spool.quarantine_dir.unlink()  # the operator makes room
    await eventually(lambda: not gw.spool.stuck, 30)
    # retried with room: the torn line is quarantined as usual and the segment removed
    assert (gw.spool.quarantine_dir / segment.name).read_bytes() == b'0badc0de {"id": "torn'
    assert not segment.exists()
    await eventually(lambda: gw.supervisor.ready()[0], 30)
    contacts = await gw.read_contacts()
    assert sorted(c.external_id for c in contacts) == ["meanwhile", "t0", "t1"]


async def test_a_replay_that_makes_no_progress_fails_readiness(start_gateway, own_redis, caplog):
    """Redis answers PING but refuses every write (a replica: READONLY, a transient error): the
    replay is stalled, so /readyz fails and says why, with a WARNING; it recovers by itself."""
    caplog.set_level(logging.WARNING)
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    gw.intake.stall_after_s = 0.5
    admin = redis.Redis.from_url(own_redis.url)
    admin.replicaof("127.0.0.1", "1")  # a master that never answers
    try:
        receipt = await gw.intake.submit(inbound(external_id="readonly"))
        assert receipt.status == "spooled"
        await eventually(lambda: gw.supervisor.states()["replayer"].state == "degraded", 30)
        status, body = await readyz(gw)
        assert status == 503
        assert "replay stalled" in body["loops"]["replayer"]["problem"]
        assert any("replay stalled" in r.getMessage() for r in caplog.records)
    finally:
        admin.replicaof("NO", "ONE")
        admin.close()
    await eventually(lambda: gw.spool.depth == 0 and gw.supervisor.ready()[0], 30)
    assert [c.id for c in await gw.read_contacts()] == [receipt.contact_id]


async def test_a_retried_contact_keeps_its_first_id_across_a_restart_while_redis_is_down(
    tmp_path, own_redis, prefix
):
    """Spooled, gateway restarted with Redis still down, the peer retries: the retry gets the
    first id (the spool's own index), and the replay writes that contact once with that id."""
    settings, configs = settings_for(
        tmp_path / "gw", own_redis.url, prefix, redis={"write_timeout": "2s"}
    )
    own_redis.stop_sync()
    first = Gateway(settings, configs)
    await first.start()
    try:
        receipt = await first.intake.submit(inbound(external_id="kannel-42"))
        assert receipt.status == "spooled"
    finally:
        await first.stop()
    second = Gateway(settings, configs)
    await second.start()
    try:
        retried = await second.intake.submit(inbound(external_id="kannel-42"))
        assert (retried.status, retried.contact_id) == ("duplicate", receipt.contact_id)
        other = await second.intake.submit(inbound(external_id="kannel-43"))
        assert other.status == "spooled"
        own_redis.start_sync()
        await eventually(lambda: second.spool.depth == 0 and second.intake.redis_up, 30)
        contacts = await second.read_contacts()
        assert sorted((c.external_id, c.id) for c in contacts) == [
            ("kannel-42", receipt.contact_id),
            ("kannel-43", other.contact_id),
        ]
        # once replayed, Redis's own dedupe answers with the same first id
        again = await second.intake.submit(inbound(external_id="kannel-42"))
        assert (again.status, again.contact_id) == ("duplicate", receipt.contact_id)
    finally:
        await second.stop()


async def test_a_one_process_start_replays_what_workers_of_a_larger_run_spooled(
    tmp_path, own_redis, prefix
):
    """A worker of ``serve --workers 2`` spools into ``spool/worker-1`` while Redis is down; the
    host then starts as one process (``--workers 1``, or fewer cores): those contacts were
    acknowledged, so the start moves them into its own ``spool/`` and replays them. (Only the
    parent of N > 1 moved folders before: one process never read ``spool/worker-K``.)"""
    settings, configs = settings_for(
        tmp_path / "gw", own_redis.url, prefix, redis={"write_timeout": "2s"}
    )
    run_dir(settings.gateway.data_dir.resolve()).mkdir(parents=True)
    own_redis.stop_sync()
    role = WorkerRole(slot=1, count=2, parent=os.getpid(), redis_url=own_redis.url)
    worker = Gateway(settings, configs, worker=role)
    await worker.start()
    try:
        receipt = await worker.intake.submit(inbound(external_id="kannel-7"))
        assert receipt.status == "spooled"
    finally:
        await worker.stop()
    own_redis.start_sync()
    alone = Gateway(settings, configs)
    await alone.start()
    try:
        await eventually(lambda: alone.spool.depth == 0 and alone.intake.redis_up, 30)
        contacts = await eventually(alone.read_contacts, 30)
        assert [(c.external_id, c.id) for c in contacts] == [("kannel-7", receipt.contact_id)]
    finally:
        await alone.stop()
