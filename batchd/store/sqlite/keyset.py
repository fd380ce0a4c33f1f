"""Rows of tasks in some statuses, by id, reading only rows of those statuses, each once.

`status IN (...) AND id > ? ORDER BY id` cannot be answered from tasks_by_status (status,
id) in id order: SQLite read every row of the statuses past `id` into a temporary B-tree
on every page (`batchd results` took 407 s for 2,000,000 lines with 1,000,000 tasks
pending, issue 16). One SQL statement merging one range per status (`UNION ALL ... ORDER
BY id LIMIT`) avoids the sort but not the rescan: a status whose rows fail the filter
(pending rows have no result; recent finished ones are not prunable) is read to its end
on every page, to learn it has no next row. So each status keeps its own cursor: a page
of it is read when the last is used up, a status found exhausted is never read again,
and the rows are merged by id here. Memory: one page per status.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from batchd.store.sqlite.database import Row

Read = Callable[[str, dict[str, Any]], Awaitable[list[Row]]]


def status_page(columns: str, condition: str = "") -> str:
    """SQL for the next page of one status: `columns` (the first must be `id`) of tasks
    with :status, id > :after and `condition` (named parameters), by id, :limit rows."""
    where = f" AND ({condition})" if condition else ""
    return (
        f"SELECT {columns} FROM tasks WHERE status = :status AND id > :after{where}"
        " ORDER BY id LIMIT :limit"
    )


async def merged_by_id(
    read: Read, sql: str, statuses: Sequence[str], page_size: int, **named: Any
) -> AsyncIterator[Row]:
    """Every row `sql` (from `status_page`) gives for each of `statuses`, by id."""
    buffers: dict[str, deque[Row]] = {str(status): deque() for status in statuses}
    after = dict.fromkeys(buffers, 0)
    live = set(buffers)  # statuses that may have rows not read yet
    while True:
        for status in [s for s in live if not buffers[s]]:
            params = {**named, "status": status, "after": after[status], "limit": page_size}
            rows = await read(sql, params)
            buffers[status].extend(rows)
            if rows:
                after[status] = rows[-1][0]
            if len(rows) < page_size:
                live.discard(status)
        heads = [(rows[0][0], status) for status, rows in buffers.items() if rows]
        if not heads:
            return
        yield buffers[min(heads)[1]].popleft()


async def in_pages(rows: AsyncIterator[Row], page_size: int) -> AsyncIterator[list[Row]]:
    """`rows` in lists of `page_size` (the last may be shorter; none empty)."""
    page: list[Row] = []
    async for row in rows:
        page.append(row)
        if len(page) == page_size:
            yield page
            page = []
    if page:
        yield page
