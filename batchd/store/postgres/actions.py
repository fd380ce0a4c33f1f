"""What operators do to many tasks or to the record at once on PostgreSQL: `cancel --all /
--status`, acknowledging a suspected duplicate batch (`batchd/store/sqlite/actions.py` is
the SQLite one; the same contract)."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.domain import TaskStatus
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, count_of
from batchd.store.rows import (
    CANCEL_CHUNK,
    USER_CANCELED,
    acknowledge_report,
    cancel_in_chunks,
    check_waiting,
)
from batchd.store.values import AcknowledgeReport, WaitingCancelReport


class OperatorActions:
    """Writes of operators' commands on many rows (part of PostgresStore)."""

    _db: PostgresDatabase

    async def cancel_waiting(self, statuses: Sequence[TaskStatus]) -> WaitingCancelReport:
        """Cancel every task waiting in `statuses` (pending: canceled now; submitted:
        flagged, canceled when its result comes back) that existed when the call began, in
        transactions of CANCEL_CHUNK tasks by id (the rows locked, and the count rows the
        statement trigger updates, are held only that long); tasks inserted later are left
        alone."""
        check_waiting(statuses)
        self._db.check_writable()
        row = await self._db.read_one("SELECT coalesce(max(id), 0) FROM tasks")

        async def cancel_chunk(status: TaskStatus, after: int, last_id: int) -> tuple[int, int]:
            return await self._db.transact(self._cancel_chunk, status, after, last_id)

        return await cancel_in_chunks(statuses, int(row[0]), cancel_chunk)

    async def _cancel_chunk(
        self, conn: Conn, status: TaskStatus, after: int, last_id: int
    ) -> tuple[int, int]:
        """One chunk of `status` tasks above id `after`; (tasks changed, id to go on from)."""
        chunk = await conn.fetch(
            "SELECT id FROM tasks WHERE status = $1 AND id > $2 AND id <= $3"
            " ORDER BY id LIMIT $4 FOR UPDATE",
            str(status),
            after,
            last_id,
            CANCEL_CHUNK,
        )
        if not chunk:
            return 0, last_id
        ids = [int(row[0]) for row in chunk]
        if status is TaskStatus.PENDING:
            tag = await conn.execute(
                "UPDATE tasks SET status = 'canceled', error = $1, completed_at = $2"
                " WHERE id = ANY($3::bigint[]) AND status = 'pending'",
                USER_CANCELED,
                self._db.now(),
                ids,
            )
        else:
            tag = await conn.execute(
                "UPDATE tasks SET cancel_requested = true WHERE id = ANY($1::bigint[])"
                " AND status = 'submitted' AND NOT cancel_requested",
                ids,
            )
        next_after = last_id if len(chunk) < CANCEL_CHUNK else ids[-1]
        return count_of(tag), next_after

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
