"""The write-back (design steps 6-7) on PostgreSQL: lanes that COPY a batch's lines into a
staging table and apply them with one guarded `UPDATE ... FROM` per range of task ids.

A lane is a connection of its own (never pooled: its staging lives in the session) with
two TEMP tables: `incoming`, which each chunk is COPYed into (COPY knows no ON CONFLICT),
and `staging`, which keeps the first line of each task of the batch. TEMP tables are
never WAL-logged and vanish with the session, like the SQLite lane's unlinked file. A
lane whose connection was lost lost its staging with it: it says so (a StoreError) until
`clear_staging`, so a collector never mistakes lost lines for a batch without lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg

from batchd.crashpoints import crash_point
from batchd.domain import Outcome, TaskStatus, WriteReport
from batchd.store.postgres import kept_lines
from batchd.store.postgres.connection import Conn, postgres_errors
from batchd.store.postgres.database import PostgresDatabase, count_of, in_transaction
from batchd.store.postgres.errors import PostgresUnavailableError
from batchd.store.postgres.settle import decide_origin, settle_intent
from batchd.store.postgres.staging import staging_rows
from batchd.store.rows import USER_CANCELED
from batchd.store.values import AppliedRange, FinishReport, KeptLine, StageReport

P = ParamSpec("P")
T = TypeVar("T")
# Two: one lane parses and stages a batch while the other applies its own.
_WRITE_BACK_LANES = 2
_RESULT_TYPES = frozenset({"succeeded", "errored", "canceled", "expired"})
_COLUMNS = (
    "seq", "task_id", "revision", "batch_id", "custom_id", "result_type", "result_json", "error",
    "retryable", "input_tokens", "output_tokens", "cache_creation_input_tokens",
    "cache_read_input_tokens", "model",
)  # fmt: skip
_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS {name} (
    seq integer NOT NULL,
    task_id bigint NOT NULL{key},
    revision integer NOT NULL,
    batch_id bigint NOT NULL,
    custom_id text NOT NULL,
    result_type text NOT NULL,
    result_json text NOT NULL,
    error text,
    retryable boolean NOT NULL,
    input_tokens bigint,
    output_tokens bigint,
    cache_creation_input_tokens bigint,
    cache_read_input_tokens bigint,
    model text
)"""
# The first line of a task wins; a repeated one (in this chunk or an earlier) is ignored.
_KEEP_FIRST = """
INSERT INTO pg_temp.staging SELECT DISTINCT ON (task_id) * FROM pg_temp.incoming
ORDER BY task_id, seq ON CONFLICT (task_id) DO NOTHING"""
_NEXT_RANGE = """
SELECT min(task_id), max(task_id), count(*)
FROM (SELECT task_id FROM pg_temp.staging WHERE task_id > $1 ORDER BY task_id LIMIT $2) AS r"""
# Every statement on `tasks` below finds its rows from the range's ids (staging's key,
# then tasks' primary key), never through an index of status or batch: those columns'
# statistics are stale while a run moves 10,000s of tasks at once, and a plan that scanned
# every `submitted` (or finished) task for each range was measured at up to 10x the apply
# (bench/README.md). A condition inside `(...) IS TRUE` means the same in a WHERE (NULL is
# not true either) but is never an index condition.
_RETRY = """(s.result_type <> 'succeeded' AND s.retryable
    AND tasks.attempts < $2 AND NOT tasks.cancel_requested)"""
