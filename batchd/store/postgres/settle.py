"""How a batch ends for its intent (design steps 5 and 7) on PostgreSQL: its origin decided,
the intent's unanswered tasks requeued once nothing may still answer them. In the caller's
transaction; the SQLite twin is `batchd/store/sqlite/settle.py`.

Shared by the write-back (finishing a batch) and batch tracking (a lost batch), which is
why it sits apart from both.
"""

from __future__ import annotations

from datetime import datetime

from batchd.domain import BatchOrigin
from batchd.store.origin import LinesSeen, batch_origin
from batchd.store.postgres import kept_lines
from batchd.store.postgres.connection import Conn
from batchd.store.rows import USER_CANCELED

# A candidate still to be read: its results may yet answer the intent's tasks.
OPEN_STATES = ("in_progress", "canceling", "ended")
# A malformed line (kept as `malformed-line-N`) names nobody: it proves nothing foreign and
# is never dropped.
_LINES_OF = """
SELECT b.api_batch_id, count(u.custom_id), count(t.id),
    count(*) FILTER (WHERE u.custom_id LIKE 'malformed-line-%')
FROM batches AS b
LEFT JOIN unmatched_results AS u ON u.api_batch_id = b.api_batch_id
LEFT JOIN tasks AS t ON t.custom_id = u.custom_id
WHERE b.id = $1 GROUP BY b.id"""
# Whether the batch's intent claimed tasks, and whether any of them still exists as it
# was claimed (a user may DELETE tasks in flight; an edit of a task's custom_id or params
# ends its membership, migration 016, but leaves it `submitted` in the batch: claimed all
# the same). EXISTS: one row read each (tasks_by_batch), whatever the batch's size.
_MEMBERS = """
SELECT EXISTS (SELECT 1 FROM batch_tasks WHERE batch_id = $1)
        OR EXISTS (SELECT 1 FROM tasks WHERE batch_id = $1),
    EXISTS (SELECT 1 FROM batch_tasks AS m JOIN tasks AS t ON t.id = m.task_id
            WHERE m.batch_id = $1)"""

_SETTLEABLE = """
SELECT api_batch_id, origin FROM batches AS b WHERE id = $1
    AND state = 'completed' AND candidate_for IS NULL AND NOT EXISTS (
        SELECT 1 FROM batches AS c WHERE c.candidate_for = $1 AND c.state = ANY($2::text[]))"""


async def cancel_flagged(conn: Conn, local_id: int, now: datetime, *, attempts_delta: int) -> None:
    """Tasks the user canceled must not go back to the queue with their batch."""
    await conn.execute(
        "UPDATE tasks SET status = 'canceled', error = $1, completed_at = $2,"
        " attempts = attempts + $3"
        " WHERE batch_id = $4 AND status = 'submitted' AND cancel_requested",
        USER_CANCELED,
        now,
        attempts_delta,
        local_id,
    )


async def decide_origin(
    conn: Conn, local_id: int, matched_lines: int | None, now: datetime, *, own: bool
) -> str | None:
    """In the finishing transaction: what the batch's results showed (migration 006).

    `matched_lines`: lines that named a task of the batch's intent (None: not read, no
    verdict). A foreign batch's kept lines are dropped here, counted; the key is on record
    as shared.
    """
    if matched_lines is None:
        return None
    found = await conn.fetchrow(_LINES_OF, local_id)
    assert found is not None, local_id  # the caller just completed this batch
    api_id, unmatched, ours, malformed = found
    members, live = False, False
    if matched_lines == 0 and unmatched:  # only then can the members change the verdict
        found = await conn.fetchrow(_MEMBERS, local_id)
        assert found is not None  # EXISTS answers one row
        members, live = found
    origin = batch_origin(LinesSeen(matched_lines, unmatched, ours, malformed, members, live))
    if origin == BatchOrigin.FOREIGN:
        await kept_lines.uncount_foreign(conn, api_id)
        await conn.execute("DELETE FROM unmatched_results WHERE api_batch_id = $1", api_id)
        await conn.execute(
            "INSERT INTO foreign_batches (api_batch_id, seen_at, how)"
            " VALUES ($1, $2, 'results') ON CONFLICT DO NOTHING",
            api_id,
            now,
        )
        if own:
            # The batch adopted for this intent carried none of its requests: as when an
            # intent is released, its attempt is given back, to the tasks still waiting
            # in it and to those a candidate of it answered (that candidate, on record in
            # duplicate_batches, is then the one payment counted for them).
            await conn.execute(
                "UPDATE tasks SET attempts = attempts - 1"
                " WHERE id IN (SELECT task_id FROM batch_tasks WHERE batch_id = $1)"
                " AND (batch_id = $1 OR batch_id IN"
                "   (SELECT id FROM batches WHERE candidate_for = $1))",
                local_id,
            )
    await conn.execute(
        "UPDATE batches SET origin = $1, foreign_lines = $2 WHERE id = $3",
        origin.value,
        unmatched if origin == BatchOrigin.FOREIGN else 0,
        local_id,
    )
    return origin.value


async def settle_intent(
    conn: Conn, intent_id: int, reason: str, kind: str, now: datetime
) -> tuple[str, ...]:
    """In the caller's transaction: requeue the intent's tasks that no batch answered, once
    its own batch is `completed` and no candidate of it is still open; else nothing yet.

    Listed in missing_results (paying again is on record), unless the adopted batch proved
    foreign: then its requests were never ours to miss. Returns the requeued custom_ids.
    """
    # The intent's row locked first, then read in a statement of its own (a fresh snapshot
    # under READ COMMITTED): an intent and its last candidate finishing at once on two
    # connections would otherwise each see the other still open, and neither settle
    # (SQLite's single writer serializes them). The finish of the intent holds this lock
    # from its UPDATE; a candidate's finish or loss waits here for it, then sees it.
    await conn.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", intent_id)
    found = await conn.fetchrow(_SETTLEABLE, intent_id, list(OPEN_STATES))
    if found is None:
        return ()
    api_id, origin = found
    # (An adopted batch that proved foreign gave the attempt back when it was decided.)
    await cancel_flagged(conn, intent_id, now, attempts_delta=0)
    if origin == BatchOrigin.FOREIGN:
        reason = f"batch {api_id} adopted for this request was another client's: requeued"
    requeued = await conn.fetch(
        "UPDATE tasks SET status = 'pending', batch_id = NULL, error = $1"
        " WHERE batch_id = $2 AND status = 'submitted' RETURNING id, custom_id",
        reason,
        intent_id,
    )
    missing = tuple(row[1] for row in sorted(requeued, key=lambda row: int(row[0])))
    # (A batch always has its API id once completed; the check keeps NOT NULL honest.)
    if origin != BatchOrigin.FOREIGN and missing and api_id is not None:
        await conn.execute(
            "INSERT INTO missing_results (api_batch_id, custom_id, detected_at, reason)"
            " SELECT $1, unnest($2::text[]), $3, $4 ON CONFLICT DO NOTHING",
            api_id,
            list(missing),
            now,
            kind,
        )
    return missing
