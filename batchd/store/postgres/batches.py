"""Batch tracking (design steps 4-5) on PostgreSQL: reads, polls, lost batches, downloads."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

import orjson

from batchd.api.wire import MessageBatch, RequestCounts, parse_timestamp
from batchd.domain import BatchOrigin, BatchRecord, BatchState
from batchd.store.errors import StoreError
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import (
    PostgresDatabase,
    Row,
    count_of,
    text_time,
    to_millis,
)
from batchd.store.postgres.settle import cancel_flagged, settle_intent
from batchd.store.postgres.storable import storable_text
from batchd.store.values import DuplicateBatch

STATE_OF_PROCESSING = {
    "in_progress": BatchState.IN_PROGRESS,
    "canceling": BatchState.CANCELING,
    "ended": BatchState.ENDED,
}
BATCH_COLUMNS = (
    "id, api_batch_id, state, request_count, body_bytes, intent_at, submitted_at,"
    " processing_status, request_counts::text, api_created_at, ended_at, results_url,"
    " not_found_since, download_attempts, note, candidate_for, origin"
)
_UPDATE_BATCH = """
UPDATE batches SET processing_status = $2, request_counts = $3::jsonb, results_url = $4,
    ended_at = $5, last_polled_at = $6, not_found_since = NULL,
    state = CASE
        WHEN $2 = 'ended' AND state IN ('in_progress', 'canceling') THEN 'ended'
        WHEN $2 = 'canceling' AND state = 'in_progress' THEN 'canceling'
        ELSE state END
WHERE id = $7 AND api_batch_id = $1 AND state IN ('in_progress', 'canceling', 'ended')"""


class BatchTracking:
    """The `batches` table between a created batch and its results (part of PostgresStore)."""

    _db: PostgresDatabase

    async def batches_in(self, *states: str) -> list[BatchRecord]:
        """Batches in any of `states`, oldest first."""
        if not states:
            return []
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = ANY($1::text[]) ORDER BY id",
            list(states),
        )
        return [batch_record(row) for row in rows]

    async def known_api_batch_ids(self) -> set[str]:
        """Every API batch id we know of: adopted or created, and suspected duplicates."""
        rows = await self._db.read(
            "SELECT api_batch_id FROM batches WHERE api_batch_id IS NOT NULL"
            " UNION SELECT api_batch_id FROM duplicate_batches"
        )
        return {row[0] for row in rows}

    async def in_flight_request_count(self) -> int:
        """Requests counting against the API's processing queue (ours, at least)."""
        row = await self._db.read_one(
            "SELECT coalesce(sum(request_count), 0) FROM batches"
            " WHERE state IN ('creating', 'in_progress', 'canceling')"
        )
        return int(row[0])

    async def update_batch(self, local_id: int, batch: MessageBatch) -> None:
        """Record a poll; `ended` / `canceling` move the batch state forward, never back."""
        await self._db.transact(
            _execute, _UPDATE_BATCH, *batch_params(batch), self._db.now(), local_id
        )

    async def note_not_found(self, local_id: int, since: datetime | None) -> None:
        """Set (first 404 of a run, spec 7.6) or clear `not_found_since`."""
        await self._db.transact(
            _execute,
            "UPDATE batches SET not_found_since = $1 WHERE id = $2",
            None if since is None else to_millis(since),
            local_id,
        )

    async def mark_lost(self, local_id: int, reason: str) -> int:
        """The API no longer knows the batch: requeue its tasks; returns how many."""
        return await self._db.transact(self._mark_lost, local_id, reason)

    async def _mark_lost(self, conn: Conn, local_id: int, reason: str) -> int:
        found = await conn.fetchrow(
            "UPDATE batches SET state = 'lost', note = $1 WHERE id = $2"
            " AND state IN ('in_progress', 'canceling', 'ended')"
            " RETURNING api_batch_id, candidate_for",
            storable_text(reason),  # may quote the API
            local_id,
        )
        if found is None:
            return 0
        api_id, intent_id = found
        now = self._db.now()
        if intent_id is not None:
            # A candidate answers no task of its own: its intent may now be settled (the
            # last open candidate of a completed intent lets its unanswered tasks go).
            why = f"no result line for this request, and candidate batch {api_id} lost"
            return len(await settle_intent(conn, intent_id, why, "no_line", now))
        await cancel_flagged(conn, local_id, now, attempts_delta=0)
        # Attempts stay counted: the API may have processed (and billed) them.
        return count_of(
            await conn.execute(
                "UPDATE tasks SET status = 'pending', batch_id = NULL, error = $1"
                " WHERE batch_id = $2 AND status = 'submitted'",
                storable_text(f"batch {api_id} lost: {reason}"),
                local_id,
            )
        )

    async def note_short_stream(self, local_id: int, note: str) -> int:
        """Count a whole results stream with fewer lines than requests; returns how many."""
        return await self._counted(
            "UPDATE batches SET download_attempts = download_attempts + 1,"
            " short_downloads = short_downloads + 1, note = $1"
            " WHERE id = $2 RETURNING short_downloads",
            local_id,
            note,
        )

    async def note_download_failed(self, local_id: int, note: str) -> int:
        """Count a failed results download; returns the attempts so far."""
        return await self._counted(
            "UPDATE batches SET download_attempts = download_attempts + 1, note = $1"
            " WHERE id = $2 RETURNING download_attempts",
            local_id,
            note,
        )

    async def _counted(self, sql: str, local_id: int, note: str) -> int:
        # A note may quote the API's error, whose text may hold a NUL (storable.py).
        value = await self._db.transact(_fetchval, sql, storable_text(note), local_id)
        if value is None:
            raise StoreError(f"{self._db.shown}: no batch with local id {local_id}")
        return int(value)

    async def duplicate_batches(self) -> list[DuplicateBatch]:
        """Every suspected duplicate not acknowledged by an operator, oldest first."""
        rows = await self._db.read(
            "SELECT api_batch_id, detected_at, note FROM duplicate_batches"
            " WHERE acknowledged_at IS NULL ORDER BY detected_at, api_batch_id"
        )
        return [DuplicateBatch(row[0], text_time(row[1]) or "", row[2]) for row in rows]


async def _execute(conn: Conn, sql: str, *params: Any) -> str:
    status: str = await conn.execute(sql, *params)
    return status


async def _fetchval(conn: Conn, sql: str, *params: Any) -> Any:
    return await conn.fetchval(sql, *params)


def batch_params(batch: MessageBatch) -> tuple[str, str, str, str | None, datetime | None]:
    """(api id, processing status, request counts JSON, results url, ended at)."""
    ended = batch["ended_at"]
    return (
        batch["id"],
        batch["processing_status"],
        orjson.dumps(batch["request_counts"]).decode(),
        batch["results_url"],
        None if ended is None else parse_timestamp(ended),
    )


def batch_record(row: Row) -> BatchRecord:
    return BatchRecord(
        local_id=row[0],
        api_batch_id=row[1],
        state=BatchState(row[2]),
        request_count=row[3],
        body_bytes=row[4],
        intent_at=row[5],
        submitted_at=row[6],
        processing_status=row[7],
        request_counts=None if row[8] is None else cast(RequestCounts, orjson.loads(row[8])),
        api_created_at=row[9],
        ended_at=row[10],
        results_url=row[11],
        not_found_since=row[12],
        download_attempts=row[13],
        note=row[14],
        candidate_for=row[15],
        origin=None if row[16] is None else BatchOrigin(row[16]),
    )
