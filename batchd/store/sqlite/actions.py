"""What operators do to many tasks or to the record at once: `cancel --all / --status`,
acknowledging a suspected duplicate batch (part of SqliteStore)."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.domain import TaskStatus
from batchd.store.rows import (
    CANCEL_CHUNK,
    USER_CANCELED,
    acknowledge_report,
    cancel_in_chunks,
    check_waiting,
)
from batchd.store.sqlite.database import Db, SqliteDatabase, json_list, run
from batchd.store.values import AcknowledgeReport, WaitingCancelReport


class OperatorActions:
    """Writes of operators' commands on many rows (part of SqliteStore)."""

    _db: SqliteDatabase

    async def cancel_waiting(self, statuses: Sequence[TaskStatus]) -> WaitingCancelReport:
        """Cancel every task waiting in `statuses` (pending: canceled now; submitted:
        flagged, canceled when its result comes back) that existed when the call began.

        In transactions of CANCEL_CHUNK tasks by id (the (status, id) index), so a queue of
        a million never holds the write lock for long (users' INSERTs wait only for ~5,000
        rows of one index range); tasks inserted after the call began are left alone.
        """
        check_waiting(statuses)
        rows = await self._db.read("SELECT coalesce(max(id), 0) FROM tasks")

        async def cancel_chunk(status: TaskStatus, after: int, last_id: int) -> tuple[int, int]:
            return await self._db.transact(self._cancel_chunk, status, after, last_id)

        return await cancel_in_chunks(statuses, int(rows[0][0]), cancel_chunk)

    async def _cancel_chunk(
        self, db: Db, status: TaskStatus, after: int, last_id: int
    ) -> tuple[int, int]:
        """One chunk of `status` tasks above id `after`; (tasks changed, id to go on from)."""
        chunk = list(
            await db.execute_fetchall(
                "SELECT id FROM tasks WHERE status = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (str(status), after, last_id, CANCEL_CHUNK),
            )
        )
        if not chunk:
            return 0, last_id
        ids = json_list(row[0] for row in chunk)
        if status is TaskStatus.PENDING:
            changed = await run(
                db,
                "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?"
                " WHERE id IN (SELECT value FROM json_each(?)) AND +status = 'pending'",
                (USER_CANCELED, self._db.now(), ids),
            )
        else:
            changed = await run(
                db,
                "UPDATE tasks SET cancel_requested = 1 WHERE id IN"
                " (SELECT value FROM json_each(?)) AND +status = 'submitted'"
                " AND cancel_requested = 0",
                (ids,),
            )
        next_after = last_id if len(chunk) < CANCEL_CHUNK else int(chunk[-1][0])
        return changed, next_after

    async def acknowledge_duplicates(
        self, api_batch_ids: Sequence[str], note: str
    ) -> AcknowledgeReport:
        """Mark suspected duplicate batches as seen by an operator (one transaction): kept
        in duplicate_batches for the record, no longer reported by `duplicate_batches`."""
        asked = list(dict.fromkeys(api_batch_ids))
        return await self._db.transact(self._acknowledge, asked, note)

    async def _acknowledge(self, db: Db, asked: list[str], note: str) -> AcknowledgeReport:
        rows = await db.execute_fetchall(
            "SELECT api_batch_id, acknowledged_at IS NOT NULL FROM duplicate_batches"
            " WHERE api_batch_id IN (SELECT value FROM json_each(?))",
            (json_list(asked),),
        )
        already_done = {row[0]: bool(row[1]) for row in rows}
        await run(
            db,
            "UPDATE duplicate_batches SET acknowledged_at = ?, acknowledged_note = ?"
            " WHERE api_batch_id IN (SELECT value FROM json_each(?))"
            " AND acknowledged_at IS NULL",
            (self._db.now(), note, json_list(asked)),
        )
        return acknowledge_report(asked, already_done)
