"""The intake write's own connection (``gateway/queueing/link.py``) against a real Valkey: the
client's settings, script reloads, and batches whose outcome is unknown."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.cases.watcher import DeadlineWatcher
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.queueing.store import RedisQueue, connect
from gateway.records import Inbound, Sender
from gateway.server.config import WatcherSection
from gateway.testing import eventually
from tests.harness import ServerRelay


def inbound(external_id: str) -> Inbound:
    return Inbound(
        channel="sms",
        adapter="test",
        external_id=external_id,
        sender=Sender("+8613800138000"),
        recipient="12345",
        received_at=SYSTEM_CLOCK.now_us(),
        text="hello",
    )


async def test_batches_go_with_the_clients_password_and_database(start_gateway, own_redis):
    """The connection is made by the client's own settings: AUTH and SELECT as in the URL."""
    admin = aioredis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret-link")
    try:
        gw = await start_gateway(url=f"{own_redis.url}?db=3", redis={"password": "s3cret-link"})
        receipts = await asyncio.gather(*(gw.intake.submit(inbound(f"a{i}")) for i in range(50)))
        assert {r.status for r in receipts} == {"enqueued"}
        assert gw.queue._link.link is not None and not gw.queue._link.link.closed  # over the link
        await admin.execute_command("AUTH", "s3cret-link")
        await admin.execute_command("SELECT", "3")
        assert await admin.xlen(gw.keys.contacts) == 50
        await admin.execute_command("SELECT", "0")
        assert await admin.xlen(gw.keys.contacts) == 0
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_scripts_flushed_under_the_link_are_loaded_again_and_written_once(
    start_gateway, redis_client
):
    gw = await start_gateway()
    assert (await gw.intake.submit(inbound("before"))).status == "enqueued"
    await redis_client.script_flush()
    receipts = await asyncio.gather(*(gw.intake.submit(inbound(f"f{i}")) for i in range(40)))
    assert {r.status for r in receipts} == {"enqueued"}
    contacts = await gw.read_contacts()
    assert sorted(c.external_id for c in contacts) == sorted(
        ["before", *(f"f{i}" for i in range(40))]
    )


async def test_the_link_is_open_before_the_first_contact(start_gateway):
    """Opened with the scripts' load at start (and again when Redis comes back): the first
    contact's write_timeout does not also cover a connect and handshake (under heavy load,
    several round trips to a server waiting for its turn on the CPU)."""
    gw = await start_gateway()
    link = gw.queue._link.link
    assert link is not None and not link.closed
    assert (await gw.intake.submit(inbound("one"))).status == "enqueued"
    assert gw.queue._link.link is link


async def test_a_link_closed_by_the_server_between_batches_is_opened_again(
    start_gateway, redis_client
):
    """An idle link the server dropped (a ``timeout`` setting, a restart) fails no contact
    that comes after: the next batch finds it closed and opens a new one."""
    gw = await start_gateway()
    assert (await gw.intake.submit(inbound("one"))).status == "enqueued"
    first = gw.queue._link.link
    assert first is not None
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await eventually(lambda: first.closed)
    assert (await gw.intake.submit(inbound("two"))).status == "enqueued"
    assert gw.queue._link.link is not first
    assert len(await gw.read_contacts()) == 2


async def test_a_link_the_server_closed_unseen_is_opened_again_before_the_write(
    start_gateway, redis_url
):
    """The server closed the idle link (CLIENT KILL from a blocking client: the event loop has
    not run since, so the link has not seen the end): the next batch is not written on it and
    spooled, but sent on a new link, as redis-py's pool reconnects a connection found closed."""
    import redis

    gw = await start_gateway()
    assert (await gw.intake.submit(inbound("one"))).status == "enqueued"
    first = gw.queue._link.link
    assert first is not None
    blocking = redis.Redis.from_url(redis_url)
    try:
        blocking.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        blocking.close()
    assert not first.closed
    [result] = await gw.queue.write_batch([gw.intake.prepare(inbound("two"))], limited=True)
    assert not isinstance(result, Exception), result
    assert result.created
    assert gw.queue._link.link is not first and first.closed


