"""Read-only views for operators on PostgreSQL (issue 14; `batchd/store/sqlite/views.py`
is the SQLite one): `batchd batches`, `batchd tasks`, the web view's and /metrics' reads.
Nothing here writes; each read walks an index for a few rows (tasks_by_status,
batches_by_state, the primary keys), never the finished tasks' history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import orjson

from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.store.postgres.batches import BATCH_COLUMNS, batch_record
from batchd.store.postgres.database import PostgresDatabase, Row, text_time

# How many failed tasks of each status, newest by id, `latest_failed_tasks` orders by time.
FAILED_TASKS_WINDOW = 10
_FAILED = [str(s) for s in (TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.INVALID)]
_TASK_ROW = (
    "t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, {result},"
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


class OperatorViews:
    """Reads for operator views (part of PostgresStore); nothing here writes."""

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
            f"SELECT {_TASK_ROW.format(result='t.result::text')}"
            " FROM tasks AS t LEFT JOIN batches AS b ON b.id = t.batch_id"
            " WHERE t.status = $1 ORDER BY t.id LIMIT $2",
            str(status),
            limit,
        )
        return [task_row(row) for row in rows]

    async def oldest_pending_created_at(self) -> datetime | None:
        """When the longest-waiting pending task was inserted; None when none is pending."""
        rows = await self._db.read(
            "SELECT created_at FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 1"
        )
        return rows[0][0] if rows else None

    async def batch_completions_since(self, since: datetime) -> list[tuple[datetime, int, int]]:
        """(completed_at, succeeded, not succeeded) of each batch whose results were all
        stored at or after `since`, in that order; counts as the API last reported them."""
        rows = await self._db.read(
            "SELECT completed_at, request_count, request_counts::text FROM batches"
            " WHERE state = 'completed' AND completed_at >= $1 ORDER BY completed_at",
            since,
        )
        completions = []
        for completed_at, request_count, counts_json in rows:
            counts = orjson.loads(counts_json) if counts_json else {}
            succeeded = int(counts.get("succeeded", 0))
            finished = sum(
                int(counts.get(key, 0)) for key in ("succeeded", "errored", "canceled", "expired")
            )
            # No counts (never polled to the end): every request is counted as not succeeded.
            failed = finished - succeeded if counts else int(request_count)
            completions.append((completed_at, succeeded, failed))
        return completions

    async def latest_failed_tasks(self, limit: int) -> list[TaskRow]:
        """Up to `limit` errored, expired or invalid tasks, most recently finished first,
        among the newest `limit * FAILED_TASKS_WINDOW` of each status by id (as SQLite)."""
        window = limit * FAILED_TASKS_WINDOW
        rows = await self._db.read(
            f"SELECT {_TASK_ROW.format(result='NULL')}"
            " FROM unnest($1::text[]) AS s(status)"
            " CROSS JOIN LATERAL (SELECT id FROM tasks WHERE status = s.status"
            "   ORDER BY id DESC LIMIT $2) AS recent"
            " JOIN tasks AS t ON t.id = recent.id"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY t.completed_at DESC NULLS LAST, t.id DESC LIMIT $3",
            _FAILED,
            window,
            limit,
        )
        return [task_row(row) for row in rows]
