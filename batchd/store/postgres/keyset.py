"""Rows of tasks in some statuses, by id, each status paged by key on tasks_by_status
(status, id): the merge of `batchd/store/sqlite/keyset.py` (one cursor per status, a
status found exhausted never read again), fed by PostgreSQL statements.

The status is written into each statement as a literal, not passed as a parameter: a
prepared statement is planned generically after five runs, and with `status = $1` the
generic plan prices every status as the statistics' common one. On 2,000,000 succeeded
tasks that plan walked the primary key filtering on status (rows of every status read),
which for a status with no rows is the whole table. With the literal, each status has
its own statement, planned with its own statistics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from batchd.store.postgres.database import PostgresDatabase
from batchd.store.sqlite.keyset import in_pages, merged_by_id

Row = tuple[Any, ...]

__all__ = ["in_pages", "merged_rows", "status_page"]


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