async def test_every_batch_in_flight_on_a_link_killed_mid_write_is_settled_once(
    start_gateway, redis_client
):
    """Batches share the link in order; killing it fails every one still waiting (their
    outcome unknown): each of those contacts is spooled, replayed, and found once. Writes are
    paused (``CLIENT PAUSE WRITE`` holds scripts), so the batches are surely in flight."""
    gw = await start_gateway(redis={"max_batch": 20, "write_timeout": "5s"})
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None
    await redis_client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        # three batches: the first contact alone (the link was idle: written from its
        # submitter's own step), the 39 submitted meanwhile in two (max_batch)
        items = [inbound(f"k{i}") for i in range(40)]
        tasks = [asyncio.ensure_future(gw.intake.submit(i)) for i in items]
        await eventually(lambda: len(link._waiting) == 3)  # all sent, held by the pause
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        receipts = await asyncio.gather(*tasks)
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    assert {r.status for r in receipts} == {"spooled"}
    await eventually(lambda: gw.spool.depth == 0)
    contacts = await gw.read_contacts()
    expected = ["warm", *(i.external_id for i in items)]
    assert sorted(c.external_id for c in contacts) == sorted(expected)
    by_external = {c.external_id: c.id for c in contacts}
    assert [by_external[i.external_id] for i in items] == [r.contact_id for r in receipts]


async def test_a_lone_contact_is_written_in_its_submitters_own_step(start_gateway):
    """Nothing in flight: the contact is encoded and written on the link by the submitting
    task itself, before it first waits (no batch task, no turns of the loop between: at low
    and moderate rates every contact), and answered from the link's reply callback."""
    gw = await start_gateway()
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    await asyncio.sleep(0)  # the warm-up batch's end seen
    link = gw.queue._link.link
    assert link is not None and not link._waiting
    submitting = asyncio.ensure_future(gw.intake.submit(inbound("lone")))
    await asyncio.sleep(0)  # the submitter's first step, and nothing else
    assert len(link._waiting) == 1
    receipt = await submitting
    assert receipt.status == "enqueued"
    [contact] = [c for c in await gw.read_contacts() if c.external_id == "lone"]
    assert contact.id == receipt.contact_id


async def test_a_contact_is_sent_while_earlier_batches_wait_on_redis(start_gateway, redis_client):
    """Batches are pipelined on the link: a contact submitted while earlier batches wait for
    Redis is written at once (its ``enqueued_at`` stamp, taken when its batch is sent, comes
    before Redis answers any of them), not after a batch ahead of it came back."""
    gw = await start_gateway(redis={"write_timeout": "10s"})
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None
    waiting = 3  # batches ahead of the last one, all waiting on the paused server
    await redis_client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    try:
        tasks = []
        for i in range(waiting + 1):  # each in a batch of its own, sent before the next
            tasks.append(asyncio.ensure_future(gw.intake.submit(inbound(f"p{i}"))))
            await eventually(lambda n=i + 1: len(link._waiting) == n)
        released_at = SYSTEM_CLOCK.now_us()
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    receipts = await asyncio.gather(*tasks)
    assert {r.status for r in receipts} == {"enqueued"}
    contacts = [c for c in await gw.read_contacts() if c.external_id != "warm"]
    assert len(contacts) == waiting + 1
    assert all(c.enqueued_at < released_at for c in contacts)


async def test_a_batch_given_up_leaves_the_batches_behind_it_on_the_link(
    start_gateway, redis_client
):
    """Defect: a caller that gave up (its batch's ``write_timeout``) closed the link, failing
    every batch behind it too; under load one late batch spooled all eight in flight. Now only
    the late batch is spooled (and written once: the replay finds it written), and the batch
    behind it is answered on the same link when Redis answers, within its own deadline."""
    gw = await start_gateway(redis={"write_timeout": "3s"})
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None
    await redis_client.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
    try:
        late = asyncio.ensure_future(gw.intake.submit(inbound("late")))
        await eventually(lambda: len(link._waiting) == 1)
        # the second batch's deadline comes 2 s after the first's: more than a pause of the
        # machine takes (past both deadlines, the late one's timer failed both)
        await asyncio.sleep(2.0)
        behind = asyncio.ensure_future(gw.intake.submit(inbound("behind")))
        await eventually(lambda: len(link._waiting) == 2)
        assert (await late).status == "spooled"  # its deadline passed while Redis was paused
        assert not behind.done() and not link.closed
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    assert (await behind).status == "enqueued"
    assert gw.queue._link.link is link and not link.closed
    await eventually(lambda: gw.spool.depth == 0)
    contacts = await gw.read_contacts()
    assert sorted(c.external_id for c in contacts) == ["behind", "late", "warm"]


