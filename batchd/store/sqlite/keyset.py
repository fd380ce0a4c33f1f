"""Pages of tasks in some statuses, by id, that read only rows of those statuses.

`status IN (...) AND id > ? ORDER BY id` cannot be answered from tasks_by_status (status,
id) in id order: SQLite read every row of the statuses past `id` into a temporary B-tree
on every page (`batchd results` took 407 s for 2,000,000 lines with 1,000,000 tasks
pending, issue 16). One SELECT per status, each an ordered range of that index, merged by
id (SQLite plans `MERGE (UNION ALL)`), stops after `limit` rows: a page costs its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def statuses_after(columns: str, statuses: Sequence[str], condition: str = "") -> str:
    """SQL for the next page: `columns` (which must include `id`) of tasks in `statuses`
    with id > :after and `condition` (named parameters), by id, at most :limit rows."""
    if not statuses:
        raise ValueError("at least one status")
    where = f" AND ({condition})" if condition else ""
    parts = [
        f"SELECT {columns} FROM tasks WHERE status = :status{n} AND id > :after{where}"
        for n in range(len(statuses))
    ]
    return " UNION ALL ".join(parts) + " ORDER BY id LIMIT :limit"


def page_params(statuses: Sequence[str], after: int, limit: int, **named: Any) -> dict[str, Any]:
    """The parameters of `statuses_after`'s SQL."""
    params = {f"status{n}": str(status) for n, status in enumerate(statuses)}
    return {**params, "after": after, "limit": limit, **named}
