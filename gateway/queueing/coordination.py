"""Fleet coordination in Redis: leases with fencing tokens, and shared state with expiry.

Several gateway instances may share one Redis (one by the PBX, one in the DMZ, one per data
centre). Whatever must run once per fleet (a Telegram bot's poller, the deadline watcher, an
Asterisk's AMI tracker, a push subscriber's lane) runs under a **lease**; whatever an instance
must remember for the others, or across its own restart (SMS parts, delivery references,
acknowledgement limits), goes in **shared state with expiry**. Adapters reach both through
``AdapterContext.leases`` and ``AdapterContext.state``, never through Redis itself.

Leases
    ``{p}:lease:<name>`` holds ``<holder>/<fence>`` with a TTL (``[fleet] lease_ttl``, 10 s by
    default). Taking a free lease is ``SET NX PX`` and ``INCR {p}:lease:<name>:fence`` in one
    script, so every acquisition gets a larger fencing token than the one before; renewing and
    releasing compare the whole value first (compare-and-set), so a holder that lost the lease
    can never extend or delete its successor's. The holder renews every TTL/3; when a renewal
    is refused, or none succeeds for 2/3 of the TTL (Redis away), it cancels the work at once,
    a third of the TTL before the key can expire and a successor can start. A holder that dies
    is replaced once its key expires: within one TTL of its last renewal, plus the contenders'
    poll (they sleep until the key's own expiry, at most TTL/3). A clean stop releases the
    lease, and the successor starts within TTL/3.

Shared state
    ``SharedState`` is scoped (per adapter: ``{p}:state:<adapter>:<key>``) and every key it
    writes expires. ``put``/``get``/``pop``/``remove_if`` (compare-and-delete);
    ``hash_add``/``hash_set`` (several fields in one step)/``hash_all``/``hash_take``/
    ``hash_remove`` (parts that several instances collect);
    ``admit`` (at most N in a sliding window, on the server's clock so every instance counts
    alike). A write may carry a ``Fence``: it then happens only while that lease is still
    held by that acquisition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import NoScriptError, RedisError

from gateway.queueing.keys import Keys
from gateway.queueing.store import Pseudonyms, RedisClient

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL_S = 10.0

_ACQUIRE = """
-- KEYS: lease, fence counter; ARGV: holder, ttl ms.
-- Free (or still ours from an earlier acquisition of this holder): a new fence, the lease is
-- ours. Taken: {0, ms left}.
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) ~= ARGV[1] .. '/' then
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. fence, 'PX', ARGV[2])
return {fence, tonumber(ARGV[2])}
"""

_RENEW = """
-- KEYS: lease; ARGV: value, ttl ms. Extend only our own acquisition.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
-- KEYS: lease; ARGV: value. Delete only our own acquisition.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Shared-state scripts: KEYS[1] is the fence's lease key (or any key when unfenced), ARGV[1]
# the expected lease value ('' when unfenced). A write under a lost lease is refused.
_FENCE_CHECK = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease is no longer held by this acquisition')
end
"""

_PUT = (
    _FENCE_CHECK
    + """
-- KEYS[2]: key; ARGV[2]: value, ARGV[3]: ttl ms, ARGV[4]: '1' only if absent
if ARGV[4] == '1' then
  return redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3], 'NX') and 1 or 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
)

_POP = (
    _FENCE_CHECK
    + """
local value = redis.call('GET', KEYS[2])
if value then redis.call('DEL', KEYS[2]) end
return value
"""
)

_REMOVE_IF = (
    _FENCE_CHECK
    + """
-- KEYS[2]: key; ARGV[2]: value. Delete only if it still holds that value (a claim of ours).
if redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('DEL', KEYS[2])
end
return 0
"""
)

_HASH_SET = (
    _FENCE_CHECK
    + """
-- KEYS[2]: hash; ARGV[2..n-1]: field, value pairs; ARGV[n]: ttl ms. Returns the field count.
redis.call('HSET', KEYS[2], unpack(ARGV, 2, #ARGV - 1))
redis.call('PEXPIRE', KEYS[2], ARGV[#ARGV])
return redis.call('HLEN', KEYS[2])
"""
)