async def test_batches_go_over_tls(start_gateway, redis_server, certificate):
    """A ``rediss://`` URL: the link takes over redis-py's TLS connection (the bundled Valkey
    has no TLS, so a TLS relay in front of it terminates it, as a proxy would)."""
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    relay = ServerRelay(redis_server)
    url = await relay.start(tls=context)
    try:
        gw = await start_gateway(url=f"{url}?ssl_ca_certs={cert}")
        receipts = await asyncio.gather(*(gw.intake.submit(inbound(f"t{i}")) for i in range(30)))
        assert {r.status for r in receipts} == {"enqueued"}
        link = gw.queue._link.link
        assert link is not None and not link.closed
        assert link.transport.get_extra_info("ssl_object") is not None  # TLS under the link
        assert len(await gw.read_contacts()) == 30
    finally:
        relay.close()


async def test_with_min_replicas_batches_keep_pooled_connections(start_gateway, own_redis):
    """A ``WAIT`` holds the connection it was sent on until the replicas answer: with
    ``min_replicas`` the batches do not queue behind each other's on the link (here no replica
    answers, so each is spooled by its own deadline)."""
    gw = await start_gateway(url=own_redis.url, redis={"min_replicas": 1, "write_timeout": "200ms"})
    receipts = await asyncio.gather(*(gw.intake.submit(inbound(f"w{i}")) for i in range(3)))
    assert {r.status for r in receipts} == {"spooled"}
    assert gw.queue._link.link is None


async def test_a_link_without_a_reply_for_its_read_timeout_is_closed(start_gateway, redis_client):
    """The link's own bound (the connection's socket timeout), for callers without a shorter
    deadline of their own: the oldest batch gets no reply within ``read_timeout``, so it fails
    with TimeoutError and the link is closed, failing the batch behind it as late too (not as
    a lost connection, whose reads ``execute`` sends again); the next batch goes on a new
    link. (One timer keeps the bound for every batch in flight, not one each.)"""
    from gateway.queueing.store import pack_commands

    gw = await start_gateway(redis={"write_timeout": "30s"})
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None
    link.read_timeout = 0.5  # the connection's socket timeout is longer: the warm-up's
    if link._watch is not None:  # timer is due by that, so it is set again by the next batch
        link._watch.cancel()
        link._watch = None
    await redis_client.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
    try:
        first = asyncio.ensure_future(link.send(pack_commands([["SET", "p:1", "1"]]), 1))
        await eventually(lambda: len(link._waiting) == 1)
        behind = asyncio.ensure_future(link.send(pack_commands([["SET", "p:2", "2"]]), 1))
        await eventually(lambda: len(link._waiting) == 2)
        outcomes = await asyncio.gather(first, behind, return_exceptions=True)
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    assert isinstance(outcomes[0], TimeoutError)
    assert isinstance(outcomes[1], TimeoutError)
    assert link.closed and not link._waiting
    assert (await gw.intake.submit(inbound("after"))).status == "enqueued"
    assert gw.queue._link.link is not link


async def test_batches_answered_in_time_one_after_another_keep_the_link(
    start_gateway, redis_client
):
    """The bound runs from each batch's own send: batches that each wait on Redis for less
    than ``read_timeout``, one after another for longer than it in all, are all answered on
    the same link."""
    from gateway.queueing.store import pack_commands

    gw = await start_gateway(redis={"write_timeout": "30s"})
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None
    link.read_timeout = 1.5
    if link._watch is not None:
        link._watch.cancel()
        link._watch = None
    for i in range(4):  # each held 0.6 s by the paused server: 2.4 s in all
        await redis_client.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        assert await link.send(pack_commands([["SET", f"q:{i}", "1"]]), 1) == [b"OK"]
    assert not link.closed and gw.queue._link.link is link


async def test_plain_commands_share_a_connection_of_their_own(start_gateway, redis_url):
    """``RedisQueue.execute`` (the aggregator's marks, the surge counters): pipelined on a
    connection apart from the intake link, error replies as values, and a connection the
    server closed unseen is replaced before the next commands, as the intake link is. (The
    gateway's own watcher is off: its looks share this connection four times a second, and
    one in flight when the server kills it fails the commands written behind it, as on the
    intake link, instead of their finding the connection gone.)"""
    import redis
    from redis.exceptions import ResponseError

    gw = await start_gateway(watcher={"enabled": False})
    queue = gw.queue
    key = f"{gw.keys.tag}:side-test"
    first, second = await asyncio.gather(
        queue.execute([["SET", key, "a"], ["INCR", key], ["GET", key]]),
        queue.execute([["APPEND", key, "b"], ["GET", key]]),
    )
    assert first[0] is True or first[0] == b"OK"
    assert isinstance(first[1], ResponseError) and first[2] == b"a"  # a value, not raised
    assert second == [2, b"ab"]
    side = queue._side.link
    assert side is not None and side is not queue._link.link and not side.closed
    blocking = redis.Redis.from_url(redis_url)
    try:
        blocking.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        blocking.close()
    assert await queue.execute([["GET", key]]) == [b"ab"]
    assert queue._side.link is not side and side.closed
    assert (await gw.intake.submit(inbound("after"))).status == "enqueued"


