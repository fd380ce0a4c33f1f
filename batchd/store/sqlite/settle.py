"""How a batch ends for its intent (design steps 5 and 7): its origin decided, the intent's
unanswered tasks requeued once nothing may still answer them. In the caller's transaction.

Shared by the write-back (finishing a batch) and batch tracking (a lost batch), which is
why it sits apart from both.
"""

from __future__ import annotations

from batchd.domain import BatchOrigin
from batchd.store.origin import LinesSeen, batch_origin
from batchd.store.rows import USER_CANCELED
from batchd.store.sqlite import kept_lines
from batchd.store.sqlite.database import Db, json_list, run, run_many

# A candidate still to be read: its results may yet answer the intent's tasks.
OPEN_STATES = ("in_progress", "canceling", "ended")
# Whether the batch's intent claimed tasks, and whether any of them still exists as it
# was claimed (a user may DELETE tasks in flight; an edit of a task's custom_id or params
# ends its membership, migration 016, but leaves it `submitted` in the batch: claimed all
# the same). EXISTS: one row read each (tasks_by_batch), whatever the batch's size.
_MEMBERS = """
SELECT EXISTS (SELECT 1 FROM batch_tasks WHERE batch_id = :local)
        OR EXISTS (SELECT 1 FROM tasks WHERE batch_id = :local),
    EXISTS (SELECT 1 FROM batch_tasks AS m JOIN tasks AS t ON t.id = m.task_id
            WHERE m.batch_id = :local)"""


async def cancel_flagged(db: Db, local_id: int, now: str, *, attempts_delta: int) -> None:
    """Tasks the user canceled must not go back to the queue with their batch."""
    await run(
        db,
        "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?,"
        " attempts = attempts + ?"
        " WHERE batch_id = ? AND status = 'submitted' AND cancel_requested = 1",
        (USER_CANCELED, now, attempts_delta, local_id),
    )


async def decide_origin(
    db: Db, local_id: int, matched_lines: int | None, now: str, *, own: bool
) -> str | None:
    """In the finishing transaction: what the batch's results showed (migration 006).

    `matched_lines`: lines that named a task of the batch's intent (None: not read, no
    verdict). A foreign batch's kept lines are dropped here, counted; the key is on record
    as shared.
    """
    if matched_lines is None:
        return None
    # A malformed line (kept as `malformed-line-N`) names nobody: it proves nothing foreign
    # and is never dropped.
    [(api_id, unmatched, ours, malformed)] = await db.execute_fetchall(
        "SELECT b.api_batch_id, count(u.custom_id), count(t.id),"
        " coalesce(sum(u.custom_id LIKE 'malformed-line-%'), 0) FROM batches AS b"
        " LEFT JOIN unmatched_results AS u ON u.api_batch_id = b.api_batch_id"
        " LEFT JOIN tasks AS t ON t.custom_id = u.custom_id WHERE b.id = ?",
        (local_id,),
    )
    members, live = (False, False)
    if matched_lines == 0 and unmatched:  # only then can the members change the verdict
        [(members, live)] = await db.execute_fetchall(_MEMBERS, {"local": local_id})
    origin = batch_origin(
        LinesSeen(matched_lines, unmatched, ours, malformed, bool(members), bool(live))
    )
    if origin == BatchOrigin.FOREIGN:
        await kept_lines.uncount_foreign(db, api_id)
        await run(db, "DELETE FROM unmatched_results WHERE api_batch_id = ?", (api_id,))
        await run(
            db,
            "INSERT OR IGNORE INTO foreign_batches (api_batch_id, seen_at, how)"
            " VALUES (?, ?, 'results')",
            (api_id, now),
        )
        if own:
            # The batch adopted for this intent carried none of its requests: as when an
            # intent is released, its attempt is given back, to the tasks still waiting
            # in it and to those a candidate of it answered (that candidate, on record in
            # duplicate_batches, is then the one payment counted for them).
            await run(
                db,
                "UPDATE tasks SET attempts = attempts - 1"
                " WHERE id IN (SELECT task_id FROM batch_tasks WHERE batch_id = :local)"
                " AND (batch_id = :local OR batch_id IN"
                "   (SELECT id FROM batches WHERE candidate_for = :local))",
                {"local": local_id},
            )
    await run(
        db,
        "UPDATE batches SET origin = ?, foreign_lines = ? WHERE id = ?",
        (origin.value, unmatched if origin == BatchOrigin.FOREIGN else 0, local_id),
    )
    return origin.value


async def settle_intent(
    db: Db, intent_id: int, reason: str, kind: str, now: str
) -> tuple[str, ...]:
    """In the caller's transaction: requeue the intent's tasks that no batch answered, once
    its own batch is `completed` and no candidate of it is still open; else nothing yet.

    Listed in missing_results (paying again is on record), unless the adopted batch proved
    foreign: then its requests were never ours to miss. Returns the requeued custom_ids.
    """
    rows = list(
        await db.execute_fetchall(
            "SELECT api_batch_id, origin FROM batches AS b WHERE id = :intent"
            " AND state = 'completed' AND candidate_for IS NULL AND NOT EXISTS ("
            "   SELECT 1 FROM batches AS c WHERE c.candidate_for = :intent"
            "   AND c.state IN (SELECT value FROM json_each(:open)))",
            {"intent": intent_id, "open": json_list(OPEN_STATES)},
        )
    )
    if not rows:
        return ()
    api_id, origin = rows[0]
    # (An adopted batch that proved foreign gave the attempt back when it was decided.)
    await cancel_flagged(db, intent_id, now, attempts_delta=0)
    if origin == BatchOrigin.FOREIGN:
        reason = f"batch {api_id} adopted for this request was another client's: requeued"
    requeued = await db.execute_fetchall(
        "UPDATE tasks SET status = 'pending', batch_id = NULL, error = ?"
        " WHERE batch_id = ? AND status = 'submitted' RETURNING id, custom_id",
        (reason, intent_id),
    )
    missing = tuple(custom_id for _, custom_id in sorted(requeued))
    if origin != BatchOrigin.FOREIGN:
        await run_many(
            db,
            "INSERT OR IGNORE INTO missing_results (api_batch_id, custom_id, detected_at, reason)"
            " VALUES (?, ?, ?, ?)",
            [(api_id, custom_id, now, kind) for custom_id in missing],
        )
    return missing
