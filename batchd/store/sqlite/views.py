"""Read-only views for operators (issue 14): what /metrics, the web view,
`status --watch`, `batchd batches` and `batchd tasks` need beyond counts. Nothing here
writes.

The reads /metrics and the web view make every few seconds walk an index for a few rows
(tasks_by_status, batches_by_state), never the finished tasks' history, so their cost
does not grow with the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import orjson

from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.store.sqlite.batches import BATCH_COLUMNS, batch_record
from batchd.store.sqlite.database import SqliteDatabase, format_time

# How many failed tasks of each status, newest by id, `latest_failed_tasks` orders by time.
FAILED_TASKS_WINDOW = 10
_FAILED = (TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.INVALID)


class OperatorViews:
    """Reads for operator views (part of SqliteStore); nothing here writes."""

    _db: SqliteDatabase

    async def completed_since(self, since: datetime) -> tuple[int, datetime | None]:
        """Tasks that reached a final status at or after `since`, and the first such time.

        The throughput of `status --watch`: measured from the database, it is right from
        the first screen, however recently the view was started. On tasks_by_completion
        (migration 010): the entries since `since`, never the whole history.
        """
        rows = await self._db.read(
            "SELECT count(*), min(completed_at) FROM tasks WHERE completed_at >= ?",
            (format_time(since),),
        )
        count, first = rows[0]
        return int(count), None if first is None else datetime.fromisoformat(str(first))

    async def recent_batches(
        self, limit: int, states: Sequence[BatchState] = ()
    ) -> list[BatchRecord]:
        """The newest `limit` batches (of `states`, or of any state), newest first.

        Backwards on the primary key, or on `batches_by_state` one state at a time (its
        entries are in id order within a state; `state IN (...)` made SQLite sort every
        batch of those states): at most `limit` rows per state, however many batches the
        database remembers.
        """
        if not states:
            rows = await self._db.read(
                f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = []
            for state in dict.fromkeys(states):
                rows += await self._db.read(
                    f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (str(state), limit),
                )
            rows = sorted(rows, key=lambda row: -int(row[0]))[:limit]
        return [batch_record(row) for row in rows]

    async def tasks_in_status(self, status: TaskStatus, limit: int) -> list[TaskRow]:
        """Up to `limit` tasks in `status`, oldest first: `limit` entries of the
        (status, id) index, however many tasks there are."""
        rows = await self._db.read(
            "SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, t.result,"
            " t.created_at, t.submitted_at, t.completed_at"
            " FROM tasks AS t LEFT JOIN batches AS b ON b.id = t.batch_id"
            " WHERE t.status = ? ORDER BY t.id LIMIT ?",
            (str(status), limit),
        )
        return [TaskRow(row[0], TaskStatus(row[1]), *row[2:]) for row in rows]

    async def oldest_pending_created_at(self) -> datetime | None:
        """When the longest-waiting pending task was inserted; None when none is pending."""
        # Lowest id first on tasks_by_status: a retried task keeps its id and created_at,
        # so this is the one that has waited longest since it was first inserted.
        rows = await self._db.read(
            "SELECT created_at FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 1"
        )
        return datetime.fromisoformat(rows[0][0]) if rows else None

    async def batch_completions_since(self, since: datetime) -> list[tuple[datetime, int, int]]:
        """(completed_at, succeeded, not succeeded) of each batch whose results were all
        stored at or after `since`, in that order; counts as the API last reported them.

        Per batch rather than per task (fewer rows), on batches_by_completion (migration
        010): the batches of the window only, not every completed batch.
        """
        rows = await self._db.read(
            "SELECT completed_at, request_count, request_counts FROM batches"
            " WHERE state = 'completed' AND completed_at >= ? ORDER BY completed_at",
            (format_time(since),),
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
            completions.append((datetime.fromisoformat(completed_at), succeeded, failed))
        return completions

    async def latest_failed_tasks(self, limit: int) -> list[TaskRow]:
        """Up to `limit` errored, expired or invalid tasks, most recently finished first.

        Among the newest `limit * FAILED_TASKS_WINDOW` of each status by id: tasks have no
        index on completed_at, so an older task that failed again after a retry is seen
        only while it is among those (an index on (status, completed_at) would make this
        exact).
        """
        # One short walk per status down tasks_by_status (newest ids first), then the few
        # candidates are ordered by when they finished.
        per_status = " UNION ALL ".join(
            "SELECT * FROM (SELECT id FROM tasks WHERE status = ? ORDER BY id DESC LIMIT ?)"
            for _ in _FAILED
        )
        window = limit * FAILED_TASKS_WINDOW
        rows = await self._db.read(
            "SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, NULL,"
            " t.created_at, t.submitted_at, t.completed_at"
            f" FROM ({per_status}) AS recent JOIN tasks AS t ON t.id = recent.id"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY t.completed_at DESC, t.id DESC LIMIT ?",
            [value for status in _FAILED for value in (str(status), window)] + [limit],
        )
        return [TaskRow(row[0], TaskStatus(row[1]), *row[2:]) for row in rows]
