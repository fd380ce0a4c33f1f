"""The write-back (design steps 6-7): lanes that stage a batch's lines and apply them.

A lane is a connection with a staging database of its own (`staging.py`): one batch's
lines are parsed and staged on one lane while another lane's batch is applied. The
writer has its own staging too, for `write_results` (a few lines in one transaction).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast

from batchd.crashpoints import crash_point
from batchd.domain import Outcome, TaskStatus, WriteReport
from batchd.store.rows import USER_CANCELED
from batchd.store.sqlite import kept_lines, staging
from batchd.store.sqlite.database import (
    Connection,
    Db,
    Row,
    SqliteDatabase,
    json_list,
    run,
    run_many,
)
from batchd.store.sqlite.settle import decide_origin, settle_intent
from batchd.store.sqlite.staging import StagingKeys
from batchd.store.values import AppliedRange, FinishReport, KeptLine, StageReport

# Two: the apply is one writer at a time anyway; a third lane would only wait for it.
_WRITE_BACK_LANES = 2
_RESULT_TYPES = frozenset({"succeeded", "errored", "canceled", "expired"})
_INSERT_STAGING = (
    "INSERT INTO staging.results"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # the columns of staging.py, in order
    " ON CONFLICT (task_id) DO NOTHING"
)
# Matched: a task with that custom_id was in this batch (batch_tasks remembers requeued
# ones, whose re-downloaded lines are then merely ignored by the guard below). custom_id is
# unique, so a line names at most one task: its rowid is looked up once, here.
# CROSS JOIN keeps the lines as the outer loop: the planner would otherwise walk every
# member of the batch for each chunk. (A dict of the whole batch's members was no faster
# and held ~12 MB per 100,000.)
_MEMBER_TASK_IDS = """
SELECT t.custom_id, t.id FROM json_each(:custom_ids) AS line
CROSS JOIN tasks AS t ON t.custom_id = line.value
CROSS JOIN batch_tasks AS m ON m.batch_id = :local AND m.task_id = t.id"""
_FIRST_MEMBER = "SELECT min(task_id) FROM batch_tasks WHERE batch_id = ?"
# The first and last task ids and the count of the next range of staged lines.
_NEXT_RANGE = """
SELECT min(task_id), max(task_id), count(*)
FROM (SELECT task_id FROM staging.results WHERE task_id > ? ORDER BY task_id LIMIT ?)"""
# Another try: a transient failure, attempts left, and the user did not ask to cancel.
_RETRY = """(s.result_type <> 'succeeded' AND s.retryable
    AND tasks.attempts < :max_attempts AND tasks.cancel_requested = 0)"""
# The guard: only tasks of THIS batch still waiting, so a repeated line is a no-op, and
# still members of it: a user's edit of a task's request (its params, migration 016's
# trigger) ends its membership, and the old request's answer must not reach the new one.
# The EXISTS read here cannot be stale, as it can be on PostgreSQL (review 8, finding 6):
# every apply is a BEGIN IMMEDIATE transaction holding SQLite's one write lock from its
# start (database.py), so no user's edit or retry commits between this read of
# batch_tasks and the write it decides; there is no row-level wait in a transaction that
# started earlier. (PostgreSQL's apply also checks the task's revision on the row itself.)
_STAGED_TASKS = """s.task_id BETWEEN :first AND :last AND s.batch_id = :local
    AND tasks.id = s.task_id AND tasks.custom_id = s.custom_id
    AND tasks.batch_id = :local AND tasks.status = 'submitted'
    AND EXISTS (
        SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = :local AND m.task_id = tasks.id)"""
# RETURNING the new status counts the requeued tasks (now 'pending') without a second join.
_APPLY_STAGED = f"""
UPDATE tasks SET
    status = CASE
        WHEN s.result_type = 'succeeded' THEN 'succeeded'
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested = 1 THEN 'canceled'
        WHEN {_RETRY} THEN 'pending'
        ELSE s.result_type END,
    batch_id = CASE WHEN {_RETRY} THEN NULL ELSE tasks.batch_id END,
    result = CASE WHEN {_RETRY} THEN NULL ELSE s.result_json END,
    error = CASE
        WHEN s.result_type = 'succeeded' THEN NULL
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested = 1 THEN '{USER_CANCELED}'
        ELSE s.error END,
    completed_at = CASE WHEN {_RETRY} THEN NULL ELSE :now END,
    model = s.model,
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens
FROM staging.results AS s
WHERE {_STAGED_TASKS}
RETURNING tasks.status"""
# A candidate batch (a suspected duplicate, `harvest.py`) answers a task of its intent only
# while the task still waits for a result: `submitted` in whichever batch, or requeued and
# `pending` (then it is withdrawn from the queue: no longer pending, never claimed). Only a
# line that ends a task counts; a retryable error leaves the task to its own course. The
# task then points at the candidate, so the candidate's own re-download is a no-op and
# any other batch's line for it is a duplicate (below). Membership is checked again here: a
# retry may have ended it since the line was staged (operations.py, `_END_MEMBERSHIPS`).
_ENDS_TASK = "(s.result_type = 'succeeded' OR (s.result_type = 'errored' AND NOT s.retryable))"
_APPLY_HARVESTED = f"""
UPDATE tasks SET
    status = s.result_type,
    batch_id = :local,
    result = s.result_json,
    error = CASE WHEN s.result_type = 'succeeded' THEN NULL ELSE s.error END,
    completed_at = :now,
    model = s.model,
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens
FROM staging.results AS s
WHERE s.task_id BETWEEN :first AND :last AND s.batch_id = :local
    AND tasks.id = s.task_id AND tasks.custom_id = s.custom_id
    AND {_ENDS_TASK} AND tasks.status IN ('submitted', 'pending')
    AND EXISTS (SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = :local AND m.task_id = tasks.id)
