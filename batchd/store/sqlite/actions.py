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
    cancel_range,
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

        In transactions of a range of ids holding at most CANCEL_CHUNK tasks of each status
        (the (status, id) index), so a queue of a million never holds the write lock for
        long (users' INSERTs wait only for ~5,000 rows of an index range per status); tasks
        inserted after the call began are left alone.
        """
        check_waiting(statuses)
        rows = await self._db.read("SELECT coalesce(max(id), 0) FROM tasks")

        async def cancel_chunk(
            wanted: Sequence[TaskStatus], after: int, last_id: int
        ) -> tuple[int, int, int]:
            return await self._db.transact(self._cancel_chunk, wanted, after, last_id)

        return await cancel_in_chunks(statuses, int(rows[0][0]), cancel_chunk)

    async def _cancel_chunk(
        self, db: Db, statuses: Sequence[TaskStatus], after: int, last_id: int
    ) -> tuple[int, int, int]:
        """One range of ids above `after`, every status of `statuses` in it at once (the
        write lock is held from the first read: nothing moves in between); (pending tasks
        canceled, submitted tasks flagged, id to go on from)."""
        rows: list[tuple[int, str]] = []
        for status in statuses:  # one (status, id) index range each
            found = await db.execute_fetchall(
                "SELECT id, status FROM tasks WHERE status = ? AND id > ? AND id <= ?"
                " ORDER BY id LIMIT ?",
                (str(status), after, last_id, CANCEL_CHUNK),
            )
            rows.extend((int(row[0]), str(row[1])) for row in found)
        ids, end = cancel_range(rows, CANCEL_CHUNK, last_id)
        if not ids:
            return 0, 0, end
        chunk = json_list(ids)
        canceled = flagged = 0
        if TaskStatus.PENDING in statuses:
            canceled = await run(
                db,
                "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?"
                " WHERE id IN (SELECT value FROM json_each(?)) AND +status = 'pending'",
                (USER_CANCELED, self._db.now(), chunk),
            )
        if TaskStatus.SUBMITTED in statuses:
            flagged = await run(
                db,
                "UPDATE tasks SET cancel_requested = 1 WHERE id IN"
                " (SELECT value FROM json_each(?)) AND +status = 'submitted'"
                " AND cancel_requested = 0",
                (chunk,),
            )
        return canceled, flagged, end

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
