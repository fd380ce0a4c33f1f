"""What operators do to many tasks or to the record at once on PostgreSQL: `cancel --all /
--status`, acknowledging a suspected duplicate batch (`batchd/store/sqlite/actions.py` is
the SQLite one; the same contract)."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.domain import TaskStatus
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase
from batchd.store.rows import (
    CANCEL_CHUNK,
    USER_CANCELED,
    acknowledge_report,
    cancel_in_chunks,
    cancel_range,
    check_waiting,
)
from batchd.store.values import AcknowledgeReport, WaitingCancelReport

# Up to $4 tasks of each status in $1 above id $2 and up to $3, read at one moment (one
# statement): each branch an index range of (status, id), never a sort of the whole queue.
_WAITING_RANGE = """
SELECT w.id, w.status FROM unnest($1::text[]) AS s(status)
CROSS JOIN LATERAL (
    SELECT id, status FROM tasks
    WHERE tasks.status = s.status AND id > $2 AND id <= $3 ORDER BY id LIMIT $4
) AS w"""
# Pending tasks canceled now, submitted ones flagged, of the statuses in $4 (SET reads
# the old row): RETURNING the new status tells which.
_CANCEL_RANGE = """
UPDATE tasks SET
    status = CASE WHEN status = 'pending' THEN 'canceled' ELSE status END,
    error = CASE WHEN status = 'pending' THEN $1 ELSE error END,
    completed_at = CASE WHEN status = 'pending' THEN $2 ELSE completed_at END,
    cancel_requested = cancel_requested OR status = 'submitted'
WHERE id = ANY($3::bigint[]) AND status = ANY($4::text[])
    AND (status = 'pending' OR (status = 'submitted' AND NOT cancel_requested))
RETURNING status"""


class OperatorActions:
    """Writes of operators' commands on many rows (part of PostgresStore)."""

    _db: PostgresDatabase

    async def cancel_waiting(self, statuses: Sequence[TaskStatus]) -> WaitingCancelReport:
        """Cancel every task waiting in `statuses` (pending: canceled now; submitted:
        flagged, canceled when its result comes back) that existed when the call began, in
        transactions of a range of ids holding at most CANCEL_CHUNK tasks of each status
        (the rows locked, and the count rows the statement trigger updates, are held only
        that long); tasks inserted later are left alone."""
        check_waiting(statuses)
        self._db.check_writable()
        row = await self._db.read_one("SELECT coalesce(max(id), 0) FROM tasks")

        async def cancel_chunk(
            wanted: Sequence[TaskStatus], after: int, last_id: int
        ) -> tuple[int, int, int]:
            return await self._db.transact(self._cancel_chunk, wanted, after, last_id)

        return await cancel_in_chunks(statuses, int(row[0]), cancel_chunk)

    async def _cancel_chunk(
        self, conn: Conn, statuses: Sequence[TaskStatus], after: int, last_id: int
    ) -> tuple[int, int, int]:
        """One range of ids above `after`, every status of `statuses` in it at once; (pending
        tasks canceled, submitted tasks flagged, id to go on from).

        READ COMMITTED gives each statement its own snapshot: the range is read in one
        statement (an index range per status) and changed in one UPDATE, which decides
        each row on its latest version, so a task the daemon requeues (submitted ->
        pending) meanwhile is canceled, not passed between two statements."""
        wanted = [str(status) for status in statuses]
        rows = await conn.fetch(_WAITING_RANGE, wanted, after, last_id, CANCEL_CHUNK)
        ids, end = cancel_range(((r[0], r[1]) for r in rows), CANCEL_CHUNK, last_id)
        if not ids:
            return 0, 0, end
        changed = await conn.fetch(_CANCEL_RANGE, USER_CANCELED, self._db.now(), ids, wanted)
        canceled = sum(1 for row in changed if row[0] == TaskStatus.CANCELED)
        return canceled, len(changed) - canceled, end

    async def acknowledge_duplicates(
        self, api_batch_ids: Sequence[str], note: str
    ) -> AcknowledgeReport:
        """Mark suspected duplicate batches as seen by an operator (one transaction): kept
        in duplicate_batches for the record, no longer reported by `duplicate_batches`."""
        asked = list(dict.fromkeys(api_batch_ids))
        return await self._db.transact(self._acknowledge, asked, note)

    async def _acknowledge(self, conn: Conn, asked: list[str], note: str) -> AcknowledgeReport:
        rows = await conn.fetch(
            "SELECT api_batch_id, acknowledged_at IS NOT NULL FROM duplicate_batches"
            " WHERE api_batch_id = ANY($1::text[]) FOR UPDATE",
            asked,
        )
        already_done = {row[0]: bool(row[1]) for row in rows}
        await conn.execute(
            "UPDATE duplicate_batches SET acknowledged_at = $1, acknowledged_note = $2"
            " WHERE api_batch_id = ANY($3::text[]) AND acknowledged_at IS NULL",
            self._db.now(),
            note,
            asked,
        )
        return acknowledge_report(asked, already_done)
