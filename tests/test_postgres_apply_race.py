"""A user's change to a task that commits while the write-back's apply waits for that
task's row lock, on PostgreSQL (review 8, finding 6).

Under READ COMMITTED an UPDATE that waited for a row re-checks its WHERE on the row's new
version (EvalPlanQual), but every other table it reads (batch_tasks in a membership
EXISTS) is still read as its snapshot showed it, before the change. So the guard must be
one PostgreSQL re-checks on the task's row itself. The interleaving is forced, never
timed: the user's transaction holds the row (its trigger has run), the apply is started
on the store's lane, the test waits until the server shows the apply's backend blocked
by the user's (`pg_blocking_pids`), and only then the user commits.

- An edit of the task's params (migration 016's trigger moves its revision on and ends
  its membership): the batch's own apply and a candidate batch's apply both keep the
  old request's answer aside (a duplicate, counted in kept_line_usage) and never write
  it; the task is requeued with its new params when its batch finishes.
- A retry (a new request too) committed while a candidate's apply waits: that apply's
  snapshot saw the task still waiting (`submitted`), the new row version is `pending`
  again, which a candidate's guard accepts; the candidate's old answer must not reach it.
- The same shape outside the write-back: a refused create's release marks a named request
  `invalid` only while it is still the request sent (a member); an edit committed while
  that UPDATE waits leaves the task pending, to be sent with its new params.

SQLite needs none of this: every write takes the database's one write lock (BEGIN
IMMEDIATE), so an apply's membership check and its write see the same committed state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.domain import BatchState, Outcome, Usage
from batchd.store import Store
from batchd.store.postgres.connection import quote_ident
from batchd.store.postgres.operations import retry_in
from batchd.store.values import AppliedRange
from tests.support.backends import Peek
from tests.support.store import START, add_tasks, answer, api_batch, claim

pytestmark = [pytest.mark.fake_clock, pytest.mark.postgres,
              pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)]  # fmt: skip
MAX_ATTEMPTS = 3
EDITED = '{"edited": true}'
USAGE = Usage(input_tokens=100, output_tokens=20)
_BLOCKED_WAIT_S = 10.0
T = TypeVar("T")


def paid(custom_id: str, source: str) -> Outcome:
    """A succeeded (billed) line whose JSON says which batch it came from."""
    return answer(custom_id, source, USAGE)


def as_json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def source_of(peek: Peek, custom_id: str) -> str | None:
    result = peek.task(custom_id)["result"]
    return None if result is None else str(as_json(result)["from"])


def kept_lines(peek: Peek) -> list[tuple[Any, ...]]:
    """(table, API batch, custom_id, where the line came from) of every line kept aside."""
    rows = peek.query(
        "SELECT 'duplicate', api_batch_id, custom_id, line FROM duplicate_results"
        " UNION ALL SELECT 'unmatched', api_batch_id, custom_id, line FROM unmatched_results"
        " ORDER BY 1, 2, 3"
    )
    return [(table, api, cid, as_json(line)["result"]["from"]) for table, api, cid, line in rows]


def counted(peek: Peek) -> list[tuple[Any, ...]]:
    return peek.query("SELECT api_batch_id, custom_id, kept_in FROM kept_line_usage ORDER BY 1, 2")


@pytest.fixture
async def user(database_config: DatabaseConfig) -> AsyncIterator[asyncpg.Connection]:
    """A user's own connection to the store's schema."""
    assert database_config.url is not None
    assert database_config.schema is not None
    conn = await asyncpg.connect(
        database_config.url, server_settings={"search_path": quote_ident(database_config.schema)}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def blocked_by(conn: asyncpg.Connection, holder_pid: int) -> None:
    """Until some backend waits for a lock `holder_pid` holds. pg_locks is read afresh by
    every statement (pg_stat_activity would be the transaction's snapshot of it)."""
    deadline = time.monotonic() + _BLOCKED_WAIT_S
    while not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks"
        " WHERE NOT granted AND $1 = ANY(pg_blocking_pids(pid)))",
        holder_pid,
    ):
        assert time.monotonic() < deadline, "the apply never waited for the user's row lock"
        await asyncio.sleep(0.01)


async def while_held(
    user: asyncpg.Connection,
    change: Callable[[asyncpg.Connection], Awaitable[object]],
    store_call: Callable[[], Awaitable[T]],
) -> T:
    """The user's `change` in an open transaction (its rows locked, its triggers run); then
    `store_call` started, seen blocked on those rows, and the user's commit; its result."""
    transaction = user.transaction()
    await transaction.start()
    try:
        await change(user)
    except BaseException:
        await transaction.rollback()
        raise
    call = asyncio.ensure_future(store_call())
    try:
        await blocked_by(user, user.get_server_pid())
    except BaseException:
        await transaction.commit()  # the call then ends, and is awaited before failing
        await asyncio.gather(call, return_exceptions=True)
        raise
    await transaction.commit()
    return await call


async def applied_while_held(
    store: Store,
    user: asyncpg.Connection,
    local_id: int,
    lines: list[Outcome],
    change: Callable[[asyncpg.Connection], Awaitable[object]],
) -> AppliedRange:
    """Batch `local_id`'s `lines` staged on a lane, then applied while the user's `change`
    holds their rows (`while_held`); the apply's range."""
    async with store.write_back_lane() as lane:
        staged = await lane.stage_results(local_id, lines)
        assert (staged.staged, staged.unmatched) == (len(lines), ())
        applied = await while_held(
            user, change, lambda: lane.apply_staged(local_id, MAX_ATTEMPTS, 100)
        )
        assert applied is not None
        assert await lane.apply_staged(local_id, MAX_ATTEMPTS, 100, applied.last_task_id) is None
    return applied


