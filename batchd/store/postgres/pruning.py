"""`batchd prune` on PostgreSQL: the tasks finished before a cutoff, oldest first, paged by
key on tasks_by_completion (completed_at, id) (migration 013), and their deletes
(`PostgresStore.accounts` calls these). Only entries before the cutoff are read, whatever
the history holds.

The cutoff is written into the statements as a literal (as `keyset.py` does with the
status): planned with `completed_at < $1`, a cached generic plan guesses a third of the
tasks old enough. The key's values are parameters: any plan of `(completed_at, id) > ($1,
$2) ... ORDER BY completed_at, id LIMIT` walks the index from the key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from batchd.crashpoints import crash_point
from batchd.domain import FINAL_TASK_STATUSES
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, count_of, text_time
from batchd.store.postgres.inflight import InOrder
from batchd.store.rows import keyed_pages
from batchd.store.values import PrunableTask, PruneExportPage

Key = tuple[datetime, int]  # (completed_at, id) of the last row of a page
Row = tuple[Any, ...]

FINAL = sorted(str(status) for status in FINAL_TASK_STATUSES)
# `status || ''`: never planned through tasks_by_status (every finished task's entry).
_FINAL_ROWS = "status || '' IN (" + ", ".join(f"'{status}'" for status in FINAL) + ")"
PRUNE_COLUMNS = (
    "id, custom_id, status, result::text, error, params::text, model, input_tokens,"
    " output_tokens, cache_creation_input_tokens, cache_read_input_tokens, created_at,"
    " completed_at"
)


def _time(column: str) -> str:
    """SQL: a timestamptz as the SQLite store shows it (`text_time`), as a JSON string."""
    return f"""to_json(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))"""


def _number(column: str) -> str:
    return f"coalesce({column}::text, 'null')"


# The export line of prunelines.py built by the server, by concatenation: jsonb's own
# text of params and result spliced (always valid JSON: jsonb refuses what is not, lone
# surrogates and \u0000 included, and writes its text on one line), the other values
# as JSON by to_json.
_LINE = f"""'{{"custom_id":' || to_json(custom_id) || ',"result":' || coalesce(j.result, 'null')
        || ',"status":' || to_json(status) || ',"error":' || coalesce(to_json(error)::text, 'null')
        || ',"model":' || coalesce(to_json(model)::text, 'null') || ',"usage":'
        || CASE WHEN input_tokens IS NULL THEN 'null'
           ELSE '{{"input_tokens":' || input_tokens
               || ',"output_tokens":' || {_number("output_tokens")}
               || ',"cache_creation_input_tokens":' || {_number("cache_creation_input_tokens")}
               || ',"cache_read_input_tokens":' || {_number("cache_read_input_tokens")} || '}}'
           END
        || ',"created_at":' || {_time("created_at")} || ',"completed_at":'
        || coalesce({_time("completed_at")}::text, 'null') || ',"params":' || j.params || '}}'"""


def _pages(
    columns: str, cutoff: datetime, condition: str = "", source: str = "tasks"
) -> tuple[str, str]:
    """SQL of the first page and of the pages after a key ($1, $2), `$3` rows or the
    first's `$1`: `columns` start with `completed_at, id`, in that order."""
    moment = _moment(cutoff)
    where = f" AND ({condition})" if condition else ""
    start = f"SELECT {columns} FROM {source} WHERE completed_at < {moment}{where}"
    order = " ORDER BY completed_at, id LIMIT "
    return start + order + "$1", start + " AND (completed_at, id) > ($1, $2)" + order + "$3"


def _lines_source() -> str:
    return "tasks CROSS JOIN LATERAL (SELECT params::text AS params, result::text AS result) AS j"


async def _page(read: Any, sql: tuple[str, str], key: Key | None, limit: int) -> list[Row]:
    first, after = sql
    rows = await (read(first, limit) if key is None else read(after, key[0], key[1], limit))
    return [tuple(row) for row in rows]


def _keyed_pages(
    db: PostgresDatabase, sql: tuple[str, str], page_size: int
) -> AsyncIterator[list[Row]]:
    return keyed_pages(lambda key: _page(db.read_in_key_order, sql, key, page_size), page_size)