# Still a member: a user's edit of a task's request (its params, migration 016's trigger)
# ends its membership, and the old request's answer must not reach the new one. The
# membership alone is not enough under READ COMMITTED: an UPDATE that waited for a task's
# row (a user's edit holding it) re-checks its WHERE on the row's new version
# (EvalPlanQual), but reads batch_tasks as its snapshot showed it, the membership still
# there (review 8, finding 6). So the line also names the revision its task had when
# staging found it a member (staging.py), and `tasks.revision = s.revision` is checked on
# the row itself: the edit moved it on, the line is left over and kept as the others.
_APPLY_STAGED = f"""
UPDATE tasks SET
    status = CASE
        WHEN s.result_type = 'succeeded' THEN 'succeeded'
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested THEN 'canceled'
        WHEN {_RETRY} THEN 'pending'
        ELSE s.result_type END,
    batch_id = CASE WHEN {_RETRY} THEN NULL ELSE tasks.batch_id END,
    result = CASE WHEN {_RETRY} THEN NULL ELSE s.result_json::jsonb END,
    error = CASE
        WHEN s.result_type = 'succeeded' THEN NULL
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested THEN '{USER_CANCELED}'
        ELSE s.error END,
    completed_at = CASE WHEN {_RETRY} THEN NULL ELSE $3::timestamptz END,
    model = s.model,
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens
FROM pg_temp.staging AS s
WHERE s.task_id BETWEEN $4 AND $5 AND s.batch_id = $1
    AND tasks.id BETWEEN $4 AND $5 AND tasks.id = s.task_id AND tasks.custom_id = s.custom_id
    AND (tasks.batch_id = $1 AND tasks.status = 'submitted' AND tasks.revision = s.revision) IS TRUE
    AND EXISTS (SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = $1 AND m.task_id = tasks.id)
RETURNING tasks.status"""
# A candidate batch (a suspected duplicate, `harvest.py`) answers a task of its intent only
# while the task still waits for a result: `submitted` in whichever batch, or requeued and
# `pending` (then it is withdrawn from the queue: no longer pending, never claimed). Only a
# line that ends a task counts; a retryable error leaves the task to its own course. The
# task then points at the candidate, so the candidate's own re-download is a no-op and
# any other batch's line for it is a duplicate (below). Membership is checked again here: a
# retry may have ended it since the line was staged (operations.py, `_END_MEMBERSHIPS`);
# and, as above, the revision on the row itself (an edit or a retry moves it on), for an
# apply that waited for the row while one committed.
_ENDS_TASK = kept_lines.ENDS_TASK
_APPLY_HARVESTED = f"""
UPDATE tasks SET
    status = s.result_type,
    batch_id = $1,
    result = s.result_json::jsonb,
    error = CASE WHEN s.result_type = 'succeeded' THEN NULL ELSE s.error END,
    completed_at = $2::timestamptz,
    model = s.model,
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens
FROM pg_temp.staging AS s
WHERE s.task_id BETWEEN $3 AND $4 AND s.batch_id = $1
    AND tasks.id BETWEEN $3 AND $4 AND tasks.id = s.task_id AND tasks.custom_id = s.custom_id
    AND {_ENDS_TASK}
    AND (tasks.status IN ('submitted', 'pending') AND tasks.revision = s.revision) IS TRUE
    AND EXISTS (SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = $1 AND m.task_id = tasks.id)
RETURNING tasks.status"""
# After the range's UPDATE, in its transaction: a line that would end a task another batch
# already answered (final, pointing at another batch) is a paid duplicate: kept, counted,
# never written over the first result. A re-download of this batch's own line is not one.
# The line is built as the collector keeps an unmatched one: custom_id first, then the
# result's text as it came (`::json` checks it and keeps it unchanged).
_DUPLICATE_LINES = f"""
FROM pg_temp.staging AS s JOIN tasks AS t ON t.id = s.task_id AND t.custom_id = s.custom_id
WHERE s.task_id BETWEEN $3 AND $4 AND s.batch_id = $5 AND {_ENDS_TASK} AND t.id BETWEEN $3 AND $4
    AND (t.status IN ('succeeded', 'errored', 'expired', 'canceled')) IS TRUE
    AND t.batch_id IS DISTINCT FROM $5"""
_KEEP_DUPLICATES = f"""
INSERT INTO duplicate_results (api_batch_id, custom_id, line, received_at)
SELECT $1, s.custom_id,
    '{{"custom_id":' || to_json(s.custom_id)::text || ',"result":' || s.result_json::json::text
    || '}}',
    $2::timestamptz
{_DUPLICATE_LINES}
ON CONFLICT DO NOTHING"""
# In the same transaction, the billed ones (succeeded) are counted: a row per line of the
# API batch, whose trigger adds them to the usage ledger (migration 015); a line kept again
# is left out, never counted twice. Run only when the range kept a new duplicate.
_COUNT_DUPLICATES = kept_lines.count_staged("duplicate", _DUPLICATE_LINES)


