"""Read-only views for operators (issue 14) on PostgreSQL: what /metrics and the web view
need beyond counts. Nothing here writes; the SQLite twin is `batchd/store/sqlite/views.py`.

The reads /metrics and the web view make every few seconds walk an index for a few rows
(tasks_by_status, batches_by_state), never the finished tasks' history.
"""

from __future__ import annotations

from datetime import datetime

import orjson

from batchd.domain import TaskRow, TaskStatus
from batchd.store.postgres.database import PostgresDatabase, text_time, to_millis

# How many failed tasks of each status, newest by id, `latest_failed_tasks` orders by time.
FAILED_TASKS_WINDOW = 10
_FAILED = [str(status) for status in (TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.INVALID)]
# One short walk per status down tasks_by_status (newest ids first), then the few found
# are ordered by when they finished.
_LATEST_FAILED = """
SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error,
    t.created_at, t.submitted_at, t.completed_at
FROM unnest($1::text[]) AS wanted(status)
CROSS JOIN LATERAL (
    SELECT id FROM tasks WHERE status = wanted.status ORDER BY id DESC LIMIT $2) AS recent
JOIN tasks AS t ON t.id = recent.id
LEFT JOIN batches AS b ON b.id = t.batch_id
ORDER BY t.completed_at DESC NULLS LAST, t.id DESC LIMIT $3"""


class OperatorViews:
    """Reads for operator views (part of PostgresStore); nothing here writes."""

    _db: PostgresDatabase

    async def oldest_pending_created_at(self) -> datetime | None:
        """When the longest-waiting pending task was inserted; None when none is pending."""
        # Lowest id first on tasks_by_status: a retried task keeps its id and created_at.
        rows = await self._db.read(
            "SELECT created_at FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 1"
        )
        return rows[0][0] if rows else None

    async def batch_completions_since(self, since: datetime) -> list[tuple[datetime, int, int]]:
        """(completed_at, succeeded, not succeeded) of each batch whose results were all
        stored at or after `since`, in that order; counts as the API last reported them.

        Per batch rather than per task (fewer rows), on batches_by_completion (migration
        010): the batches of the window only, not every completed batch.
        """
        rows = await self._db.read(
            "SELECT completed_at, request_count, request_counts::text FROM batches"
            " WHERE state = 'completed' AND completed_at >= $1 ORDER BY completed_at",
            to_millis(since),
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
        among the newest `limit * FAILED_TASKS_WINDOW` of each status by id (as on SQLite:
        tasks have no index on completed_at)."""
        rows = await self._db.read(_LATEST_FAILED, _FAILED, limit * FAILED_TASKS_WINDOW, limit)
        return [
            TaskRow(
                row[0],
                TaskStatus(row[1]),
                row[2],
                row[3],
                row[4],
                None,
                text_time(row[5]) or "",
                text_time(row[6]),
                text_time(row[7]),
            )
            for row in rows
        ]
