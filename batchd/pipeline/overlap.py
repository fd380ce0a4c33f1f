"""When the collector starts its next batch: once the batch before it is staged, so that a
download and its staging overlap the previous batch's apply, and never later than that: a
batch that ends while the last applies run is started at once, not after them.

A batch that fails first (a fatal error: the collector lets only those through) is raised
at once, so that the batch downloading beside it is not read and applied before the error
is seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def until_staged(staged: asyncio.Event, running: Sequence[asyncio.Task[bool]]) -> None:
    """Until `staged` is set (the batch just started is staged: the next may start)."""
    await _until(running, staged=staged)


async def until_done_or_ended(
    running: Sequence[asyncio.Task[bool]], ended: asyncio.Event | None
) -> bool:
    """Until every batch started is done (False), or `ended` is set first (True): a batch
    ended meanwhile."""
    return await _until(running, ended=ended)


async def _until(
    running: Sequence[asyncio.Task[bool]],
    *,
    staged: asyncio.Event | None = None,
    ended: asyncio.Event | None = None,
) -> bool:
    waiting = asyncio.ensure_future(staged.wait()) if staged is not None else None
    woken = asyncio.ensure_future(ended.wait()) if ended is not None else None
    try:
        while True:
            for task in running:
                if task.done() and not task.cancelled() and (error := task.exception()):
                    raise error
            busy: set[asyncio.Future[Any]] = {task for task in running if not task.done()}
            if waiting is not None:
                if waiting.done():
                    return False
                busy.add(waiting)
            elif not busy:
                return False
            if woken is not None:
                if woken.done():
                    return True
                busy.add(woken)
            await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in (waiting, woken):
            if future is not None:
                future.cancel()