class PostgresWriteBackLane:
    """Stages a batch's result lines and applies them, on a connection of its own."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._staging_lost = False

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()

    async def clear_staging(self) -> None:
        """Forget staged lines (of a download that stopped midway): a batch stages alone."""
        await self._run(self._reset)

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """Keep a chunk of a batch's lines in this session's staging; no task changes yet,
        no lock users wait for (TEMP tables only)."""
        check_result_types(outcomes)
        return await self._run(self._stage, local_id, outcomes)

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """Apply the staged lines of the next `max_rows` task ids above `after_task_id` in
        one guarded transaction; None once none is left."""
        return await self._run(self._apply, local_id, max_attempts, max_rows, after_task_id)

    async def _run(
        self, body: Callable[Concatenate[Conn, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`body(conn, ...)` as one transaction on this lane's connection, shielded."""
        self._database.check_writable()

        async def run() -> T:
            async with self._lock:
                conn = await self._connection()
                if body != self._reset and self._staging_lost:
                    raise PostgresUnavailableError(
                        f"{self._database.shown}: the connection holding the staged results "
                        "was lost; download the batch again"
                    )
                with postgres_errors(self._database.target, "write back to", conn=conn):
                    return await in_transaction(conn, body, *args, **kwargs)

        return await self._database.shielded(run())

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._conn is not None:
            self._staging_lost = True  # its TEMP tables went with the session
        self._conn = None
        conn = await self._database.connect()
        try:
            with postgres_errors(self._database.target, "write back to", conn=conn):
                await create_staging(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    async def _reset(self, conn: Conn) -> None:
        await unflushed(conn)
        await conn.execute("TRUNCATE pg_temp.staging, pg_temp.incoming")
        self._seq = 0
        self._staging_lost = False

    async def _stage(self, conn: Conn, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        await unflushed(conn)
        rows, unmatched, received = await staging_rows(conn, local_id, outcomes, self._seq)
        await _keep_received(conn, self._database, local_id, received)
        self._seq += len(outcomes)
        await conn.copy_records_to_table(
            "incoming", schema_name="pg_temp", records=rows, columns=_COLUMNS
        )
        staged = await conn.execute(_KEEP_FIRST)
        await conn.execute("TRUNCATE pg_temp.incoming")
        count = int(staged.rsplit(" ", 1)[-1])
        return StageReport(count, len(rows) - count, tuple(unmatched))

    async def _apply(
        self, conn: Conn, local_id: int, max_attempts: int, max_rows: int, after_task_id: int
    ) -> AppliedRange | None:
        await unflushed(conn)
        return await apply_range(
            conn, self._database, local_id, max_attempts, (max_rows, after_task_id)
        )


async def unflushed(conn: Conn) -> None:
    """This transaction's COMMIT returns before its WAL reaches the disk (it is flushed
    within ~3 x wal_writer_delay). Only for the lane's transactions, where a commit lost to
    a server crash costs a download again and nothing else: staging is TEMP (gone with the
    session anyway), and a range lost leaves its tasks `submitted` in a batch still `ended`
    (finish_batch comes later in the WAL, so it cannot survive a crash that lost a range
    before it), which is downloaded and applied again under the same guard. A flushed
    commit flushes every earlier one: the claim that sends a requeued task again flushes
    its requeue first, so nothing sent to the API rests on an unflushed write. Never for
    the intent, the record of a create, or finish_batch."""
    await conn.execute("SET LOCAL synchronous_commit = off")


async def create_staging(conn: Conn) -> None:
    """The session's `staging` and `incoming` TEMP tables (kept across transactions)."""
    await conn.execute(_CREATE_STAGING.format(name="pg_temp.staging", key=" PRIMARY KEY"))
    await conn.execute(_CREATE_STAGING.format(name="pg_temp.incoming", key=""))


async def apply_range(
    conn: Conn,
    database: PostgresDatabase,
    local_id: int,
    max_attempts: int,
    window: tuple[int | None, int],
) -> AppliedRange | None:
    """The next range of staged lines, (at most `max_rows`, above `after_task_id`) =
    `window`, applied in the caller's transaction."""
    max_rows, after_task_id = window
    found = await conn.fetchrow(_NEXT_RANGE, after_task_id, max_rows)
    assert found is not None  # an aggregate returns one row
    first, last, count = found
    if not count:
        return None
    found = await conn.fetchrow(
        "SELECT api_batch_id, candidate_for FROM batches WHERE id = $1", local_id
    )
    assert found is not None, local_id  # staged lines name a batch's members
    api_id, intent_id = found
    now = database.now()
    if intent_id is None:
        changed = await conn.fetch(_APPLY_STAGED, local_id, max_attempts, now, first, last)
    else:
        changed = await conn.fetch(_APPLY_HARVESTED, local_id, now, first, last)
    crash_point("harvest_range_applied" if intent_id is not None else "range_applied")
    duplicates = 0
    gone: tuple[str, ...] = ()  # lines of tasks gone since staging, kept unmatched
    if len(changed) < count:
        # Only a line that changed no task can be a duplicate (a task it changed now
        # points at this batch): the common range, every line written, skips the join.
        duplicates = count_of(
            await conn.execute(_KEEP_DUPLICATES, api_id, now, first, last, local_id)
        )
        if duplicates:
            await conn.execute(_COUNT_DUPLICATES, api_id, now, first, last, local_id)
        if len(changed) + duplicates < count:
            left_over = (api_id, now, first, last, local_id)
            no_longer, gone = await kept_lines.keep_left_over_lines(conn, left_over)
            duplicates += no_longer
    requeued = sum(1 for (status,) in changed if status == TaskStatus.PENDING)
    ignored = count - len(changed) - duplicates - len(gone)
    report = WriteReport(len(changed) - requeued, requeued, ignored, gone, duplicates)
    return AppliedRange(last, report)


class LanePool:
    """The write-back lanes of a store, connected at the first write-back, not at open:
    `batchd status` and the other commands never need them."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._lanes: asyncio.Queue[PostgresWriteBackLane] = asyncio.Queue()
        self._all = [PostgresWriteBackLane(database) for _ in range(_WRITE_BACK_LANES)]
        for lane in self._all:
            self._lanes.put_nowait(lane)

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[PostgresWriteBackLane]:
        lane = await self._lanes.get()
        try:
            yield lane
        finally:
            self._lanes.put_nowait(lane)

    async def close(self) -> None:
        for lane in self._all:
            await lane.close()


class WriteBack:
    """Results into tasks, unmatched lines kept, batches finished (part of PostgresStore)."""

    _db: PostgresDatabase
    _lanes: LanePool

    async def write_results(
        self, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        """Stage and apply a few lines of batch `local_id` in one transaction, on a pooled
        connection (its own TEMP tables, emptied before and after)."""
        check_result_types(outcomes)
        return await self._db.transact(_write_results, self._db, local_id, outcomes, max_attempts)

    def write_back_lane(self) -> AbstractAsyncContextManager[PostgresWriteBackLane]:
        """A write-back lane of its own (waits for a free one)."""
        return self._lanes.lane()

    async def yield_to_writers(self, seconds: float) -> None:
        """Nothing to wait for: row locks never block users' INSERTs, and a range's UPDATE
        holds only the rows of its own tasks."""
        self._db.check_open()

    async def keep_unmatched(self, api_batch_id: str, lines: Sequence[KeptLine]) -> None:
        """Keep result lines that matched no task of their batch (never dropped), and
        count the billed ones in the usage ledger, in one transaction."""
        kept = [KeptLine(*line) for line in lines]  # a bare (custom_id, line): not billed
        if kept:
            await self._db.transact(kept_lines.keep_unmatched, api_batch_id, kept, self._db.now())

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
        missing_results, once no candidate of it is still open; at once. `holder`: only
        while its collection lease holds (collecting.py), else refused."""
        return await self._db.transact(
            self._finish_batch, local_id, reason, archived, matched_lines, holder=holder
        )

    async def _finish_batch(
        self,
        conn: Conn,
        local_id: int,
        reason: str,
        archived: bool,
        matched_lines: int | None,
        *,
        holder: str | None = None,
    ) -> FinishReport:
        now = self._db.now()
        # The lease guard (a NULL holder: no lease asked for, as a single caller): a holder
        # whose lease lapsed must not requeue as missing what a new holder is writing.
        found = await conn.fetchrow(
            "UPDATE batches SET state = 'completed', completed_at = $1"
            " WHERE id = $2 AND state = 'ended' AND ($3::text IS NULL"
            "   OR (collector = $3 AND collect_lease_until > now()))"
            " RETURNING candidate_for",
            now,
            local_id,
            holder,
        )
        if found is None:
            still_ended = await conn.fetchval(
                "SELECT state = 'ended' FROM batches WHERE id = $1", local_id
            )
            return FinishReport((), lease_lapsed=holder is not None and bool(still_ended))
        crash_point("batch_completed")
        intent_id = found[0]
        origin = await decide_origin(conn, local_id, matched_lines, now, own=intent_id is None)
        kind = "archived" if archived else "no_line"
        if intent_id is None:
            missing = await settle_intent(conn, local_id, reason, kind, now)
        else:
            # A candidate's end may be the last thing its intent waited for.
            why = "no result line for this request in its batch or any candidate batch"
            missing = await settle_intent(conn, intent_id, why, "no_line", now)
        # In the same transaction: requests that will be sent (and paid for) again are
        # always on record (`batchd status`), even across a kill.
        return FinishReport(missing, origin)


async def _write_results(
    conn: Conn,
    database: PostgresDatabase,
    local_id: int,
    outcomes: Sequence[Outcome],
    max_attempts: int,
) -> WriteReport:
    await create_staging(conn)
    await conn.execute("TRUNCATE pg_temp.staging, pg_temp.incoming")
    rows, unmatched_at, received = await staging_rows(conn, local_id, outcomes, 0)
    await _keep_received(conn, database, local_id, received)
    await conn.copy_records_to_table(
        "incoming", schema_name="pg_temp", records=rows, columns=_COLUMNS
    )
    await conn.execute(_KEEP_FIRST)
    applied = await apply_range(conn, database, local_id, max_attempts, (None, 0))
    await conn.execute("TRUNCATE pg_temp.staging, pg_temp.incoming")
    report = applied.report if applied else WriteReport(0, 0, 0, ())
    written, requeued, duplicates = report.written, report.requeued, report.duplicates
    # A repeated unmatched line counts once, as a repeated matched one does.
    unmatched = tuple(
        dict.fromkeys([*(outcomes[at].custom_id for at in unmatched_at), *report.unmatched])
    )
    ignored = len(outcomes) - written - requeued - duplicates - len(unmatched)
    return WriteReport(written, requeued, ignored, unmatched, duplicates)


async def _keep_received(
    conn: Conn, database: PostgresDatabase, local_id: int, received: Sequence[tuple[str, str]]
) -> None:
    """In the staging transaction: the lines as received of results made storable
    (staging.py), beside the unmatched lines. A copy: the line's usage is counted with its
    task (the ledger's trigger), so not through `kept_lines.keep_unmatched`, which counts
    what it keeps."""
    if not received:
        return
    api_id = await conn.fetchval("SELECT api_batch_id FROM batches WHERE id = $1", local_id)
    now = database.now()
    await conn.executemany(
        "INSERT INTO unmatched_results (api_batch_id, custom_id, line, received_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        [(api_id, custom_id, line, now) for custom_id, line in received],
    )


def check_result_types(outcomes: Iterable[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.result_type not in _RESULT_TYPES:
            raise ValueError(f"unknown result type {outcome.result_type!r}")
