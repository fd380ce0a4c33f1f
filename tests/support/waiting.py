"""Waiting in tests for a state, not for a time: `eventually(check, what, within_s)`.

A wait loop that gives up silently lets the test go on in a state it did not expect, and
the failure then shows up later as something else (an unpacking error, a count off by
one). This one fails at once, saying what never happened and what was last seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.05


async def eventually(
    read: Callable[[], T | Awaitable[T]],
    what: str,
    within_s: float,
    until: Callable[[T], object] = bool,
) -> T:
    """Poll `read` (sync or async) until `until(value)` holds, and return that value;
    fail plainly, naming `what` and the last value read, after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        value = read()
        seen: T = await value if inspect.isawaitable(value) else value  # type: ignore[assignment]
        if until(seen):
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within_s} s (last seen: {seen!r})")
        await asyncio.sleep(POLL_S)
