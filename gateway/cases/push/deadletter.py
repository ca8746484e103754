"""Dead letters: entries a subscriber refused ``max_attempts`` times, kept to be replayed.

``{p}:deadletter:<subscriber>`` is a stream whose entries carry the original ``kind``,
``entry_id``, the exact ``body`` that was POSTed, ``attempts``, the last ``error`` and
``parked_at`` (us). Replay POSTs them again, oldest first, freshly signed; each one the
receiver takes (2xx) is deleted, and replay stops at the first refusal so order is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.cases.push.pusher import DeliveryFailed, Item, deadletter_key, post_once
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient
from gateway.server.config import EgressSection, PushSubscriber, Settings
from gateway.server.egress import client_session
from gateway.server.metrics import Metrics


class DeadLetters:
    """List and replay the dead-letter streams of the configured subscribers."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        subscribers: Sequence[PushSubscriber],
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.subscribers = {s.name: s for s in subscribers}
        self.metrics = metrics

    @property
    def names(self) -> list[str]:
        return list(self.subscribers)

    async def parked(self, name: str) -> int:
        return int(await self.redis.xlen(deadletter_key(self.keys, name)))

    async def entries(self, name: str, count: int) -> list[dict[str, Any]]:
        """The oldest ``count`` parked entries, without their bodies' bytes decoded."""
        raw = await self.redis.xrange(deadletter_key(self.keys, name), count=count)
        out = []
        for entry_id, f in raw:
            out.append(
                {
                    "id": entry_id.decode(),
                    "kind": f.get(b"kind", b"").decode(),
                    "entry_id": f.get(b"entry_id", b"").decode(),
                    "attempts": int(f.get(b"attempts", b"0")),
                    "error": f.get(b"error", b"").decode(errors="replace"),
                    "parked_at": int(f.get(b"parked_at", b"0")),
                    "size": len(f.get(b"body", b"")),
                }
            )
        return out

    async def replay(self, name: str, count: int) -> dict[str, Any]:
        """POST up to ``count`` parked entries again, oldest first; stop at the first failure."""
        sub = self.subscribers[name]
        key = deadletter_key(self.keys, name)
        replayed = 0
        error: str | None = None
        headers = {"User-Agent": "gateway-push"}
        async with client_session(EgressSection(), headers=headers) as session:
            while replayed < count and error is None:
                batch = await self.redis.xrange(key, count=min(100, count - replayed))
                if not batch:
                    break
                for dl_id, f in batch:
                    item = Item(f[b"kind"].decode(), f[b"entry_id"].decode(), f[b"body"])
                    try:
                        await post_once(session, sub, item, int(f.get(b"attempts", b"0")) + 1)
                    except DeliveryFailed as exc:
                        error = str(exc)
                        break
                    await self.redis.xdel(key, dl_id)
                    replayed += 1
                    if self.metrics is not None:
                        self.metrics.push_deliveries.labels(name, "replayed").inc()
                    if replayed >= count:
                        break
        remaining = await self.parked(name)
        if self.metrics is not None:
            self.metrics.push_deadletter.labels(name).set(remaining)
        return {"subscriber": name, "replayed": replayed, "remaining": remaining, "error": error}


async def _run(settings: Settings, replay: str | None, count: int) -> tuple[int, str]:
    from gateway.queueing.access import open_queue

    async with open_queue(settings) as (client, keys, _):
        letters = DeadLetters(client, keys, settings.push.subscribers)
        if replay is None:
            lines = [f"{name}\t{await letters.parked(name)}" for name in letters.names]
            return 0, "".join(line + "\n" for line in lines)
        if replay not in letters.subscribers:
            return 2, f"no push subscriber {replay!r} in the config\n"
        result = await letters.replay(replay, count)
        return (0 if result["error"] is None else 1), orjson.dumps(result).decode() + "\n"


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``gateway deadletter [--replay SUBSCRIBER] [--count N]``: parked counts, or a replay."""
    code, text = asyncio.run(_run(settings, args.replay, args.count))
    (sys.stdout if code != 2 else sys.stderr).write(text)
    return code
