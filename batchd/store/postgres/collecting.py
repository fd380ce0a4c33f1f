"""Polling and collecting shared by every daemon on the database (migration 009).

Submission is the leader's (leader.py); polls and write-back are anyone's:

- a poll is claimed by a due time (`next_poll_at`): the daemon that takes an in-flight
  batch sets it one poll interval ahead, and the others skip the row meanwhile (SKIP
  LOCKED also skips a row another daemon is claiming or writing at that moment);
- an ended batch is collected by one daemon at a time under a row lease (`collector`,
  `collect_lease_until`): taken with `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
  LOCKED)`, renewed while the holder works, taken over once it lapsed, or at once when
  its holder is known dead (below). The finish is guarded by it (writeback.py).

A holder is known dead when it held its liveness lock (liveness.py) as it took or last
renewed the lease (`collector_lock_held`, migration 014) and that lock is free now: the
session that held it ended, so the process died, or it is cut off from the server, which
the lease already makes harmless. A holder that never held the lock (its liveness
connection failed at start, a caller of the store alone) keeps today's lease: expiry only.

Every time is the server's `now()`: daemons on several hosts never compare their clocks.
"""

from __future__ import annotations

from collections.abc import Collection

from batchd.domain import BatchRecord
from batchd.store.postgres.batches import BATCH_COLUMNS, batch_record
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, count_of
from batchd.store.postgres.liveness import holder_lock_free
from batchd.store.values import TakenBatch

_DUE_FOR_POLL = f"""
WITH due AS (
    SELECT id FROM batches
    WHERE state IN ('in_progress', 'canceling') AND (next_poll_at IS NULL OR next_poll_at <= now())
    ORDER BY id FOR UPDATE SKIP LOCKED)
UPDATE batches SET next_poll_at = now() + make_interval(secs => $1)
WHERE id IN (SELECT id FROM due)
RETURNING {BATCH_COLUMNS}"""
# The previous holder read in the same statement (the CTE's row, locked): a lapsed lease,
# or a live one whose holder is gone, of another daemon is a take-over, logged and counted
# by the collector. A lease of `holder`'s own on a batch not in `skip` (the ones it is
# collecting) is free to it at once, as the interface says: a collection of this process
# that stopped without giving it back, when the database went away under it (a server
# restart), which otherwise held the batch until the lease ran out (`lease_seconds`).
#
# Why this is right under READ COMMITTED with takers racing (docs/postgresql-design.md):
# a holder flagged `collector_lock_held` held its lock in the very transaction that wrote
# the flag, so "free now" means its session ended since. The test is a volatile call in
# the locking scan's qual, asking the lock manager at each evaluation: a row another taker
# changed after this statement's snapshot is checked again (EvalPlanQual) on its newest
# version, with that version's holder (a subquery on pg_locks could be one older reading).
# The try is shared and transaction-scoped: takers never fail each other, and nothing is
# left held after COMMIT.
_TAKE = f"""
WITH free AS (
    SELECT id, collector AS previous, collect_lease_until AS previous_until FROM batches
    WHERE state = 'ended' AND NOT (id = ANY($3::bigint[]))
        AND (collect_lease_until IS NULL OR collect_lease_until <= now() OR collector = $1
             OR (collector_lock_held AND {holder_lock_free("collector")}))
    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE batches SET collector = $1, collect_lease_until = now() + make_interval(secs => $2),
    collector_lock_held = NOT {holder_lock_free("$1")}
FROM free WHERE batches.id = free.id
RETURNING {", ".join(f"batches.{column.strip()}" for column in BATCH_COLUMNS.split(","))},
    free.previous, free.previous_until, free.previous_until > now()"""
# The flag follows the holder's lock: one that lost it (cut off, or not yet won) is taken
# at expiry only, rather than at once.
_RENEW = f"""
UPDATE batches SET collect_lease_until = now() + make_interval(secs => $3),
    collector_lock_held = NOT {holder_lock_free("$2")}
WHERE id = $1 AND collector = $2 AND state = 'ended' AND collect_lease_until IS NOT NULL"""
_GIVE_BACK = """
UPDATE batches SET collect_lease_until = NULL
WHERE id = $1 AND collector = $2 AND state = 'ended'"""


class SharedCollection:
    """Due-time poll claims and collection leases (part of PostgresStore)."""

    _db: PostgresDatabase

    async def batches_due_for_poll(self, interval_s: float) -> list[BatchRecord]:
        """In-flight batches no daemon claimed within `interval_s`, claimed now, by id."""
        return await self._db.transact(_claim_polls, interval_s)

    async def take_ended_batch(
        self, holder: str, lease_s: float, skip: Collection[int] = ()
    ) -> TakenBatch | None:
        """The oldest ended batch under no live lease (lapsed, given back, or its holder
        gone), leased to `holder` for `lease_s`."""
        return await self._db.transact(_take, holder, lease_s, [int(i) for i in skip])

    async def renew_collection(self, local_id: int, holder: str, lease_s: float) -> bool:
        """Extend `holder`'s lease; False once another took it, or it was given back."""
        return bool(await self._db.transact(_count, _RENEW, local_id, holder, lease_s))

    async def give_back_collection(self, local_id: int, holder: str) -> None:
        """End `holder`'s lease now; `collector` stays as the last holder."""
        await self._db.transact(_count, _GIVE_BACK, local_id, holder)


async def _claim_polls(conn: Conn, interval_s: float) -> list[BatchRecord]:
    rows = await conn.fetch(_DUE_FOR_POLL, float(interval_s))
    return sorted((batch_record(row) for row in rows), key=lambda batch: batch.local_id)


async def _take(conn: Conn, holder: str, lease_s: float, skip: list[int]) -> TakenBatch | None:
    row = await conn.fetchrow(_TAKE, holder, float(lease_s), skip)
    if row is None:
        return None
    previous, previous_until, running = row[-3], row[-2], bool(row[-1])
    # A lease of another holder that lapsed without being given back (it stopped
    # renewing), or still running when its holder's lock was found free (it died).
    taken_over = previous if previous_until is not None and previous != holder else None
    return TakenBatch(batch_record(row), taken_over, holder_gone=taken_over is not None and running)


async def _count(conn: Conn, sql: str, *params: object) -> int:
    return count_of(await conn.execute(sql, *params))