RETURNING tasks.status"""
# After the range's UPDATE, in its transaction: a line that would end a task another batch
# already answered (final, pointing at another batch) is a paid duplicate: kept, counted,
# never written over the first result. A re-download of this batch's own line is not one.
_DUPLICATE_LINES = f"""
FROM staging.results AS s JOIN tasks AS t ON t.id = s.task_id AND t.custom_id = s.custom_id
WHERE s.task_id BETWEEN :first AND :last AND s.batch_id = :local AND {_ENDS_TASK}
    AND t.status IN ('succeeded', 'errored', 'expired', 'canceled') AND t.batch_id IS NOT :local"""
_KEEP_DUPLICATES = f"""
INSERT OR IGNORE INTO duplicate_results (api_batch_id, custom_id, line, received_at)
SELECT :api_id, s.custom_id, json_object('custom_id', s.custom_id, 'result', json(s.result_json)),
    :now
{_DUPLICATE_LINES}"""
# In the same transaction, the billed ones (succeeded) are counted: a row per line of the
# API batch, whose trigger adds it to the usage ledger (migration 015); a line kept again
# is ignored, never counted twice. Run only when the range kept a new duplicate.
_COUNT_DUPLICATES = kept_lines.count_staged("duplicate", _DUPLICATE_LINES)
# A line staged for a task whose membership a retry (or an edit of its params) ended since
# (operations.py): the task waits for a new request (requeued, or still `submitted` in
# this very batch, requeued when it finishes), and the old one's answer is kept as a
# duplicate, and counted as the others. Looked for only when a range left lines neither
# written nor kept (the common range writes every line), so the apply's usual statements
# and plans stay as they were.
_NO_LONGER_MEMBERS_LINES = f"""
FROM staging.results AS s JOIN tasks AS t ON t.id = s.task_id AND t.custom_id = s.custom_id
WHERE s.task_id BETWEEN :first AND :last AND s.batch_id = :local AND {_ENDS_TASK}
    AND t.status IN ('pending', 'submitted')
    AND NOT EXISTS (
        SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = :local AND m.task_id = t.id)"""
_KEEP_NO_LONGER_MEMBERS = f"""
INSERT OR IGNORE INTO duplicate_results (api_batch_id, custom_id, line, received_at)
SELECT :api_id, s.custom_id, json_object('custom_id', s.custom_id, 'result', json(s.result_json)),
    :now
{_NO_LONGER_MEMBERS_LINES}"""
_COUNT_NO_LONGER_MEMBERS = kept_lines.count_staged("duplicate", _NO_LONGER_MEMBERS_LINES)


class SqliteWriteBackLane:
    """Stages a batch's result lines and applies them, on one connection of the store.

    The staging database belongs to the connection: lines staged on a lane are applied
    on the same lane. Staging writes only that database (no lock on the database file);
    applying holds the store's write lock like every other write.
    """

    def __init__(self, database: SqliteDatabase, conn: Connection) -> None:
        self._database = database
        self._conn = conn
        self._keys = StagingKeys()  # the keys of the lines in this connection's staging

    @property
    def connection(self) -> Connection:
        return self._conn

    async def clear_staging(self) -> None:
        """Forget staged lines (of a download that stopped midway): a batch stages alone."""
        await self._database.shielded("no_transaction", self._conn, self._reset_staging)

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """Keep a chunk of a batch's lines in the staging table; no task changes yet.

        Writes only the staging database, so it takes no write lock: users' INSERTs never
        wait, and neither does another lane applying its batch.
        """
        check_result_types(outcomes)
        return await self._database.shielded("staging", self._conn, self.stage, local_id, outcomes)

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """Apply the staged lines of the next `max_rows` task ids above `after_task_id` in
        one transaction; None once none is left. Staging is left as it is (`clear_staging`).
        """
        return await self._database.shielded(
            "immediate", self._conn, self.apply_range, local_id, max_attempts, max_rows,
            after_task_id,
        )  # fmt: skip

    async def _reset_staging(self, db: Db) -> None:
        """Replace the staging database by an empty one, dropping every line at once.

        If a previous reset stopped halfway (detached, the attach failed), this one
        finishes it: staging heals at the next download instead of failing every one.
        """
        if await db.execute_fetchall(staging.STAGING_ATTACHED):
            await db.execute("DETACH DATABASE staging")
        await staging.attach_staging(db)
        self._keys = StagingKeys()

    async def stage(self, db: Db, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """The body of `stage_results`, inside a transaction on this lane's connection."""
        first_task_id = next(iter(await db.execute_fetchall(_FIRST_MEMBER, (local_id,))))[0]
        found = await db.execute_fetchall(
            _MEMBER_TASK_IDS,
            {"local": local_id, "custom_ids": json_list(o.custom_id for o in outcomes)},
        )
        task_ids: dict[str, int] = dict(cast(Iterable[tuple[str, int]], found))
        rows: list[Row] = []
        unmatched: list[int] = []
        for position, outcome in enumerate(outcomes):
            task_id = task_ids.get(outcome.custom_id)
            if task_id is None:
                unmatched.append(position)
            else:
                key = self._keys.key(first_task_id, task_id)
                rows.append(_staging_row(key, local_id, task_id, outcome))
        # The first line for a task wins, a repeated one is ignored (as if it were
        # downloaded again). Only that conflict: a key used twice would be our bug, and
        # must fail loudly rather than drop a line.
        staged = await run_many(db, _INSERT_STAGING, rows)
        return StageReport(staged, len(rows) - staged, tuple(unmatched))

    async def apply_range(
        self, db: Db, local_id: int, max_attempts: int, max_rows: int, after_task_id: int
    ) -> AppliedRange | None:
        """The body of `apply_staged`, inside a write transaction."""
        # Only reads staging: deleting the applied rows here (scattered over the staging
        # table) journaled most of its pages in every transaction, doubling the lock time.
        rows = await db.execute_fetchall(_NEXT_RANGE, (after_task_id, max_rows))
        first, last, count = next(iter(rows))
        if not count:
            return None
        [(api_id, intent_id)] = await db.execute_fetchall(
            "SELECT api_batch_id, candidate_for FROM batches WHERE id = ?", (local_id,)
        )
        names = {
            "local": local_id,
            "max_attempts": max_attempts,
            "now": self._database.now(),
            "first": first,
            "last": last,
        }
        apply = _APPLY_STAGED if intent_id is None else _APPLY_HARVESTED
        changed = list(await db.execute_fetchall(apply, names))
        crash_point("harvest_range_applied" if intent_id is not None else "range_applied")
        duplicates = await run(db, _KEEP_DUPLICATES, {**names, "api_id": api_id})
        if duplicates:
            await run(db, _COUNT_DUPLICATES, {**names, "api_id": api_id})
        gone: tuple[str, ...] = ()  # lines of tasks gone since staging, kept unmatched
        if count - len(changed) - duplicates:
            no_longer = await run(db, _KEEP_NO_LONGER_MEMBERS, {**names, "api_id": api_id})
            if no_longer:
                await run(db, _COUNT_NO_LONGER_MEMBERS, {**names, "api_id": api_id})
            duplicates += no_longer
            # A task DELETEd (or its custom_id changed) since its line was staged: the
            # paid line is kept as unmatched and counted, never only ignored.
            if count - len(changed) - duplicates:
                gone = await kept_lines.keep_gone_tasks_lines(db, {**names, "api_id": api_id})
        requeued = sum(1 for (status,) in changed if status == TaskStatus.PENDING)
        ignored = count - len(changed) - duplicates - len(gone)
        report = WriteReport(len(changed) - requeued, requeued, ignored, gone, duplicates)
        return AppliedRange(last, report)

    async def write_results(
        self, db: Db, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        """Stage and apply a few lines in the caller's transaction (the writer's lane)."""
        await db.execute("DELETE FROM staging.results")
        staged = await self.stage(db, local_id, outcomes)
        applied = await self.apply_range(db, local_id, max_attempts, -1, 0)
        await db.execute("DELETE FROM staging.results")  # frees the chunk's text now
        report = applied.report if applied else WriteReport(0, 0, 0, ())
        written, requeued, duplicates = report.written, report.requeued, report.duplicates
        # A repeated unmatched line counts once, as a repeated matched one does.
        unmatched = tuple(
            dict.fromkeys([*(outcomes[at].custom_id for at in staged.unmatched), *report.unmatched])
        )
        ignored = len(outcomes) - written - requeued - duplicates - len(unmatched)
        return WriteReport(written, requeued, ignored, unmatched, duplicates)


class LanePool:
    """The write-back lanes of a store, opened at the first write-back, not at open:
    `batchd status` and the other commands never need them."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database
        self._lanes: asyncio.Queue[SqliteWriteBackLane] | None = None
        self._opening = asyncio.Lock()

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[SqliteWriteBackLane]:
        """A free lane for the duration (waits for one)."""
        lanes = await self.opened()
        lane = await lanes.get()
        try:
            yield lane
        finally:
            lanes.put_nowait(lane)

    async def opened(self) -> asyncio.Queue[SqliteWriteBackLane]:
        """The queue of free lanes, opening them all first if need be."""
        async with self._opening:
            self._database.check_open()
            if self._lanes is None:
                lanes: asyncio.Queue[SqliteWriteBackLane] = asyncio.Queue()
                for db in await self._database.open_connections(_WRITE_BACK_LANES, _attach):
                    conn = Connection(db, asyncio.Lock())
                    lanes.put_nowait(SqliteWriteBackLane(self._database, conn))
                self._lanes = lanes
            return self._lanes


async def _attach(db: Db) -> None:
    # Looked up at each call: tests replace staging.attach_staging to make it fail.
    await staging.attach_staging(db)


class WriteBack:
    """Results into tasks, unmatched lines kept, batches finished (part of SqliteStore)."""

    _db: SqliteDatabase
    _main_lane: SqliteWriteBackLane
    _lanes: LanePool

    async def write_results(
        self, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        """Apply a chunk of result lines to the tasks of batch `local_id`, in one transaction.

        The collector stages a whole batch instead (`stage_results`, `apply_staged`); this
        is the same SQL in one transaction, for a few lines at once.
        """
        check_result_types(outcomes)
        lane = self._main_lane
        return await self._db.transact(lane.write_results, local_id, outcomes, max_attempts)

    def write_back_lane(self) -> AbstractAsyncContextManager[SqliteWriteBackLane]:
        """A write-back lane of its own (waits for a free one): a connection with its own
        staging, so that one batch is staged while another lane's batch is applied."""
        return self._lanes.lane()

    async def yield_to_writers(self, seconds: float) -> None:
        """No write of ours, on any connection, for `seconds`: a user's write waiting in
        SQLite's busy handler gets the lock at its next try."""
        await self._db.hold_writes(seconds)

    async def clear_staging(self) -> None:
        """`clear_staging` on the writer connection's own staging."""
        await self._main_lane.clear_staging()

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """`stage_results` on the writer connection's own staging."""
        return await self._main_lane.stage_results(local_id, outcomes)

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """`apply_staged` on the writer connection's own staging."""
        return await self._main_lane.apply_staged(local_id, max_attempts, max_rows, after_task_id)

    async def keep_unmatched(self, api_batch_id: str, lines: Sequence[KeptLine]) -> None:
        """Keep result lines that matched no task of their batch (never dropped), and
        count the billed ones in the usage ledger, in one transaction."""
        now = self._db.now()
        kept = [KeptLine(*line) for line in lines]  # a bare (custom_id, line): not billed
        await self._db.transact(kept_lines.keep_unmatched, api_batch_id, kept, now)

    async def finish_batch(
        self,
        local_id: int,
        reason: str,
        *,
        archived: bool = False,
        matched_lines: int | None = None,
        holder: str | None = None,
    ) -> FinishReport:
        """All lines written (or, `archived`, none can be any more): mark the batch
        `completed` with what its lines showed (`matched_lines`: lines that named a task of
        its intent), and requeue the intent's tasks that got none, listed in
        missing_results, once no candidate of it is still open; at once. `holder`: the one
        daemon a file admits always holds its lease (collecting.py): not guarded further."""
        return await self._db.transact(
            self._finish_batch, local_id, reason, archived, matched_lines
        )

    async def _finish_batch(
        self, db: Db, local_id: int, reason: str, archived: bool, matched_lines: int | None
    ) -> FinishReport:
        now = self._db.now()
        rows = list(
            await db.execute_fetchall(
                "UPDATE batches SET state = 'completed', completed_at = ?"
                " WHERE id = ? AND state = 'ended' RETURNING candidate_for",
                (now, local_id),
            )
        )
        if not rows:
            return FinishReport(())
        crash_point("batch_completed")
        intent_id = rows[0][0]
        origin = await decide_origin(db, local_id, matched_lines, now, own=intent_id is None)
        kind = "archived" if archived else "no_line"
        if intent_id is None:
            missing = await settle_intent(db, local_id, reason, kind, now)
        else:
            # A candidate's end may be the last thing its intent waited for.
            why = "no result line for this request in its batch or any candidate batch"
            missing = await settle_intent(db, intent_id, why, "no_line", now)
        # In the same transaction: requests that will be sent (and paid for) again are
        # always on record (`batchd status`), even across a kill.
        return FinishReport(missing, origin)


def check_result_types(outcomes: Iterable[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.result_type not in _RESULT_TYPES:
            raise ValueError(f"unknown result type {outcome.result_type!r}")


def _staging_row(key: int, local_id: int, task_id: int, outcome: Outcome) -> Row:
    usage = outcome.usage
    return (
        key,
        task_id,
        local_id,
        outcome.custom_id,
        outcome.result_type,
        outcome.result_json,
        outcome.error,
        int(outcome.retryable),
        usage and usage.input_tokens,
        usage and usage.output_tokens,
        usage and usage.cache_creation_input_tokens,
        usage and usage.cache_read_input_tokens,
        outcome.model,
    )