_HASH_TAKE = (
    _FENCE_CHECK
    + """
local all = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
return all
"""
)

_HASH_REMOVE = (
    _FENCE_CHECK
    + """
-- KEYS[2]: hash; ARGV[2..]: fields. Returns how many fields are left.
redis.call('HDEL', KEYS[2], unpack(ARGV, 2))
return redis.call('HLEN', KEYS[2])
"""
)

_ADMIT = (
    _FENCE_CHECK
    + """
-- KEYS[2]: sorted set; ARGV[2]: limit, ARGV[3]: window ms. Sliding window on the server clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  return 0
end
local seq = redis.call('INCR', KEYS[2] .. ':seq')
redis.call('PEXPIRE', KEYS[2] .. ':seq', ARGV[3])
redis.call('ZADD', KEYS[2], now, now .. '-' .. seq)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
)

_SCRIPTS = {
    "acquire": _ACQUIRE,
    "renew": _RENEW,
    "release": _RELEASE,
    "put": _PUT,
    "pop": _POP,
    "remove_if": _REMOVE_IF,
    "hash_set": _HASH_SET,
    "hash_take": _HASH_TAKE,
    "hash_remove": _HASH_REMOVE,
    "admit": _ADMIT,
}


class LeaseLost(Exception):
    """A fenced write found the lease held by someone else (or by no one)."""


@dataclass(frozen=True, slots=True)
class Fence:
    """One acquisition of a lease: ``token`` grows with every acquisition of ``name``."""

    name: str
    token: int
    key: str
    value: str


class _Scripts:
    """Runs the coordination scripts by SHA, loading them again after a restart or failover."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._shas: dict[str, str] = {}

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        for attempt in range(2):
            sha = self._shas.get(name)
            if sha is None:
                sha = self._shas[name] = await self.redis.script_load(_SCRIPTS[name])
            try:
                return await self.redis.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                self._shas.clear()
                if attempt:
                    raise
            except RedisError as exc:
                if str(exc).startswith("FENCED"):
                    raise LeaseLost(str(exc)) from None
                raise
        raise AssertionError("unreachable")

    async def run_replicated(
        self, name: str, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """Run a script and ``WAIT`` on the same connection: (its reply, replicas that have it)."""
        if name not in self._shas:
            self._shas[name] = await self.redis.script_load(_SCRIPTS[name])
        pipe = self.redis.pipeline(transaction=False)
        pipe.evalsha(self._shas[name], len(keys), *keys, *args)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        try:
            reply, confirmed = await pipe.execute()
        except NoScriptError:
            self._shas.clear()
            raise
        return reply, int(confirmed)


Work = Callable[[Fence], Coroutine[Any, Any, None]]


class Leases:
    """Named leases of this gateway instance (``holder`` is unique per process start)."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        instance: str,
        ttl_s: float,
        *,
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> None:
        self.keys = keys
        # WAIT has no key to route by: on a cluster each master's replicas answer for their own
        self.min_replicas = min_replicas if hasattr(redis, "connection_pool") else 0
        self.replica_timeout_ms = replica_timeout_ms
        self.ttl_s = max(0.3, float(ttl_s))
        self.ttl_ms = int(self.ttl_s * 1000)
        # two Gateway objects may share an instance name (tests, a mis-set config): never a holder
        self.holder = f"{instance}.{secrets.token_hex(4)}".replace("/", "_")
        self._scripts = _Scripts(redis)
        self._held: dict[str, Fence] = {}

    @property
    def held(self) -> dict[str, Fence]:
        """The leases this instance holds right now, by name (``/readyz``, tests)."""
        return dict(self._held)

    async def acquire(self, name: str) -> tuple[Fence | None, float]:
        """Try once: ``(fence, ttl)`` when the lease is ours now, else ``(None, seconds left)``."""
        key = self.keys.lease(name)
        calls = ([key, self.keys.lease_fence(name)], [self.holder, self.ttl_ms])
        if self.min_replicas:
            (token, ms), confirmed = await self._scripts.run_replicated(
                "acquire", *calls, self.min_replicas, self.replica_timeout_ms
            )
        else:
            token, ms = await self._scripts.run("acquire", *calls)
            confirmed = 0
        if not int(token):
            return None, max(0, int(ms)) / 1000
        fence = Fence(name, int(token), key, f"{self.holder}/{int(token)}")
        if self.min_replicas and confirmed < self.min_replicas:
            # a failover could lose this acquisition and let another take the lease while we
            # believe in it: only an acquisition a replica has counts (as contact writes)
            log.warning(
                "lease %s: %d of %d replicas confirmed the acquisition; not taken",
                name, confirmed, self.min_replicas,
            )
            with contextlib.suppress(RedisError, OSError):
                await self.release(fence)
            return None, self.ttl_s / 3
        return fence, self.ttl_s

    async def renew(self, fence: Fence) -> bool:
        """Extend the lease if this acquisition still holds it."""
        return (await self._extend(fence))[0]

    async def _extend(self, fence: Fence) -> tuple[bool, bool]:
        """Renew: (extended, counts). With ``min_replicas`` an extension counts only once
        ``WAIT`` says that many replicas have it: a failover loses what the master
        acknowledged and no replica had, and the promoted replica's copy of the lease then
        expires with the last renewal it got, while a holder that counted the lost ones
        would go on believing in it (tests/queueing/test_topologies.py)."""
        args = ([fence.key], [fence.value, self.ttl_ms])
        if not self.min_replicas:
            extended = bool(await self._scripts.run("renew", *args))
            return extended, extended
        reply, confirmed = await self._scripts.run_replicated(
            "renew", *args, self.min_replicas, self.replica_timeout_ms
        )
        return bool(reply), bool(reply) and confirmed >= self.min_replicas

    async def release(self, fence: Fence) -> bool:
        """Give the lease up if this acquisition still holds it."""
        self._held.pop(fence.name, None)
        return bool(await self._scripts.run("release", [fence.key], [fence.value]))

    async def holder_of(self, name: str) -> tuple[str, int] | None:
        """Who holds ``name`` now (holder id, fence), or None."""
        raw = await self._scripts.redis.get(self.keys.lease(name))
        if raw is None:
            return None
        holder, _, token = (raw.decode() if isinstance(raw, bytes) else str(raw)).rpartition("/")
        return holder, int(token)

    async def exclusive(self, name: str, work: Work) -> None:
        """Run ``work(fence)`` only while this instance holds lease ``name``; never returns on
        its own unless ``work`` does.

        Contends for the lease; once held, runs ``work`` and renews every TTL/3. When a renewal
        is refused or none succeeds for 2/3 of the TTL, ``work`` is cancelled and the loop
        contends again. When ``work`` returns, the lease is released and this returns; when it
        raises, the lease is released and the error propagates (a supervisor restarts it).
        Cancelling this releases the lease.
        """
        loop = asyncio.get_running_loop()
        retry_s = self.ttl_s / 3
        while True:
            asked = loop.time()  # the lease runs at least until asked + TTL
            acquiring = asyncio.ensure_future(self.acquire(name))
            try:
                fence, wait_s = await _bounded(acquiring, retry_s)
            except asyncio.CancelledError:
                # stopped as the lease became ours: give it up now, not after the TTL
                if acquiring.done() and not acquiring.cancelled() and not acquiring.exception():
                    got = acquiring.result()[0]
                    if got is not None:
                        with contextlib.suppress(RedisError, OSError, TimeoutError):
                            await _bounded(self.release(got), retry_s)
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("lease %s: cannot contend (%r)", name, exc)
                await asyncio.sleep(retry_s)
                continue
            if fence is None:
                await asyncio.sleep(min(retry_s, wait_s + 0.01))
                continue
            acquired_at = asked
            log.info("lease %s: held by %s (fence %d)", name, self.holder, fence.token)
            self._held[name] = fence
            worker = loop.create_task(work(fence), name=f"lease:{name}")
            keeper = loop.create_task(self._keep(fence, acquired_at), name=f"lease-keep:{name}")
            try:
                await asyncio.wait({worker, keeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._held.pop(name, None)
                await finish(self._wind_down(worker, keeper, fence, retry_s))
            if worker.cancelled():
                log.warning("lease %s: lost (fence %d), work stopped", name, fence.token)
                continue
            worker.result()  # raises the work's own error
            return

    async def _wind_down(
        self, worker: asyncio.Task[None], keeper: asyncio.Task[None], fence: Fence, retry_s: float
    ) -> None:
        """Stop the work and the renewals, then release the lease (compare-and-delete)."""
        keeper.cancel()
        while not worker.done():  # a client call may swallow one cancellation
            worker.cancel()
            await asyncio.wait({worker}, timeout=0.2)
        await asyncio.wait({keeper})
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await _bounded(self.release(fence), retry_s)

    async def _keep(self, fence: Fence, acquired_at: float) -> None:
        """Renew every TTL/3; return as soon as the lease must be taken as lost."""
        loop = asyncio.get_running_loop()
        period = self.ttl_s / 3
        confirmed = acquired_at  # the lease runs until at least confirmed + TTL
        while True:
            await asyncio.sleep(max(0.0, min(period, confirmed + period - loop.time())))
            started = loop.time()
            give_up = confirmed + 2 * period
            try:
                ok, counts = await _bounded(self._extend(fence), max(0.01, give_up - started))
            except (RedisError, OSError, TimeoutError) as exc:
                if loop.time() >= give_up:
                    log.warning("lease %s: no renewal for %.1f s (%r)", fence.name, 2 * period, exc)
                    return
                await asyncio.sleep(min(0.2, max(0.0, give_up - loop.time())))
                continue
            if not ok:
                return
            if not counts:  # extended on the master, on too few replicas: not counted
                if loop.time() >= give_up:
                    log.warning(
                        "lease %s: no renewal a replica confirmed for %.1f s",
                        fence.name, 2 * period,
                    )
                    return
                await asyncio.sleep(min(0.2, max(0.0, give_up - loop.time())))
                continue
            confirmed = started


async def finish(cleanup: Awaitable[None]) -> None:
    """Run ``cleanup`` to its end even when the caller is cancelled (again) meanwhile, then
    re-raise that cancellation: a supervisor repeats its cancellation while a loop runs on,
    and a release it interrupted would leave the lease to expire instead. ``cleanup`` must
    be bounded in time."""
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


async def _bounded(call: Awaitable[T], timeout_s: float) -> T:
    """``call``'s result within ``timeout_s``, else TimeoutError at once.

    Unlike ``asyncio.wait_for``, this does not wait for the cancelled call to end: a Redis
    client may swallow the cancellation and go on connecting (to a Sentinel group in failover,
    for seconds), and a lease holder must stop believing in its lease on time."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer within {timeout_s:.2f} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume an abandoned call's outcome (no 'exception never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


class SharedState:
    """Small shared state with expiry, scoped under ``{p}:state:<scope>:``.

    Values are bytes (str is encoded as UTF-8); every write sets a TTL, so nothing outlives its
    use. ``fence`` (from ``Leases.exclusive``) makes a write conditional on still holding it.
    """

    def __init__(
        self, redis: RedisClient, keys: Keys, scope: str, pseudonyms: Pseudonyms | None = None
    ) -> None:
        self.keys = keys
        self.scope = scope
        self._scripts = _Scripts(redis)
        self.redis = redis
        self.pseudonyms = pseudonyms or Pseudonyms(redis, keys)

    def scoped(self, scope: str) -> SharedState:
        """The same store under another scope (e.g. shared by the adapters of one provider)."""
        return SharedState(self.redis, self.keys, scope, self.pseudonyms)

    async def private(self, address: str) -> str:
        """What a key names instead of a citizen's address (a full phone number, an e-mail
        address): the fleet's keyed pseudonym of it (``Pseudonyms``), as the intake's keys."""
        await self.pseudonyms.load()
        return self.pseudonyms.of(address)

    def _key(self, key: str) -> str:
        return self.keys.state(self.scope, key)

    def _fence(self, fence: Fence | None) -> tuple[str, str]:
        if fence is None:
            return self.keys.lease("-"), ""
        return fence.key, fence.value

    async def put(
        self,
        key: str,
        value: bytes | str,
        ttl_s: float,
        *,
        only_new: bool = False,
        fence: Fence | None = None,
    ) -> bool:
        """Store ``value`` for ``ttl_s``; with ``only_new``, only if absent (returns whether
        it was stored)."""
        lease_key, expected = self._fence(fence)
        done = await self._scripts.run(
            "put",
            [lease_key, self._key(key)],
            [expected, value, _ms(ttl_s), "1" if only_new else "0"],
        )
        return bool(done)

    async def get(self, key: str) -> bytes | None:
        value = await self.redis.get(self._key(key))
        return None if value is None else bytes(value)

    async def pop(self, key: str, *, fence: Fence | None = None) -> bytes | None:
        """Read and delete: of several instances popping one key, one gets the value."""
        lease_key, expected = self._fence(fence)
        value = await self._scripts.run("pop", [lease_key, self._key(key)], [expected])
        return None if value is None else bytes(value)

    async def remove_if(
        self, key: str, value: bytes | str, *, fence: Fence | None = None
    ) -> bool:
        """Delete ``key`` only if it still holds ``value`` (compare-and-delete, atomically):
        a claim taken with ``put(only_new=True)`` that expired and was taken again by another
        process is theirs, not ours to let go. Returns whether it was deleted."""
        lease_key, expected = self._fence(fence)
        done = await self._scripts.run("remove_if", [lease_key, self._key(key)], [expected, value])
        return bool(done)

    async def hash_add(
        self, key: str, field: str, value: bytes | str, ttl_s: float, *, fence: Fence | None = None
    ) -> int:
        """Set one field of hash ``key`` (its TTL restarts); return how many fields it has."""
        return await self.hash_set(key, {field: value}, ttl_s, fence=fence)

    async def hash_set(
        self,
        key: str,
        fields: Mapping[str, bytes | str],
        ttl_s: float,
        *,
        fence: Fence | None = None,
    ) -> int:
        """Set several fields of hash ``key`` in one step (its TTL restarts); return how many
        fields it has."""
        if not fields:
            return int(await self.redis.hlen(self._key(key)))
        lease_key, expected = self._fence(fence)
        pairs: list[bytes | str] = []
        for name, value in fields.items():
            pairs += (name, value)
        return int(
            await self._scripts.run(
                "hash_set", [lease_key, self._key(key)], [expected, *pairs, _ms(ttl_s)]
            )
        )

    async def hash_all(self, key: str) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self._key(key))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    async def hash_take(self, key: str, *, fence: Fence | None = None) -> dict[str, bytes]:
        """Read and delete the whole hash atomically: of several takers, one gets the fields."""
        lease_key, expected = self._fence(fence)
        flat = await self._scripts.run("hash_take", [lease_key, self._key(key)], [expected])
        return {flat[i].decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def hash_remove(self, key: str, *fields: str, fence: Fence | None = None) -> int:
        """Delete fields of hash ``key``; return how many are left."""
        if not fields:
            return len(await self.hash_all(key))
        lease_key, expected = self._fence(fence)
        return int(
            await self._scripts.run(
                "hash_remove", [lease_key, self._key(key)], [expected, *fields]
            )
        )

    async def admit(
        self, key: str, limit: int, window_s: float, *, fence: Fence | None = None
    ) -> bool:
        """Count one use of ``key`` unless ``limit`` uses already fall in the last ``window_s``
        (a sliding window on the Redis server's clock, shared by every instance)."""
        lease_key, expected = self._fence(fence)
        done = await self._scripts.run(
            "admit", [lease_key, self._key(key)], [expected, int(limit), _ms(window_s)]
        )
        return bool(done)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