async def prunable_ids(
    db: PostgresDatabase, cutoff: datetime, page_size: int
) -> AsyncIterator[list[int]]:
    """Ids of the tasks with a completion time before `cutoff`, oldest first, from the
    index alone: the final ones, as batchd keeps them (a retry clears the time); the
    deletes check the status again."""
    async for rows in _keyed_pages(db, _pages("completed_at, id", cutoff), page_size):
        yield [int(row[1]) for row in rows]


async def prunable_rows(
    db: PostgresDatabase, cutoff: datetime, page_size: int
) -> AsyncIterator[list[PrunableTask]]:
    """Final tasks completed before `cutoff`, oldest first, every column."""
    sql = _pages(f"completed_at, {PRUNE_COLUMNS}", cutoff, _FINAL_ROWS)
    async for rows in _keyed_pages(db, sql, page_size):
        yield [prunable_task(row[1:]) for row in rows]


# Export pages in flight at once, each on a connection of its own (`InOrder`): the server
# builds each line (jsonb's text of params and result, ~7 us a row) and one page at a time
# left the client and the other core waiting (bench/README.md, "Session 8: prune").
_PAGES_IN_FLIGHT = 3
# Page bounds read ahead at a time: each a key of tasks_by_completion, from the index alone.
_BOUNDS_AHEAD = 10


def _bounds_sql(cutoff: datetime, page_size: int) -> tuple[str, str]:
    """SQL of the keys that end the next pages of `page_size` entries (each page's last,
    and the last entry's) among the next `_BOUNDS_AHEAD` pages: first, and after ($1, $2)."""
    keys = _pages("completed_at, id", cutoff)
    every = int(page_size)
    wrap = (
        "SELECT completed_at, id FROM (SELECT completed_at, id,"
        " row_number() OVER (ORDER BY completed_at, id) AS n,"
        " lead(id) OVER (ORDER BY completed_at, id) AS next FROM ({}) AS k) AS w"
        f" WHERE n % {every} = 0 OR next IS NULL ORDER BY completed_at, id"
    )
    limit = every * _BOUNDS_AHEAD
    return (
        wrap.format(keys[0].replace("$1", str(limit))),
        wrap.format(keys[1].replace("$3", str(limit))),
    )


def _page_between_sql(cutoff: datetime) -> tuple[str, str]:
    """SQL of the lines of one page up to a key ($1, $2), and of one from after a key ($1,
    $2) up to a key ($3, $4)."""
    # As bytes, each with its line break: asyncpg hands a bytea over as it came, where a
    # text was decoded to a str, then joined and encoded again.
    start = (
        f"SELECT completed_at, id, convert_to({_LINE} || E'\\n', 'UTF8') FROM {_lines_source()}"
        f" WHERE completed_at < {_moment(cutoff)} AND {_FINAL_ROWS}"
    )
    order = " ORDER BY completed_at, id"
    return (
        start + " AND (completed_at, id) <= ($1, $2)" + order,
        start + " AND (completed_at, id) > ($1, $2) AND (completed_at, id) <= ($3, $4)" + order,
    )


class _PageEnds:
    """The key each next page ends at, read from the index `_BOUNDS_AHEAD` pages ahead."""

    def __init__(self, cutoff: datetime, page_size: int) -> None:
        self._sql = _bounds_sql(cutoff, page_size)
        self._ahead: deque[Key] = deque()
        self._read_to: Key | None = None  # the last bound read
        self._more = True  # bounds past it may remain

    async def next(self, conn: Conn) -> Key | None:
        """The next page's last key (read on `conn` when none is ahead), None at the end."""
        if not self._ahead and self._more:
            if self._read_to is None:
                rows = await conn.fetch(self._sql[0])
            else:
                rows = await conn.fetch(self._sql[1], *self._read_to)
            self._ahead.extend((row[0], row[1]) for row in rows)
            # Fewer bounds than asked for: the last entry's key ended them.
            self._more = len(rows) >= _BOUNDS_AHEAD
            if self._ahead:
                self._read_to = self._ahead[-1]
        return self._ahead.popleft() if self._ahead else None


