"""Polling and collecting on SQLite: one daemon per file (its lock), so every lease is its own.

The PostgreSQL store shares polls and collections among daemons (postgres/collecting.py);
here the same verbs cost what the single daemon's did before: every in-flight batch is due
at every poll, taking an ended batch is one read, renewing is one read, giving back
touches nothing. Migration 009's columns (`collector`, `collect_lease_until`,
`next_poll_at`) exist here too, unused, so both dialects keep one schema.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from batchd.domain import BatchRecord, BatchState
from batchd.store.sqlite.batches import BATCH_COLUMNS, batch_record
from batchd.store.sqlite.database import SqliteDatabase, json_list
from batchd.store.values import TakenBatch


class SharedCollection:
    """The collecting verbs of the store interface, for the one daemon (part of SqliteStore)."""

    _db: SqliteDatabase

    if TYPE_CHECKING:  # BatchTracking's, beside this part in SqliteStore

        async def batches_in(self, *states: str) -> list[BatchRecord]: ...

    async def batches_due_for_poll(self, interval_s: float) -> list[BatchRecord]:
        """Every in-flight batch: no other daemon polls this file."""
        return await self.batches_in(BatchState.IN_PROGRESS, BatchState.CANCELING)

    async def take_ended_batch(
        self, holder: str, lease_s: float, skip: Collection[int] = ()
    ) -> TakenBatch | None:
        """The oldest ended batch not in `skip`; nothing written (no other holder exists)."""
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'ended'"
            " AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 1",
            (json_list([int(i) for i in skip]),),
        )
        return TakenBatch(batch_record(rows[0])) if rows else None

    async def renew_collection(self, local_id: int, holder: str, lease_s: float) -> bool:
        """Held while the batch is `ended`: nobody else can take it (one read, every third
        of the lease)."""
        rows = await self._db.read(
            "SELECT 1 FROM batches WHERE id = ? AND state = 'ended'", (local_id,)
        )
        return bool(rows)

    async def give_back_collection(self, local_id: int, holder: str) -> None:
        """Nothing to give back: the next take reads the batch again."""
        self._db.check_open()
