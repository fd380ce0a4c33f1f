"""Read-only views for operators (issue 14): throughput, batch and task listings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.store.sqlite.batches import BATCH_COLUMNS, batch_record
from batchd.store.sqlite.database import SqliteDatabase, format_time


class OperatorViews:
    """Reads for operator views (part of SqliteStore); nothing here writes."""

    _db: SqliteDatabase

    async def completed_since(self, since: datetime) -> tuple[int, datetime | None]:
        """Tasks that reached a final status at or after `since`, and the first such time.

        The throughput of `status --watch`: measured from the database, it is right from
        the first screen, however recently the view was started.
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
