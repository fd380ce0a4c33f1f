"""Candidate batches (docs/design.md, "Harvesting candidate batches") on PostgreSQL:
recorded, read, settled. The SQLite twin is `batchd/store/sqlite/harvest.py`.

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
from batchd.store.postgres.batches import (
    BATCH_COLUMNS,
    STATE_OF_PROCESSING,
    batch_params,
    batch_record,
)
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, count_of, text_time, to_millis
from batchd.store.values import CandidateBatch, SharedKeyEvidence

# The guard: the intent is one of ours (not itself a candidate), and the API id is not
# recorded yet (batches.api_batch_id is UNIQUE).
_INSERT_CANDIDATE = """
INSERT INTO batches (api_batch_id, state, request_count, body_bytes, intent_at, submitted_at,
    api_created_at, processing_status, request_counts, results_url, ended_at, candidate_for)
SELECT $1, $2, $3, 0, intent_at, $4, $5, $6, $7::jsonb, $8, $9, id
FROM batches WHERE id = $10 AND candidate_for IS NULL
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
    conn: Conn, intent_id: int, batch: MessageBatch, note: str, now: datetime
) -> bool:
    """In the caller's transaction: `batch` becomes a candidate of intent `intent_id` (a
    batches row that is polled and harvested, the intent's members, the duplicate report).
    False, changing nothing, if the API id is already recorded."""
    api_id, processing, counts, url, ended = batch_params(batch)
    harvest_id = await conn.fetchval(
        _INSERT_CANDIDATE,
        api_id,
        STATE_OF_PROCESSING[batch["processing_status"]].value,
        request_total(batch["request_counts"]),
        now,
        parse_timestamp(batch["created_at"]),
        processing,
        counts,
        url,
        ended,
        intent_id,
    )
    if harvest_id is None:
        return False
    await conn.execute(
        "INSERT INTO batch_tasks (batch_id, task_id)"
        " SELECT $1, task_id FROM batch_tasks WHERE batch_id = $2",
        harvest_id,
        intent_id,
    )
    await conn.execute(
        "INSERT INTO duplicate_batches (api_batch_id, local_id, detected_at, note, harvest_id)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        api_id,
        intent_id,
        now,
        note,
        harvest_id,
    )
    return True


class Harvest:
    """Candidate batches, released intents still watched, and the shared-key evidence
    (part of PostgresStore)."""

    _db: PostgresDatabase

    async def record_candidate(self, intent_id: int, batch: MessageBatch, note: str) -> bool:
        """A batch found late for intent `intent_id` (released, or adopted by another):
        harvested from now on; False if its id was already recorded. One transaction."""
        return await self._db.transact(record_candidate_in, intent_id, batch, note, self._db.now())

    async def watched_intents(self, now: datetime) -> list[BatchRecord]:
        """Intents whose create's outcome was unknown (adopted from the list, or released),
        still watched at `now`: a batch of theirs may land late."""
        rows = await self._db.read(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE watch_until > $1"
            " AND candidate_for IS NULL ORDER BY id",
            to_millis(now),
        )
        return [batch_record(row) for row in rows]

    async def candidate_batches(self) -> list[CandidateBatch]:
        """Every suspected duplicate, with how far its harvest got, oldest first."""
        rows = await self._db.read(_CANDIDATES)
        return [
            CandidateBatch(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                int(row[5]),
                int(row[6]),
                int(row[7]),
                text_time(row[8]) or "",
                row[9],
            )
            for row in rows
        ]

    async def note_foreign_batches(self, api_batch_ids: Sequence[str]) -> int:
        """Batches on the list batchd did not create; returns how many were new."""
        fresh = list(dict.fromkeys(api_batch_ids))
        return await self._db.transact(_note_listed, fresh, self._db.now())

    async def shared_key_evidence(self) -> SharedKeyEvidence:
        """How many batches on the key were not batchd's, and since when."""
        count, first, proven = await self._db.read_one(
            "SELECT count(*), min(seen_at),"
            " (SELECT count(*) FROM batches WHERE origin = 'foreign') FROM foreign_batches"
        )
        return SharedKeyEvidence(int(count), text_time(first), int(proven))


async def _note_listed(conn: Conn, api_batch_ids: list[str], now: datetime) -> int:
    status = await conn.execute(
        "INSERT INTO foreign_batches (api_batch_id, seen_at, how)"
        " SELECT unnest($1::text[]), $2, 'listed' ON CONFLICT DO NOTHING",
        api_batch_ids,
        now,
    )
    return count_of(status)
