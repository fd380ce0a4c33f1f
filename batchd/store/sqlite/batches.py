"""Batch tracking (design steps 4-5): reads of batches, polls, lost batches, download counts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import orjson

from batchd.api.wire import MessageBatch, RequestCounts, parse_timestamp
from batchd.domain import BatchOrigin, BatchRecord, BatchState
from batchd.store.errors import StoreError
from batchd.store.sqlite.database import (
    Db,
    Row,
    SqliteDatabase,
    fetch_in,
    format_time,
    json_list,
    parse_optional_time,
    run,
    run_in,
)
from batchd.store.sqlite.settle import cancel_flagged, settle_intent
from batchd.store.values import DuplicateBatch

STATE_OF_PROCESSING = {
    "in_progress": BatchState.IN_PROGRESS,
    "canceling": BatchState.CANCELING,
    "ended": BatchState.ENDED,
}
BATCH_COLUMNS = (
    "id, api_batch_id, state, request_count, body_bytes, intent_at, submitted_at,"
    " processing_status, request_counts, api_created_at, ended_at, results_url,"
    " not_found_since, download_attempts, note, candidate_for, origin"
)


class BatchTracking:
    """The `batches` table between a created batch and its results (part of SqliteStore)."""

    _db: SqliteDatabase

    async def batches_in(self, *states: str) -> list[BatchRecord]:
        """Batches in any of `states`, oldest first."""
        if not states:
            return []
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches"
            " WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json_list(states),),
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
        rows = await self._db.read(
            "SELECT coalesce(sum(request_count), 0) FROM batches"
            " WHERE state IN ('creating', 'in_progress', 'canceling')"
        )
        return int(rows[0][0])

    async def update_batch(self, local_id: int, batch: MessageBatch) -> None:
        """Record a poll; `ended` / `canceling` move the batch state forward, never back."""
        await self._db.transact(_update_batch, local_id, batch, self._db.now)

    async def note_not_found(self, local_id: int, since: datetime | None) -> None:
        """Set (first 404 of a run, spec 7.6) or clear `not_found_since`."""
        stamp = None if since is None else format_time(since)
        await self._db.transact(
            run_in, "UPDATE batches SET not_found_since = ? WHERE id = ?", (stamp, local_id)
        )

    async def mark_lost(self, local_id: int, reason: str) -> int:
        """The API no longer knows the batch: requeue its tasks; returns how many."""
        return await self._db.transact(self._mark_lost, local_id, reason)

    async def _mark_lost(self, db: Db, local_id: int, reason: str) -> int:
        rows = list(
            await db.execute_fetchall(
                "UPDATE batches SET state = 'lost', note = ? WHERE id = ?"
                " AND state IN ('in_progress', 'canceling', 'ended')"
                " RETURNING api_batch_id, candidate_for",
                (reason, local_id),
            )
        )
        if not rows:
            return 0
        api_id, intent_id = rows[0]
        now = self._db.now()
        if intent_id is not None:
            # A candidate answers no task of its own: its intent may now be settled (the
            # last open candidate of a completed intent lets its unanswered tasks go).
            why = f"no result line for this request, and candidate batch {api_id} lost"
            return len(await settle_intent(db, intent_id, why, "no_line", now))
        await cancel_flagged(db, local_id, now, attempts_delta=0)
        # Attempts stay counted: the API may have processed (and billed) them.
        return await run(
            db,
            "UPDATE tasks SET status = 'pending', batch_id = NULL, error = ?"
            " WHERE batch_id = ? AND status = 'submitted'",
            (f"batch {api_id} lost: {reason}", local_id),
        )

    async def note_short_stream(self, local_id: int, note: str) -> int:
        """Count a whole results stream with fewer lines than requests; returns how many
        such streams so far (transport failures are counted apart, `note_download_failed`)."""
        rows = await self._db.transact(
            fetch_in,
            "UPDATE batches SET download_attempts = download_attempts + 1,"
            " short_downloads = short_downloads + 1, note = ?"
            " WHERE id = ? RETURNING short_downloads",
            (note, local_id),
        )
        if not rows:
            raise StoreError(f"{self._db.path}: no batch with local id {local_id}")
        return int(rows[0][0])

    async def note_download_failed(self, local_id: int, note: str) -> int:
        """Count a failed results download; returns the attempts so far."""
        rows = await self._db.transact(
            fetch_in,
            "UPDATE batches SET download_attempts = download_attempts + 1, note = ?"
            " WHERE id = ? RETURNING download_attempts",
            (note, local_id),
        )
        if not rows:
            raise StoreError(f"{self._db.path}: no batch with local id {local_id}")
        return int(rows[0][0])

    async def duplicate_batches(self) -> list[DuplicateBatch]:
        """Every suspected duplicate not acknowledged by an operator, oldest first."""
        rows = await self._db.read(
            "SELECT api_batch_id, detected_at, note FROM duplicate_batches"
            " WHERE acknowledged_at IS NULL ORDER BY detected_at, api_batch_id"
        )
        return [DuplicateBatch(row[0], row[1], row[2]) for row in rows]


async def _update_batch(db: Db, local_id: int, batch: MessageBatch, now: Callable[[], str]) -> None:
    await run(
        db,
        "UPDATE batches SET processing_status = :processing, request_counts = :counts,"
        " results_url = :url, ended_at = :ended, last_polled_at = :now,"
        " not_found_since = NULL,"
        " state = CASE"
        "   WHEN :processing = 'ended' AND state IN ('in_progress', 'canceling') THEN 'ended'"
        "   WHEN :processing = 'canceling' AND state = 'in_progress' THEN 'canceling'"
        "   ELSE state END"
        " WHERE id = :local AND api_batch_id = :api_id"
        " AND state IN ('in_progress', 'canceling', 'ended')",
        {**batch_params(batch), "now": now(), "local": local_id},
    )


def batch_params(batch: MessageBatch) -> dict[str, Any]:
    ended = batch["ended_at"]
    return {
        "api_id": batch["id"],
        "processing": batch["processing_status"],
        "counts": orjson.dumps(batch["request_counts"]).decode(),
        "url": batch["results_url"],
        "ended": None if ended is None else format_time(parse_timestamp(ended)),
    }


def batch_record(row: Row) -> BatchRecord:
    return BatchRecord(
        local_id=row[0],
        api_batch_id=row[1],
        state=BatchState(row[2]),
        request_count=row[3],
        body_bytes=row[4],
        intent_at=datetime.fromisoformat(row[5]),
        submitted_at=parse_optional_time(row[6]),
        processing_status=row[7],
        request_counts=None if row[8] is None else cast(RequestCounts, orjson.loads(row[8])),
        api_created_at=parse_optional_time(row[9]),
        ended_at=parse_optional_time(row[10]),
        results_url=row[11],
        not_found_since=parse_optional_time(row[12]),
        download_attempts=row[13],
        note=row[14],
        candidate_for=row[15],
        origin=None if row[16] is None else BatchOrigin(row[16]),
    )