async def edit_params(user: asyncpg.Connection) -> None:
    await user.execute("UPDATE tasks SET params = $1::jsonb WHERE custom_id = 'a'", EDITED)


async def candidate_of_a_resubmitted_intent(store: Store) -> tuple[int, int, int]:
    """Tasks a and b claimed, the create's outcome unknown (released, watched), sent again
    (`msgbatch_again`, in flight), and the first create's batch found late as a candidate
    (`msgbatch_late`, ended). (intent, resubmitted, candidate) local ids."""
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    resubmitted = await claim(store, "a", "b")
    assert await store.mark_created(resubmitted, api_batch("msgbatch_again"))
    assert await store.record_candidate(intent, api_batch("msgbatch_late", "ended"), "late")
    [late] = [b for b in await store.batches_in(BatchState.ENDED) if b.candidate_for == intent]
    return intent, resubmitted, late.local_id


async def test_an_edit_committed_while_the_own_apply_waits_is_never_written(
    store: Store, peek: Peek, user: asyncpg.Connection
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_1", "ended"))

    lines = [paid("a", "old"), paid("b", "old")]
    applied = await applied_while_held(store, user, intent, lines, edit_params)

    report = applied.report
    assert (report.written, report.requeued, report.duplicates, report.unmatched) == (1, 0, 1, ())
    a = peek.task("a")
    assert (a["status"], a["result"], a["revision"]) == ("submitted", None, 1)
    assert as_json(a["params"]) == orjson.loads(EDITED)
    assert (peek.task("b")["status"], source_of(peek, "b")) == ("succeeded", "old")
    # The old request's answer was paid: kept aside, counted once, never written.
    assert kept_lines(peek) == [("duplicate", "msgbatch_1", "a", "old")]
    assert counted(peek) == [("msgbatch_1", "a", "duplicate")]
    assert peek.query("SELECT sum(requests) FROM usage_ledger") == [(2,)]

    finished = await store.finish_batch(intent, "no line", matched_lines=2)
    assert finished.missing_requeued == ("a",)
    assert [t.custom_id async for t in store.iter_pending()] == ["a"]


async def test_an_edit_committed_while_a_candidates_apply_waits_is_never_written(
    store: Store, peek: Peek, user: asyncpg.Connection
) -> None:
    _, resubmitted, late = await candidate_of_a_resubmitted_intent(store)

    lines = [paid("a", "late"), paid("b", "late")]
    applied = await applied_while_held(store, user, late, lines, edit_params)

    report = applied.report
    assert (report.written, report.duplicates, report.unmatched) == (1, 1, ())
    a = peek.task("a")
    assert (a["status"], a["batch_id"], a["result"]) == ("submitted", resubmitted, None)
    assert as_json(a["params"]) == orjson.loads(EDITED)
    b = peek.task("b")
    assert (b["status"], b["batch_id"], source_of(peek, "b")) == ("succeeded", late, "late")
    assert kept_lines(peek) == [("duplicate", "msgbatch_late", "a", "late")]
    assert counted(peek) == [("msgbatch_late", "a", "duplicate")]
    assert peek.query("SELECT sum(requests) FROM usage_ledger") == [(2,)]


async def test_a_retry_committed_while_a_candidates_apply_waits_is_never_answered(
    store: Store, peek: Peek, user: asyncpg.Connection
) -> None:
    _, resubmitted, late = await candidate_of_a_resubmitted_intent(store)

    async def answered_then_retried(conn: asyncpg.Connection) -> None:
        # The resubmitted batch's answer for a (as its apply writes it), then the user's
        # `batchd retry` of it, the store's own statements: one transaction, so that the
        # row stays locked across both (two commits back to back leave the same rows).
        await conn.execute(
            "UPDATE tasks SET status = 'succeeded', result = '{\"from\": \"again\"}',"
            " completed_at = now() WHERE custom_id = 'a' AND batch_id = $1",
            resubmitted,
        )
        assert await retry_in(conn, ["succeeded"], ["a"]) == 1

    lines = [paid("a", "late"), paid("b", "late")]
    applied = await applied_while_held(store, user, late, lines, answered_then_retried)

    report = applied.report
    assert (report.written, report.duplicates, report.unmatched) == (1, 1, ())
    a = peek.task("a")
    assert (a["status"], a["batch_id"], a["result"], a["attempts"]) == ("pending", None, None, 0)
    assert [t.custom_id async for t in store.iter_pending()] == ["a"]
    assert (peek.task("b")["status"], source_of(peek, "b")) == ("succeeded", "late")
    assert kept_lines(peek) == [("duplicate", "msgbatch_late", "a", "late")]


async def test_an_edit_committed_while_a_refused_create_is_released_is_not_marked_invalid(
    store: Store, peek: Peek, user: asyncpg.Connection
) -> None:
    # The same shape outside the write-back: a create refused naming request a marks it
    # invalid only while it is still the request sent (a member of the intent). An edit
    # that commits while that UPDATE waits for a's row must leave it pending, to be sent
    # with its new params, not invalid for the API's verdict on its old ones.
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    refused = [("a", "requests.0: bad params")]
    await while_held(user, edit_params, lambda: store.release_intent(intent, "refused", refused))
    a = peek.task("a")
    assert (a["status"], a["error"], a["revision"], a["attempts"]) == ("pending", None, 1, 0)
    assert as_json(a["params"]) == orjson.loads(EDITED)
    assert (peek.task("b")["status"], peek.task("b")["attempts"]) == ("pending", 0)
