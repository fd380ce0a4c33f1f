"""Rows of tasks in some statuses, by id, each status paged by key on tasks_by_status
(status, id): the merge of `batchd/store/sqlite/keyset.py` (one cursor per status, a
status found exhausted never read again), fed by PostgreSQL statements.

The status is written into each statement as a literal, not passed as a parameter: a
prepared statement is planned generically after five runs, and with `status = $1` the
generic plan prices every status as the statistics' common one. On 2,000,000 succeeded
tasks that plan walked the primary key filtering on status (rows of every status read),
which for a status with no rows is the whole table. With the literal, each status has
its own statement, planned with its own statistics.

The results export reads windows of the primary key instead (`rows_in_windows`): bounds
known in advance, so several pages are in flight at once on connections of their own."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase
from batchd.store.postgres.inflight import InOrder
from batchd.store.sqlite.keyset import in_pages, merged_by_id

Row = tuple[Any, ...]

__all__ = ["in_pages", "merged_rows", "rows_in_windows", "status_page", "window_page"]


_STATUS = re.compile(r"[a-z_]+")


def status_page(columns: str, condition: str = "") -> str:
    """SQL for the next page of one status: `columns` (the first must be `id`) of tasks with
    the status `merged_rows` writes in, id > $1 and `condition` (its own parameters from $3
    on), by id, $2 rows."""
    where = f" AND ({condition})" if condition else ""
    return (
        f"SELECT {columns} FROM tasks WHERE status = <status> AND id > $1{where}"
        " ORDER BY id LIMIT $2"
    )


def with_status(sql: str, status: str) -> str:
    """`sql` from `status_page` for this status (a task status: a word, quoted as is)."""
    if _STATUS.fullmatch(status) is None:
        raise ValueError(f"not a task status: {status!r}")
    return sql.replace("<status>", f"'{status}'")


def merged_rows(
    db: PostgresDatabase, sql: str, statuses: Sequence[str], page_size: int, *extra: Any
) -> AsyncIterator[list[Row]]:
    """Every row `sql` (from `status_page`) gives for each of `statuses`, by id, in runs of
    one status (`merged_by_id`); `extra` are the condition's parameters ($3, $4, ...)."""

    async def read(query: str, named: dict[str, Any]) -> list[Row]:
        rows = await db.read(
            with_status(query, named["status"]), named["after"], named["limit"], *extra
        )
        return [tuple(row) for row in rows]

    return merged_by_id(read, sql, statuses, page_size)


# Windows of the primary key an export keeps in flight, each on a connection of its own:
# a page's server side (the heap rows, and jsonb's text: ~7 us a row on 1.2 KB results)
# costs twice the client's, and one page at a time left a core idle (bench/README.md,
# "Session 6: PostgreSQL exports").
WINDOWS_IN_FLIGHT = 3


def window_page(columns: str, statuses: Sequence[str], condition: str) -> str:
    """SQL for one window of the primary key: `columns` of tasks with $1 < id <= $2, in one
    of `statuses` (literals, as `status_page`'s) and `condition`, by id."""
    listed = ", ".join(with_status("<status>", status) for status in statuses)
    return (
        f"SELECT {columns} FROM tasks WHERE id > $1 AND id <= $2 AND status IN ({listed})"
        f" AND ({condition}) ORDER BY id"
    )


async def rows_in_windows(
    db: PostgresDatabase, sql: str, statuses: Sequence[str], window: int
) -> AsyncIterator[list[Row]]:
    """Every row `sql` (from `window_page`) gives, by id, a window of `window` ids at a
    time (so at most `window` rows a list; empty windows are not handed out).

    A window walks the primary key over its ids, the statuses a filter: each row in it is
    read once, whatever its status, and no statistics can turn it into a sort or a scan
    of a whole status. The windows' bounds are known in advance, so several are in flight
    at once, each on its own connection, while the caller writes the one before; only
    ids between the first and the last task of `statuses` are read, and an empty window
    jumps to the next such task."""
    if not statuses:
        return
    async with db.key_order_sessions(WINDOWS_IN_FLIGHT) as conns:
        lowest, highest = await _bounds(conns[0], statuses)
        if lowest is None or highest is None:
            return
        reads = InOrder(conns)
        windows = _Windows(sql, statuses, window, lowest - 1, highest)
        async with aclosing(windows.rows(reads)) as received:
            try:
                async for rows in received:
                    yield rows
            finally:
                await reads.abandon()


async def _bounds(conn: Conn, statuses: Sequence[str]) -> tuple[int | None, int | None]:
    """The first and last id of tasks in `statuses` (two index probes a status)."""
    probes = ", ".join(
        with_status(
            "(SELECT min(id) FROM tasks WHERE status = <status>),"
            " (SELECT max(id) FROM tasks WHERE status = <status>)",
            status,
        )
        for status in statuses
    )
    row = await conn.fetchrow(f"SELECT {probes}")
    assert row is not None
    found = [value for value in row if value is not None]
    return (min(found), max(found)) if found else (None, None)


class _Windows:
    """The windows of one export: issued in order, received in order (`InOrder`)."""

    def __init__(
        self, sql: str, statuses: Sequence[str], window: int, after: int, highest: int
    ) -> None:
        self._sql = sql
        # The next task of these statuses past an id: an index probe a status.
        nexts = (
            with_status("(SELECT min(id) FROM tasks WHERE status = <status> AND id > $1)", s)
            for s in statuses
        )
        self._next = f"SELECT least({', '.join(nexts)})"
        self._window = window
        self._after = after  # windows up to this id are issued
        self._highest = highest

    async def rows(self, reads: InOrder) -> AsyncGenerator[list[Row], None]:
        jump = False
        while True:
            while (conn := reads.idle()) is not None and self._after < self._highest:
                if not await self._issue(reads, conn, jump):
                    break
                jump = False
            if not reads.in_flight():
                return
            rows = await reads.next_rows()
            if rows:
                yield rows
            else:
                jump = True

    async def _issue(self, reads: InOrder, conn: Conn, jump: bool) -> bool:
        """The next window's statement sent on `conn`; False if none is left."""
        if jump:  # past ids with no task of these statuses at once (a pruned stretch)
            found = await conn.fetchval(self._next, self._after)
            self._after = self._highest if found is None else found - 1
            if self._after >= self._highest:
                return False
        start = self._after
        self._after = start + self._window
        reads.issue(self._sql, start, self._after)
        return True
