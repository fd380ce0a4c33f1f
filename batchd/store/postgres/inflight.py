"""Reads kept in flight on several connections at once, their rows handed back in the
order they were issued: an export's server side (the heap rows, and jsonb's text) costs
more than the client's work on the rows, so one statement at a time leaves a core idle.
`keyset.rows_in_windows` (`batchd results`) and `pruning.export_pages` (`batchd prune
--export`) read their pages through it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, cast

from batchd.store.postgres.connection import Conn

Row = tuple[Any, ...]


class InOrder:
    """Statements issued on the idle connections of `conns`, received in issue order."""

    def __init__(self, conns: Sequence[Conn]) -> None:
        self._idle = list(conns)
        self._in_flight: deque[tuple[Conn, asyncio.Task[list[Row]]]] = deque()

    def idle(self) -> Conn | None:
        """A connection with no statement in flight (to issue on, or for a short read of
        its own between pages), or None."""
        return self._idle[-1] if self._idle else None

    def issue(self, sql: str, *params: Any) -> None:
        """Send `sql` on an idle connection (there must be one): its rows come in turn."""
        conn = self._idle.pop()
        fetch = cast(Awaitable[list[Row]], conn.fetch(sql, *params))
        self._in_flight.append((conn, asyncio.ensure_future(fetch)))

    def in_flight(self) -> bool:
        return bool(self._in_flight)

    async def next_rows(self) -> list[Row]:
        """The rows of the oldest statement in flight (there must be one)."""
        # The statements just issued go out before the caller works on these rows.
        await asyncio.sleep(0)
        conn, task = self._in_flight.popleft()
        try:
            return await task
        finally:
            self._idle.append(conn)

    async def abandon(self) -> None:
        """Statements still in flight when the caller stopped early: their rows unread."""
        tasks = [task for _, task in self._in_flight]
        self._in_flight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
