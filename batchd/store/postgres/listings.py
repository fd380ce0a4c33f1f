"""Operators' listings on PostgreSQL (issue 14): `batchd batches` and `batchd tasks`
(`batchd/store/sqlite/views.py` holds the SQLite ones). Nothing here writes; each read
walks an index (the primary key, batches_by_state, tasks_by_status) for `limit` rows a
state or status, however many the database remembers."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.store.postgres.batches import BATCH_COLUMNS, batch_record
from batchd.store.postgres.database import PostgresDatabase, Row, text_time

# The columns `task_row` reads, in its order (tasks AS t, batches AS b).
TASK_COLUMNS = (
    "t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, t.result::text,"
    " t.created_at, t.submitted_at, t.completed_at"
)


def task_row(row: Row) -> TaskRow:
    """A TaskRow with times as the SQLite store shows them."""
    return TaskRow(
        row[0],
        TaskStatus(row[1]),
        row[2],
        row[3],
        row[4],
        row[5],
        text_time(row[6]) or "",
        text_time(row[7]),
        text_time(row[8]),
    )


class OperatorListings:
    """`batchd batches` and `batchd tasks` (part of PostgresStore); nothing here writes."""

    _db: PostgresDatabase

    async def recent_batches(
        self, limit: int, states: Sequence[BatchState] = ()
    ) -> list[BatchRecord]:
        """The newest `limit` batches (of `states`, or of any state), newest first: at most
        `limit` rows per state, however many batches the database remembers."""
        if not states:
            rows = await self._db.read(
                f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY id DESC LIMIT $1", limit
            )
        else:
            rows = []
            for state in dict.fromkeys(states):
                rows += await self._db.read(
                    f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = $1"
                    " ORDER BY id DESC LIMIT $2",
                    str(state),
                    limit,
                )
            rows = sorted(rows, key=lambda row: -int(row[0]))[:limit]
        return [batch_record(row) for row in rows]

    async def tasks_in_status(self, status: TaskStatus, limit: int) -> list[TaskRow]:
        """Up to `limit` tasks in `status`, oldest first (the (status, id) index)."""
        rows = await self._db.read(
            f"SELECT {TASK_COLUMNS}"
            " FROM tasks AS t LEFT JOIN batches AS b ON b.id = t.batch_id"
            " WHERE t.status = $1 ORDER BY t.id LIMIT $2",
            str(status),
            limit,
        )
        return [task_row(row) for row in rows]
