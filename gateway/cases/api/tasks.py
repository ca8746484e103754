"""Stopping background loops reliably."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` until it is done.

    A cancellation that lands inside a Redis client call can be swallowed by the client
    (it tidies up the connection and carries on), so cancel again until the task ends.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.2)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
