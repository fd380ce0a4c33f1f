"""What users ask of the store: counts, tasks by custom_id, results export, cancel, retry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from batchd.domain import BatchRecord, TaskRow, TaskStatus
from batchd.store.rows import (
    USER_CANCELED,
    cancel_report,
    check_retryable,
    result_lines,
    status_counts,
)
from batchd.store.sqlite.batches import BATCH_COLUMNS, batch_record
from batchd.store.sqlite.database import Db, SqliteDatabase, json_list, run_in
from batchd.store.sqlite.keyset import in_pages, merged_by_id, status_page
from batchd.store.values import CancelReport, ResultLine, ResultRow


class UserOperations:
    """The reads and commands of `batchd status / results / cancel / retry` (part of
    SqliteStore)."""

    _db: SqliteDatabase

    async def status_counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status, zeros included: 7 rows kept by triggers
        (migration 007), whatever the number of tasks."""
        return status_counts(await self._db.read("SELECT status, tasks FROM task_counts"))

    async def has_tasks(self, *statuses: TaskStatus) -> bool:
        """Whether any task is in one of `statuses`: at most one index entry per status,
        read from the tasks themselves (exact, whatever the counts say)."""
        if not statuses:
            return False
        found = " OR ".join("EXISTS (SELECT 1 FROM tasks WHERE status = ?)" for _ in statuses)
        rows = await self._db.read(f"SELECT {found}", [str(status) for status in statuses])
        return bool(rows[0][0])

    async def tasks_by_custom_id(self, custom_ids: Sequence[str]) -> list[TaskRow]:
        """The tasks asked for, in the order asked; unknown custom_ids are left out."""
        rows = await self._db.read(
            "SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, t.result,"
            " t.created_at, t.submitted_at, t.completed_at"
            " FROM json_each(?) AS asked"
            " JOIN tasks AS t ON t.custom_id = asked.value"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY asked.key",
            (json_list(dict.fromkeys(custom_ids)),),
        )
        return [TaskRow(row[0], TaskStatus(row[1]), *row[2:]) for row in rows]

    def iter_result_lines(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[ResultLine]:
        """(custom_id, result JSON) of tasks in `statuses` that have a result, by id."""
        return result_lines(self.iter_result_rows(statuses, page_size=page_size))

    async def iter_result_rows(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[list[ResultRow]]:
        """(id, custom_id, result JSON as bytes) of tasks in `statuses` that have a result,
        by id, in lists: each row of those statuses read once (`keyset`), none of other
        statuses. The result CAST to a BLOB: its UTF-8 bytes as stored, not decoded."""
        sql = status_page("id, custom_id, CAST(result AS BLOB)", "result IS NOT NULL")
        runs = merged_by_id(self._db.read, sql, sorted(set(statuses)), page_size)
        async for rows in in_pages(runs, page_size):
            yield rows

    async def request_cancel(self, custom_ids: Sequence[str]) -> CancelReport:
        """Cancel pending tasks now; flag submitted ones for when their result comes back."""
        return await self._db.transact(self._request_cancel, list(dict.fromkeys(custom_ids)))

    async def _request_cancel(self, db: Db, custom_ids: list[str]) -> CancelReport:
        # The asked rows by custom_id, then changed by id: a `status = ?` beside the
        # custom_ids let SQLite plan through tasks_by_status and read every pending task
        # (183 ms at 1,000,000 pending) to cancel one. `+status` keeps it off that index.
        rows = await db.execute_fetchall(
            "SELECT custom_id, status, id FROM tasks"
            " WHERE custom_id IN (SELECT value FROM json_each(?))",
            (json_list(custom_ids),),
        )
        status_of: dict[str, str] = {row[0]: row[1] for row in rows}
        task_ids = json_list(row[2] for row in rows)
        await db.execute(
            "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?"
            " WHERE id IN (SELECT value FROM json_each(?)) AND +status = 'pending'",
            (USER_CANCELED, self._db.now(), task_ids),
        )
        await db.execute(
            "UPDATE tasks SET cancel_requested = 1"
            " WHERE id IN (SELECT value FROM json_each(?)) AND +status = 'submitted'",
            (task_ids,),
        )
        return cancel_report(custom_ids, status_of)

    async def batches_to_cancel(self) -> list[BatchRecord]:
        """In-progress batches in which every task still waiting was canceled by the user."""
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches AS b WHERE state = 'in_progress'"
            " AND EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted')"
            " AND NOT EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted' AND t.cancel_requested = 0)"
            " ORDER BY id"
        )
        return [batch_record(row) for row in rows]

    async def mark_canceling(self, local_id: int) -> None:
        """We asked the API to cancel the batch."""
        await self._db.transact(
            run_in,
            "UPDATE batches SET state = 'canceling' WHERE id = ? AND state = 'in_progress'",
            (local_id,),
        )

    async def retry_tasks(
        self, statuses: Sequence[TaskStatus], custom_ids: Sequence[str] = ()
    ) -> int:
        """Put final tasks (of `statuses`, optionally only `custom_ids`) back in the queue,
        each for a new request: no batch read for its old one may answer it (`_retry`)."""
        check_retryable(statuses)
        return await self._db.transact(_retry, list(statuses), list(custom_ids))


async def _retry(db: Db, statuses: list[TaskStatus], custom_ids: list[str]) -> int:
    which = " AND custom_id IN (SELECT value FROM json_each(?))" if custom_ids else ""
    params = [json_list(statuses)] + ([json_list(custom_ids)] if custom_ids else [])
    # Usage and model go too: they would describe a result that is no longer there. The
    # revision moves on, a new request, as on PostgreSQL (where an apply re-checks it).
    requeued = await db.execute_fetchall(
        "UPDATE tasks SET status = 'pending', attempts = 0, revision = revision + 1,"
        " batch_id = NULL, result = NULL,"
        " error = NULL, cancel_requested = 0, completed_at = NULL, model = NULL,"
        " input_tokens = NULL, output_tokens = NULL, cache_creation_input_tokens = NULL,"
        " cache_read_input_tokens = NULL"
        f" WHERE status IN (SELECT value FROM json_each(?)){which} RETURNING id",
        params,
    )
    task_ids = [row[0] for row in requeued]
    if task_ids:
        await db.execute(_END_MEMBERSHIPS, (json_list(task_ids),))
    return len(task_ids)


# A retried task waits for a NEW request (the user may have changed its params): its old
# one may still be answered by a batch not yet read to the end (its own batch in flight, a
# candidate of one of its intents) or by a candidate still to be found (an intent watched,
# whose members a candidate copies). Its membership of those ends here, in the retry's
# transaction: their late line for it is then unmatched (kept by the collector), never
# written to it (review 7, finding 1). Completed, lost and released unwatched batches can
# answer nothing more: their membership stays, the record of what they carried.
_END_MEMBERSHIPS = """
DELETE FROM batch_tasks
WHERE task_id IN (SELECT value FROM json_each(?))
    AND batch_id IN (SELECT id FROM batches
        WHERE state NOT IN ('completed', 'lost', 'rejected') OR watch_until IS NOT NULL)"""
