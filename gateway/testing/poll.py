"""The one polling helper of the kit and of the gateway's own tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]], timeout_s: float = ..., step_s: float = ...
) -> T: ...
@overload
async def eventually(
    condition: Callable[[], T], timeout_s: float = ..., step_s: float = ...
) -> T: ...
async def eventually(
    condition: Callable[[], Any], timeout_s: float = 20.0, step_s: float = 0.05
) -> Any:
    """Call ``condition`` (a coroutine function or a plain one) until it returns something truthy,
    and return that; raise ``AssertionError`` after ``timeout_s``. The bound is a liveness
    bound on a shared, noisy machine, never a timing claim: keep it generous."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{getattr(condition, '__name__', 'condition')} not met "
                                 f"within {timeout_s} s (last: {value!r})"[:500])
        await asyncio.sleep(step_s)
