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

from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from operator import itemgetter
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
) -> AsyncIterator[list[Row]]:
    """Every row `sql` (from `status_page`) gives for each of `statuses`, by id, in runs:
    lists of rows of one status with no row of another status between them (a whole page
    while only one status has rows left), so the merge costs per run, not per row."""
    buffers: dict[str, list[Row]] = {str(status): [] for status in statuses}
    taken = dict.fromkeys(buffers, 0)  # rows of each buffer already handed out
    after = dict.fromkeys(buffers, 0)
    live = set(buffers)  # statuses that may have rows not read yet
    while True:
        for status in [s for s in live if taken[s] == len(buffers[s])]:
            params = {**named, "status": status, "after": after[status], "limit": page_size}
            rows = await read(sql, params)
            buffers[status], taken[status] = rows, 0
            if rows:
                after[status] = rows[-1][0]
            if len(rows) < page_size:
                live.discard(status)
        heads = sorted(
            (rows[taken[status]][0], status)
            for status, rows in buffers.items()
            if taken[status] < len(rows)
        )
        if not heads:
            return
        status = heads[0][1]
        rows, start = buffers[status], taken[status]
        end = len(rows)
        if len(heads) > 1:  # up to the next status's first row
            end = bisect_left(rows, heads[1][0], lo=start, key=itemgetter(0))
        taken[status] = end
        yield rows[start:end]


async def in_pages(runs: AsyncIterator[list[Row]], page_size: int) -> AsyncIterator[list[Row]]:
    """The rows of `runs` in lists of `page_size` (the last may be shorter; none empty)."""
    page: list[Row] = []
    async for run in runs:
        page.extend(run)
        while len(page) >= page_size:
            yield page[:page_size]
            page = page[page_size:]
    if page:
        yield page
