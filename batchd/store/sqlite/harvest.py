"""Candidate batches (docs/design.md, "Harvesting candidate batches"): recorded, read, settled.

A candidate is an API batch found for one of our intents but not adopted: it gets a
`batches` row of its own (`candidate_for` = the intent) with the intent's members copied
into batch_tasks, so the poller and the collector read it like our own batches; only the
apply's guard differs (`writeback.py`). The intent's tasks that got no line are requeued
only once its own batch and every candidate of it have been read to the end (`settle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from batchd.api.wire import MessageBatch, parse_timestamp, request_total
from batchd.domain import BatchRecord
from batchd.store.sqlite.batches import (
    BATCH_COLUMNS,
    STATE_OF_PROCESSING,
    batch_params,
    batch_record,
)
from batchd.store.sqlite.database import Db, SqliteDatabase, format_time, run_many
from batchd.store.values import CandidateBatch, SharedKeyEvidence

_INSERT_CANDIDATE = """
INSERT INTO batches (api_batch_id, state, request_count, body_bytes, intent_at, submitted_at,
    api_created_at, processing_status, request_counts, results_url, ended_at, candidate_for)
SELECT :api_id, :state, :requests, 0, intent_at, :now, :created, :processing, :counts, :url,
    :ended, id
FROM batches WHERE id = :intent AND candidate_for IS NULL
ON CONFLICT (api_batch_id) DO NOTHING
RETURNING id"""
_CANDIDATES = """
SELECT d.api_batch_id, d.harvest_id, d.local_id, coalesce(b.state, 'unread'), b.origin,
    (SELECT count(*) FROM tasks AS t WHERE t.batch_id = d.harvest_id),
    (SELECT count(*) FROM duplicate_results AS r WHERE r.api_batch_id = d.api_batch_id),
    coalesce(b.foreign_lines, 0), d.detected_at, d.note
FROM duplicate_batches AS d LEFT JOIN batches AS b ON b.id = d.harvest_id
WHERE d.acknowledged_at IS NULL
ORDER BY d.detected_at, d.api_batch_id"""


async def record_candidate_in(
    db: Db, intent_id: int, batch: MessageBatch, note: str, now: str
) -> bool:
    """In the caller's transaction: `batch` becomes a candidate of intent `intent_id` (a
    batches row that is polled and harvested, the intent's members, the duplicate report).
    False, changing nothing, if the API id is already recorded."""
    rows = list(
        await db.execute_fetchall(
            _INSERT_CANDIDATE,
            {
                **batch_params(batch),
                "state": STATE_OF_PROCESSING[batch["processing_status"]].value,
                "requests": request_total(batch["request_counts"]),
                "created": format_time(parse_timestamp(batch["created_at"])),
                "now": now,
                "intent": intent_id,
            },
        )
    )
    if not rows:
        return False
    harvest_id = rows[0][0]
    await db.execute(
        "INSERT INTO batch_tasks (batch_id, task_id)"
        " SELECT ?, task_id FROM batch_tasks WHERE batch_id = ?",
        (harvest_id, intent_id),
    )
    await db.execute(
        "INSERT OR IGNORE INTO duplicate_batches"
        " (api_batch_id, local_id, detected_at, note, harvest_id) VALUES (?, ?, ?, ?, ?)",
        (batch["id"], intent_id, now, note, harvest_id),
    )
    return True


class Harvest:
    """Candidate batches, released intents still watched, and the shared-key evidence
    (part of SqliteStore)."""

    _db: SqliteDatabase

    async def record_candidate(self, intent_id: int, batch: MessageBatch, note: str) -> bool:
        """A batch found late for intent `intent_id` (released, or adopted by another):
        harvested from now on; False if its id was already recorded. One transaction."""
        return await self._db.transact(record_candidate_in, intent_id, batch, note, self._db.now())

    async def watched_intents(self, now: datetime) -> list[BatchRecord]:
        """Intents whose create's outcome was unknown (adopted from the list, or released),
        still watched at `now`: a batch of theirs may land late."""
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE watch_until > ?"
            " AND candidate_for IS NULL ORDER BY id",
            (format_time(now),),
        )
        return [batch_record(row) for row in rows]

    async def candidate_batches(self) -> list[CandidateBatch]:
        """Every suspected duplicate not acknowledged by an operator, with how far its harvest
        got, oldest first (an acknowledged one stays on record, no longer reported)."""
        rows = await self._db.read(_CANDIDATES)
        return [CandidateBatch(*row) for row in rows]

    async def note_foreign_batches(self, api_batch_ids: Sequence[str]) -> int:
        """Batches on the list batchd did not create; returns how many were new."""
        now = self._db.now()
        return await self._db.transact(
            _note_listed, [(api_id, now) for api_id in dict.fromkeys(api_batch_ids)]
        )

    async def shared_key_evidence(self) -> SharedKeyEvidence:
        """How many batches on the key were not batchd's, and since when."""
        rows = await self._db.read(
            "SELECT count(*), min(seen_at),"
            " (SELECT count(*) FROM batches WHERE origin = 'foreign') FROM foreign_batches"
        )
        count, first, proven = rows[0]
        return SharedKeyEvidence(int(count), first, int(proven))


async def _note_listed(db: Db, rows: list[tuple[str, str]]) -> int:
    return await run_many(
        db,
        "INSERT OR IGNORE INTO foreign_batches (api_batch_id, seen_at, how)"
        " VALUES (?, ?, 'listed')",
        rows,
    )
