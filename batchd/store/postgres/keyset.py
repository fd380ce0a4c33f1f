"""Rows of tasks in some statuses, by id, each status paged by key on tasks_by_status
(status, id): the merge of `batchd/store/sqlite/keyset.py` (one cursor per status, a
status found exhausted never read again), fed by PostgreSQL statements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from batchd.store.postgres.database import PostgresDatabase
from batchd.store.sqlite.keyset import in_pages, merged_by_id

Row = tuple[Any, ...]

__all__ = ["in_pages", "merged_rows", "status_page"]


def status_page(columns: str, condition: str = "") -> str:
    """SQL for the next page of one status: `columns` (the first must be `id`) of tasks with
    status $1, id > $2 and `condition` (its own parameters from $4 on), by id, $3 rows."""
    where = f" AND ({condition})" if condition else ""
    return f"SELECT {columns} FROM tasks WHERE status = $1 AND id > $2{where} ORDER BY id LIMIT $3"


def merged_rows(
    db: PostgresDatabase, sql: str, statuses: Sequence[str], page_size: int, *extra: Any
) -> AsyncIterator[list[Row]]:
    """Every row `sql` (from `status_page`) gives for each of `statuses`, by id, in runs of
    one status (`merged_by_id`); `extra` are the condition's parameters ($4, $5, ...)."""

    async def read(query: str, named: dict[str, Any]) -> list[Row]:
        rows = await db.read(query, named["status"], named["after"], named["limit"], *extra)
        return [tuple(row) for row in rows]

    return merged_by_id(read, sql, statuses, page_size)