async def export_pages(
    db: PostgresDatabase, cutoff: datetime, page_size: int
) -> AsyncIterator[PruneExportPage]:
    """`prunable_rows` as export lines, built by the server, oldest first: the bounds of
    the next pages read from the index, then `_PAGES_IN_FLIGHT` pages read at once.

    A page holds what its range of tasks_by_completion holds when it is read: a task
    changed meanwhile is exported as it is then (or left, if no longer final and old);
    the ids of each page are those of its lines, so nothing is deleted unexported."""
    ends = _PageEnds(cutoff, page_size)
    first, between = _page_between_sql(cutoff)
    async with db.key_order_sessions(_PAGES_IN_FLIGHT) as conns:
        reads = InOrder(conns)
        try:
            start: Key | None = None  # the key the next page starts after
            while True:
                while (conn := reads.idle()) is not None and (end := await ends.next(conn)):
                    if start is None:
                        reads.issue(first, *end)
                    else:
                        reads.issue(between, *start, *end)
                    start = end
                if not reads.in_flight():
                    return
                page = await reads.next_rows()
                if page:
                    lines = b"".join(row[2] for row in page)
                    yield PruneExportPage([int(row[1]) for row in page], lines)
        finally:
            await reads.abandon()


async def delete_page(
    conn: Conn, cutoff: datetime, key: Key | None, limit: int
) -> tuple[int, Key | None]:
    """One transaction of a prune without export: the next `limit` tasks after `key`
    deleted as one range of tasks_by_completion. (deleted, the key to go on from, or None
    when none is left).

    The range's last key comes from the index alone (nothing sent to batchd); the DELETE
    then walks that index between the two keys, where deleting by ids sent back as an
    array bound the array and descended the primary key once a task (EXPLAIN ANALYZE at
    2M: 78 against 100 ms for 25,000, of which the triggers 28 ms). Its keys are written
    in as literals and it is sent unprepared: planned for these bounds each time, where a
    generic plan of row comparisons guesses a third of the table per bound. A final task
    given an old completion time meanwhile inside the range goes too: it is as prunable."""
    await conn.execute("SET LOCAL enable_sort = off")  # the last key from the index, in order
    first, after = _pages("completed_at, id", cutoff)
    offset = f" OFFSET {int(limit) - 1}"
    last = await (
        conn.fetchrow(first + offset, 1) if key is None else conn.fetchrow(after + offset, *key, 1)
    )
    bounds = [] if key is None else [f"(completed_at, id) > ({_key_literal(key)})"]
    if last is not None:
        bounds.append(f"(completed_at, id) <= ({_key_literal((last[0], last[1]))})")
    status = await conn.execute(
        f"DELETE FROM tasks WHERE completed_at < {_moment(cutoff)} AND {_FINAL_ROWS}"
        + "".join(f" AND {bound}" for bound in bounds)
    )
    crash_point("prune_deleted")  # tests: killed before the commit
    return count_of(status), None if last is None else (last[0], last[1])


def _moment(cutoff: datetime) -> str:
    return f"'{cutoff.astimezone(UTC).isoformat()}'::timestamptz"


def _key_literal(key: Key) -> str:
    return f"{_moment(key[0])}, {int(key[1])}"


async def delete_ids(conn: Conn, task_ids: list[int], cutoff: datetime) -> int:
    """Delete these tasks, if they are still final and completed before `cutoff`.

    Found by id alone: the range bounds the primary key's scan, and the checks inside `IS
    TRUE` are no index condition. Planned from statistics that had not seen the old tasks,
    `completed_at < $3` walked tasks_by_completion with the ids as a filter, reading every
    old task on each transaction (EXPLAIN ANALYZE: 75,000 rows for 25,000 deleted)."""
    if not task_ids:
        return 0
    status = await conn.execute(
        "DELETE FROM tasks WHERE id BETWEEN $4 AND $5 AND id = ANY($1::bigint[])"
        " AND (status = ANY($2::text[]) AND completed_at < $3) IS TRUE",
        task_ids,
        FINAL,
        cutoff,
        min(task_ids),
        max(task_ids),
    )
    crash_point("prune_deleted")  # tests: killed before the commit
    return count_of(status)


def prunable_task(row: Row) -> PrunableTask:
    """A PrunableTask with times as the SQLite store shows them."""
    return PrunableTask._make((*row[:11], text_time(row[11]) or "", text_time(row[12])))
