"""What users ask of the store on PostgreSQL: counts, tasks by custom_id, results export,
cancel, retry, and the operator views' reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from batchd.domain import BatchRecord, TaskRow, TaskStatus
from batchd.store.postgres.batches import BATCH_COLUMNS, batch_record
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase
from batchd.store.postgres.keyset import rows_in_windows, window_page
from batchd.store.postgres.listings import TASK_COLUMNS, task_row
from batchd.store.rows import (
    USER_CANCELED,
    cancel_report,
    check_retryable,
    result_lines,
    status_counts,
)
from batchd.store.values import CancelReport, ResultLine, ResultRow

# Tasks go back to the queue by UPDATE, which fires no INSERT trigger: wake the leader.
NOTIFY_TASKS = "SELECT pg_notify('batchd_tasks', current_schema())"


class UserOperations:
    """The reads and commands of `batchd status / results / cancel / retry` (part of
    PostgresStore)."""

    _db: PostgresDatabase

    async def status_counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status, zeros included: 7 rows kept by statement
        triggers (migration 007), whatever the number of tasks."""
        return status_counts(await self._db.read("SELECT status, tasks FROM task_counts"))

    async def has_tasks(self, *statuses: TaskStatus) -> bool:
        """Whether any task is in one of `statuses`: at most one index entry per status,
        read from the tasks themselves (exact, whatever the counts say)."""
        if not statuses:
            return False
        # Literals, not parameters: the generic plan of `status = $1` (used after five
        # runs) priced every status as the statistics' common one, and a seq scan finds
        # "a row" at once: on 2,000,000 succeeded tasks the idle check read the whole table
        # (4-6 s) every time there was nothing left to do. TaskStatus values are words.
        found = " OR ".join(
            f"EXISTS (SELECT 1 FROM tasks WHERE status = '{TaskStatus(status)}')"
            for status in statuses
        )
        row = await self._db.read_one(f"SELECT {found}")
        return bool(row[0])

    async def tasks_by_custom_id(self, custom_ids: Sequence[str]) -> list[TaskRow]:
        """The tasks asked for, in the order asked; unknown custom_ids are left out."""
        rows = await self._db.read(
            f"SELECT {TASK_COLUMNS}"
            " FROM unnest($1::text[]) WITH ORDINALITY AS asked(cid, n)"
            " JOIN tasks AS t ON t.custom_id = asked.cid"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY asked.n",
            list(dict.fromkeys(custom_ids)),
        )
        return [task_row(row) for row in rows]

    def iter_result_lines(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[ResultLine]:
        """(custom_id, result JSON) of tasks in `statuses` that have a result, by id."""
        return result_lines(self.iter_result_rows(statuses, page_size=page_size))

    async def iter_result_rows(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[list[ResultRow]]:
        """(id, custom_id, result JSON as bytes) of tasks in `statuses` that have a result,
        by id, in windows of `page_size` ids of the primary key (`keyset.rows_in_windows`:
        each row read once, several windows in flight). `textsend` hands the result's
        text over as bytea: the bytes, not a str decoded here to be encoded again."""
        wanted = sorted({str(status) for status in statuses})
        columns = "id, custom_id, textsend(result::text)"
        sql = window_page(columns, wanted, "result IS NOT NULL")
        async for rows in rows_in_windows(self._db, sql, wanted, page_size):
            yield rows

    async def request_cancel(self, custom_ids: Sequence[str]) -> CancelReport:
        """Cancel pending tasks now; flag submitted ones for when their result comes back."""
        return await self._db.transact(self._request_cancel, list(dict.fromkeys(custom_ids)))

    async def _request_cancel(self, conn: Conn, custom_ids: list[str]) -> CancelReport:
        # FOR UPDATE: the statuses read are the ones the two UPDATEs below act on (a
        # daemon's claim on another connection waits, rather than slipping in between).
        # The named rows are found by custom_id, then changed by id (the primary key):
        # never planned through tasks_by_status, which would read every pending task.
        # `status || ''` (SQLite's `+status`): no index on status can answer it, so the
        # planner cannot choose the status range, which statistics that say "no submitted
        # task" (analysed before a claim of 1,000,000) would make it choose.
        rows = await conn.fetch(
            "SELECT custom_id, status, id FROM tasks WHERE custom_id = ANY($1::text[]) FOR UPDATE",
            custom_ids,
        )
        status_of: dict[str, str] = {row[0]: row[1] for row in rows}
        task_ids = [int(row[2]) for row in rows]
        await conn.execute(
            "UPDATE tasks SET status = 'canceled', error = $1, completed_at = $2"
            " WHERE id = ANY($3::bigint[]) AND status || '' = 'pending'",
            USER_CANCELED,
            self._db.now(),
            task_ids,
        )
        await conn.execute(
            "UPDATE tasks SET cancel_requested = true"
            " WHERE id = ANY($1::bigint[]) AND status || '' = 'submitted'",
            task_ids,
        )
        return cancel_report(custom_ids, status_of)

    async def batches_to_cancel(self) -> list[BatchRecord]:
        """In-progress batches in which every task still waiting was canceled by the user."""
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches AS b WHERE state = 'in_progress'"
            " AND EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted')"
            " AND NOT EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted' AND NOT t.cancel_requested)"
            " ORDER BY id"
        )
        return [batch_record(row) for row in rows]

    async def mark_canceling(self, local_id: int) -> None:
        """We asked the API to cancel the batch."""
        await self._db.transact(_mark_canceling, local_id)

    async def retry_tasks(
        self, statuses: Sequence[TaskStatus], custom_ids: Sequence[str] = ()
    ) -> int:
        """Put final tasks (of `statuses`, optionally only `custom_ids`) back in the queue."""
        check_retryable(statuses)
        wanted = [str(status) for status in statuses]
        return await self._db.transact(retry_in, wanted, list(custom_ids) if custom_ids else None)

    async def completed_since(self, since: datetime) -> tuple[int, datetime | None]:
        """Tasks that reached a final status at or after `since`, and the first such time:
        the entries of tasks_by_completion (migration 010) since then, not every task."""
        row = await self._db.read_one(
            "SELECT count(*), min(completed_at) FROM tasks WHERE completed_at >= $1", since
        )
        return int(row[0]), row[1]


async def _mark_canceling(conn: Conn, local_id: int) -> None:
    await conn.execute(
        "UPDATE batches SET state = 'canceling' WHERE id = $1 AND state = 'in_progress'",
        local_id,
    )


async def retry_in(conn: Conn, statuses: list[str], custom_ids: list[str] | None) -> int:
    """In the caller's transaction: `batchd retry` of the final tasks of `statuses` (only
    `custom_ids`, if given); how many went back to the queue."""
    # A candidate recorded meanwhile copies its intent's members (harvest.py): its INSERT
    # takes a key-share lock on the intent's row, so holding the intents for update makes
    # the two take turns, and the DELETE's own snapshot then sees every candidate
    # committed. Held before the tasks, in the order a batch's finish takes them (batch,
    # then its tasks), so the two never wait for each other.
    await conn.execute(_HOLD_INTENTS, statuses, custom_ids)
    # Usage and model go too: they would describe a result that is no longer there. The
    # revision moves on (a new request, as an edit makes one): an apply that waited for
    # this row while the retry committed re-checks it on the row (writeback.py), where the
    # membership ended below is still there in its snapshot.
    rows = await conn.fetch(
        "UPDATE tasks SET status = 'pending', attempts = 0, revision = revision + 1,"
        " batch_id = NULL, result = NULL,"
        " error = NULL, cancel_requested = false, completed_at = NULL, model = NULL,"
        " input_tokens = NULL, output_tokens = NULL, cache_creation_input_tokens = NULL,"
        f" cache_read_input_tokens = NULL WHERE {_RETRIED} RETURNING id",
        statuses,
        custom_ids,
    )
    task_ids = [row[0] for row in rows]
    if not task_ids:
        return 0
    await conn.execute(_END_MEMBERSHIPS, task_ids)
    await conn.execute(NOTIFY_TASKS)
    return len(task_ids)


_RETRIED = "status = ANY($1::text[]) AND ($2::text[] IS NULL OR custom_id = ANY($2::text[]))"
# A retried task waits for a NEW request (the user may have changed its params): its old
# one may still be answered by a batch not yet read to the end (its own batch in flight, a
# candidate of one of its intents) or by a candidate still to be found (an intent watched,
# whose members a candidate copies). Its membership of those ends here, in the retry's
# transaction: their late line for it is then unmatched (kept by the collector), never
# written to it (review 7, finding 1). Completed, lost and released unwatched batches can
# answer nothing more: their membership stays, the record of what they carried.
_STILL_READ = "state NOT IN ('completed', 'lost', 'rejected') OR watch_until IS NOT NULL"
_HOLD_INTENTS = f"""
SELECT 1 FROM batches AS b WHERE candidate_for IS NULL AND ({_STILL_READ}) AND EXISTS (
    SELECT 1 FROM batch_tasks AS m JOIN tasks ON tasks.id = m.task_id
    WHERE m.batch_id = b.id AND {_RETRIED})
ORDER BY id FOR UPDATE"""
_END_MEMBERSHIPS = f"""
DELETE FROM batch_tasks
WHERE task_id = ANY($1::bigint[]) AND batch_id IN (SELECT id FROM batches WHERE {_STILL_READ})"""