async def test_an_answer_that_raises_does_not_end_the_link(start_gateway, caplog):
    """A batch's answer runs in the link's reply callback (``Link.start``): one that raises (a
    defect) is logged, and the link and the batches behind it go on (raised into the
    transport's callback, it ended the connection and failed every batch on it)."""
    from gateway.queueing.store import pack_commands

    gw = await start_gateway()
    assert (await gw.intake.submit(inbound("warm"))).status == "enqueued"
    link = gw.queue._link.link
    assert link is not None

    def broken(replies: object, error: object) -> None:
        raise RuntimeError("a defect")

    link.start(pack_commands([["PING"]]), 1, broken)
    behind = await link.send(pack_commands([["ECHO", "behind"]]), 1)
    assert behind == [b"behind"] and not link.closed
    assert "a batch's answer failed" in caplog.text


class CutOnce(ServerRelay):
    """A relay in front of the embedded server that, the first time a client sends
    ``command``, closes that client's connection instead of passing the command on: the
    command was in flight when its connection was lost, and never ran."""

    def __init__(self, server: Any, command: bytes) -> None:
        super().__init__(server)
        self.command = command
        self.cut = 0

    async def passing(self, command: list[Any]) -> bool:
        if command[0].upper() == self.command and not self.cut:
            self.cut += 1
            return False
        return True


@contextlib.asynccontextmanager
async def cut_queue(gw: Any, server: Any, command: bytes) -> AsyncIterator[tuple[CutOnce, Any]]:
    """A ``RedisQueue`` of the gateway's keys over a ``CutOnce`` relay, its scripts loaded."""
    relay = CutOnce(server, command)
    client = connect(gw.settings.redis, await relay.start())
    queue = RedisQueue(client, gw.keys, SYSTEM_CLOCK, source="cut", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=86400, maxlen=100_000)
    try:
        await queue.load_scripts()
        yield relay, queue
    finally:
        await queue.aclose()
        await client.aclose()
        relay.close()


async def test_reads_on_a_connection_lost_under_them_are_sent_again(start_gateway, redis_server):
    """The plain commands' connection lost while commands are on it (a Redis restart, a
    failover, ``CLIENT KILL``): reads go once more on a new connection, so a stamp whose
    read of the contact's facts was on it is written all the same (it was spooled, and a
    close through the API answered 503); other commands fail, never sent twice."""
    gw = await start_gateway(watcher={"enabled": False})
    cid = (await gw.intake.submit(inbound("cut"))).contact_id
    key = f"{gw.keys.tag}:cut-test"
    async with cut_queue(gw, redis_server, b"HMGET") as (relay, queue):
        await queue.execute([["PING"]])  # the plain commands' connection, open
        side = queue._side.link
        event = await queue.stamp(cid, "responded", SYSTEM_CLOCK.now_us(), "test")
        assert relay.cut == 1 and side.closed and queue._side.link is not side
        assert event is not None and event.type == "responded"
        types = [f[b"type"] for _, f in await gw.redis.xrange(gw.keys.events)]
        assert types == [b"enqueued", b"responded"]
        assert await queue.execute([["HMGET", key, "a"]], reads=True) == [[None]]
    async with cut_queue(gw, redis_server, b"ZRANGEBYSCORE") as (relay, queue):
        await queue.execute([["PING"]])
        side = queue._side.link
        watcher = DeadlineWatcher(queue, SYSTEM_CLOCK, gw.metrics, WatcherSection())
        assert await watcher.tick() == 0  # its look, sent again
        assert relay.cut == 1 and side.closed and queue._side.link is not side
    async with cut_queue(gw, redis_server, b"INCR") as (relay, queue):
        await queue.execute([["PING"]])
        try:
            await queue.execute([["INCR", key]])
        except RedisConnectionError:
            pass
        else:
            raise AssertionError("a write on a lost connection is not sent again")
        assert relay.cut == 1 and await gw.redis.get(key) is None
        assert await queue.execute([["INCR", key]]) == [1]  # on a new connection
