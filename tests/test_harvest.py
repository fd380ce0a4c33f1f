"""Candidate batches harvested through the store: the guard of every transition.

A candidate (a suspected duplicate) may answer only the tasks of the intent it was found
for, and only while they wait; the first result written wins, any later line is kept as a
duplicate and counted; an intent's tasks are requeued only once nothing may still answer
them; a batch whose lines name none of our tasks is foreign. On both stores (real SQLite
files, a real PostgreSQL schema per test), no mocks.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import orjson
import pytest

from batchd.domain import BatchOrigin, BatchState, Outcome, TaskStatus
from batchd.store import Store
from batchd.store.postgres.connection import PostgresTarget, quote_ident
from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek, PostgresPeek
from tests.support.schema import DROP_ORIGIN_INDEX
from tests.support.store import (
    START,
    FakeClock,
    add_tasks,
    api_batch,
    claim,
    pending_ids,
)

# The store runs on `clock`, at START; every test on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.fake_clock, pytest.mark.both_stores]
MAX_ATTEMPTS = 3


def line(custom_id: str, source: str, result_type: str = "succeeded", **kw: object) -> Outcome:
    """A result line whose JSON says which batch it came from."""
    return Outcome(
        custom_id=custom_id,
        result_type=result_type,
        result_json=orjson.dumps({"type": result_type, "from": source}).decode(),
        error=None if result_type == "succeeded" else f"{result_type} in {source}",
        retryable=bool(kw.get("retryable", False)),
        model="claude-x" if result_type == "succeeded" else None,
    )


def source_of(peek: Peek, custom_id: str) -> str | None:
    result = peek.task(custom_id)["result"]
    return None if result is None else str(orjson.loads(result)["from"])


async def candidate_of(store: Store, intent_id: int, api_id: str) -> int:
    """Record `api_id` as an ended candidate of the intent; its local id."""
    assert await store.record_candidate(intent_id, api_batch(api_id, "ended"), "found late")
    [row] = [b for b in await store.batches_in(BatchState.ENDED) if b.api_batch_id == api_id]
    assert row.candidate_for == intent_id
    return row.local_id


async def released_intent(store: Store, *custom_ids: str) -> int:
    """A create whose outcome stayed unknown and that nothing was found for: released."""
    intent = await claim(store, *custom_ids)
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    return intent


async def test_a_candidate_answers_a_waiting_task_once_and_a_later_line_is_a_duplicate(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await released_intent(store, "a", "b")
    resubmitted = await claim(store, "a", "b")  # the requests sent again
    assert await store.mark_created(resubmitted, api_batch("msgbatch_again", "ended"))
    late = await candidate_of(store, intent, "msgbatch_late")

    report = await store.write_results(late, [line("a", "late"), line("b", "late")], MAX_ATTEMPTS)
    assert (report.written, report.duplicates, report.ignored) == (2, 0, 0)
    assert peek.task("a")["status"] == "succeeded"
    assert peek.task("a")["batch_id"] == late
    assert source_of(peek, "a") == "late"

    # The resubmitted batch's own lines come later: kept, counted, never written over.
    again = await store.write_results(
        resubmitted, [line("a", "again"), line("b", "again")], MAX_ATTEMPTS
    )
    assert (again.written, again.duplicates, again.ignored) == (0, 2, 0)
    assert source_of(peek, "a") == "late"
    kept = peek.query("SELECT api_batch_id, custom_id, line FROM duplicate_results")
    assert sorted(row[1] for row in kept) == ["a", "b"]
    assert {row[0] for row in kept} == {"msgbatch_again"}
    assert orjson.loads(kept[0][2])["result"]["from"] == "again"
    # A re-download of either batch changes nothing and counts nothing twice.
    twice = await store.write_results(late, [line("a", "late")], MAX_ATTEMPTS)
    assert (twice.written, twice.duplicates, twice.ignored) == (0, 0, 1)
    thrice = await store.write_results(resubmitted, [line("a", "again")], MAX_ATTEMPTS)
    assert (thrice.written, thrice.duplicates, thrice.ignored) == (0, 0, 1)
    assert peek.query("SELECT count(*) FROM duplicate_results") == [(2,)]

    # Both batches finish; nothing is missing, nothing requeued.
    assert (await store.finish_batch(resubmitted, "none", matched_lines=2)).missing_requeued == ()
    assert (await store.finish_batch(late, "none", matched_lines=2)).missing_requeued == ()
    [candidate] = await store.candidate_batches()
    assert (candidate.api_batch_id, candidate.state, candidate.origin) == (
        "msgbatch_late", "completed", BatchOrigin.OURS,
    )  # fmt: skip
    assert (candidate.written, candidate.duplicate_lines) == (2, 0)
    attempts = peek.query("SELECT attempts FROM tasks ORDER BY custom_id")
    assert attempts == [(1,), (1,)]  # the released claim gave its attempt back


async def test_a_candidate_withdraws_a_requeued_task_from_the_queue(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await released_intent(store, "a", "b")  # both pending again, not yet sent
    late = await candidate_of(store, intent, "msgbatch_late")
    report = await store.write_results(late, [line("a", "late")], MAX_ATTEMPTS)
    assert report.written == 1
    assert peek.task("a")["status"] == "succeeded"
    assert [t.custom_id async for t in store.iter_pending()] == ["b"]
    # A chunk built before the withdrawal cannot claim it any more: the claim rolls back.
    assert await store.record_intent(await pending_ids(store, ["b"]) + [1], 10) is None
    assert peek.task("a")["status"] == "succeeded"


async def test_a_candidate_never_answers_a_task_outside_its_intent(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b", "other")
    intent = await released_intent(store, "a", "b")
    elsewhere = await claim(store, "other")  # a task of ours, waiting, not in the intent
    late = await candidate_of(store, intent, "msgbatch_late")
    report = await store.write_results(
        late, [line("a", "late"), line("other", "late")], MAX_ATTEMPTS
    )
    assert report.written == 1
    assert report.unmatched == ("other",)
    assert peek.task("other")["status"] == "submitted"
    assert peek.task("other")["batch_id"] == elsewhere
    assert source_of(peek, "other") is None


async def test_a_candidate_line_that_does_not_end_the_task_leaves_it_to_its_course(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b", "c")
    intent = await released_intent(store, "a", "b", "c")
    await claim(store, "a", "b", "c")
    late = await candidate_of(store, intent, "msgbatch_late")
    report = await store.write_results(
        late,
        [
            line("a", "late", "errored", retryable=True),
            line("b", "late", "expired", retryable=True),
            line("c", "late", "errored", retryable=False),
        ],
        MAX_ATTEMPTS,
    )
    assert (report.written, report.requeued, report.ignored) == (1, 0, 2)
    assert [peek.task(cid)["status"] for cid in "abc"] == ["submitted", "submitted", "errored"]


async def test_an_intent_is_settled_only_when_its_batch_and_every_candidate_were_read(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    adopted = api_batch("msgbatch_adopted", "ended")
    assert await store.mark_created(intent, adopted, [api_batch("msgbatch_other", "ended")])
    [candidate] = [b for b in await store.batches_in(BatchState.ENDED) if b.candidate_for]
    # The adopted batch held only "a": "b" must wait for the candidate, not be sent again.
    await store.write_results(intent, [line("a", "adopted")], MAX_ATTEMPTS)
    early = await store.finish_batch(intent, "no line", matched_lines=1)
    assert early.missing_requeued == ()
    assert peek.task("b")["status"] == "submitted"

    await store.write_results(candidate.local_id, [], MAX_ATTEMPTS)
    done = await store.finish_batch(candidate.local_id, "no line", matched_lines=0)
    assert done.missing_requeued == ("b",)
    assert peek.task("b")["status"] == "pending"
    assert peek.query("SELECT api_batch_id, custom_id, reason FROM missing_results") == [
        ("msgbatch_adopted", "b", "no_line")
    ]


@pytest.mark.postgres
async def test_an_intent_finishing_while_its_last_candidate_finishes_is_settled_on_postgresql(
    postgres_dsn: str, postgres_schema: str, clock: FakeClock
) -> None:
    # Two connections at once (SQLite has one writer): the intent's finish has completed
    # its row, not yet committed, when its last candidate finishes. Each would see the
    # other still open and neither settle; the candidate's settle waits for the intent.
    store = await PostgresStore.open(PostgresTarget(postgres_dsn, postgres_schema), clock=clock)
    try:
        await add_tasks(store, "a", "b")
        intent = await claim(store, "a", "b")
        adopted = api_batch("msgbatch_adopted", "ended")
        assert await store.mark_created(intent, adopted, [api_batch("msgbatch_other", "ended")])
        [candidate] = [b for b in await store.batches_in(BatchState.ENDED) if b.candidate_for]
        await store.write_results(intent, [line("a", "adopted")], MAX_ATTEMPTS)
        conn = await asyncpg.connect(
            postgres_dsn, server_settings={"search_path": quote_ident(postgres_schema)}
        )
        try:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE batches SET state = 'completed', completed_at = now() WHERE id = $1",
                    intent,
                )
                finishing = asyncio.create_task(
                    store.finish_batch(candidate.local_id, "no line", matched_lines=0)
                )
                await asyncio.sleep(0.5)
                assert not finishing.done()  # it waits for the intent's row
            done = await asyncio.wait_for(finishing, 10)
        finally:
            await conn.close()
        assert done.missing_requeued == ("b",)
        assert [t.custom_id async for t in store.iter_pending()] == ["b"]
    finally:
        await store.close()


async def test_a_lost_candidate_settles_its_intent(store: Store, peek: Peek) -> None:
    await add_tasks(store, "a")
    intent = await claim(store, "a")
    assert await store.mark_created(
        intent, api_batch("msgbatch_1", "ended"), [api_batch("msgbatch_2")]
    )
    assert (await store.finish_batch(intent, "no line", matched_lines=0)).missing_requeued == ()
    [candidate] = await store.batches_in(BatchState.IN_PROGRESS)
    assert await store.mark_lost(candidate.local_id, "404") == 1
    assert peek.task("a")["status"] == "pending"


async def test_an_adopted_batch_whose_lines_name_no_task_of_ours_is_foreign(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_theirs", "ended"))
    report = await store.write_results(
        intent, [line("x-1", "theirs"), line("x-2", "theirs")], MAX_ATTEMPTS
    )
    assert report.unmatched == ("x-1", "x-2")
    await store.keep_unmatched("msgbatch_theirs", [("x-1", "{}"), ("x-2", "{}")])
    finished = await store.finish_batch(intent, "no line", matched_lines=0)

    assert finished.origin == BatchOrigin.FOREIGN
    assert finished.missing_requeued == ("a", "b")
    assert peek.query("SELECT count(*) FROM unmatched_results") == [(0,)]  # only counted
    assert peek.query("SELECT origin, foreign_lines FROM batches") == [("foreign", 2)]
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]  # never ours
    assert "another client's" in peek.task("a")["error"]
    assert peek.task("a")["attempts"] == 0  # as released: nothing of ours was sent
    evidence = await store.shared_key_evidence()
    assert (evidence.batches, evidence.proven_foreign) == (1, 1)


async def test_a_batch_naming_a_task_of_ours_outside_its_intent_is_partly_ours_and_keeps_it(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b", "other")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_mixed", "ended"))
    await store.write_results(intent, [line("a", "mixed"), line("b", "mixed")], MAX_ATTEMPTS)
    await store.keep_unmatched("msgbatch_mixed", [("other", "{}")])
    finished = await store.finish_batch(intent, "no line", matched_lines=2)
    assert finished.origin == BatchOrigin.PARTLY_OURS
    assert peek.query("SELECT custom_id FROM unmatched_results") == [("other",)]
    assert peek.task("other")["status"] == "pending"


async def test_a_candidate_is_recorded_once_and_watched_intents_expire(
    store: Store, clock: FakeClock
) -> None:
    await add_tasks(store, "a")
    intent = await released_intent(store, "a")
    assert [b.local_id for b in await store.watched_intents(START.replace(year=2025))] == [intent]
    assert await store.watched_intents(START) == []  # watch_until is not after START
    assert await store.record_candidate(intent, api_batch("msgbatch_late"), "late")
    assert not await store.record_candidate(intent, api_batch("msgbatch_late"), "again")
    assert "msgbatch_late" in await store.known_api_batch_ids()
    [(api_id, _, note)] = await store.duplicate_batches()
    assert (api_id, note) == ("msgbatch_late", "late")


@pytest.mark.sqlite_only  # SQLite's own migration 006 (the PostgreSQL one: below)
async def test_duplicates_recorded_before_schema_6_are_read_after_the_upgrade(
    db_path: Path, clock: FakeClock
) -> None:
    store = await SqliteStore.open(db_path, clock=clock)
    try:
        intent = await _adopted_intent(store)
    finally:
        await store.close()
    # As a v5 batchd left it: the duplicate only reported, no row to read it from.
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = 6")
        for statement in _UNDO_SCHEMA_6:
            conn.execute(statement)
        conn.execute(_OLD_DUPLICATE, (intent,))
    conn.close()
    store = await SqliteStore.open(db_path, clock=clock)
    try:
        await _read_after_the_upgrade(store, intent)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_duplicates_recorded_before_schema_6_are_read_after_the_postgresql_upgrade(
    postgres_dsn: str, postgres_schema: str, clock: FakeClock
) -> None:
    target = PostgresTarget(postgres_dsn, postgres_schema)
    store = await PostgresStore.open(target, clock=clock)
    try:
        intent = await _adopted_intent(store)
    finally:
        await store.close()
    # As a v5 batchd left it (migrations/postgresql/006_harvest.sql undone).
    peek = PostgresPeek(postgres_dsn, postgres_schema)
    peek.execute("DELETE FROM schema_migrations WHERE version = 6")
    for statement in _UNDO_SCHEMA_6:
        peek.execute(statement)
    peek.execute(_OLD_DUPLICATE, intent)
    store = await PostgresStore.open(target, clock=clock)
    try:
        await _read_after_the_upgrade(store, intent)
    finally:
        await store.close()


_UNDO_SCHEMA_6 = (
    DROP_ORIGIN_INDEX,  # only 006 is applied again: its reads need no index of 010
    "DROP INDEX batches_by_candidate_for",
    "DROP TABLE duplicate_results",
    "DROP TABLE foreign_batches",
    "ALTER TABLE duplicate_batches DROP COLUMN harvest_id",
    "ALTER TABLE batches DROP COLUMN watch_until",
    "ALTER TABLE batches DROP COLUMN foreign_lines",
    "ALTER TABLE batches DROP COLUMN origin",
    "ALTER TABLE batches DROP COLUMN candidate_for",
)
_OLD_DUPLICATE = (
    "INSERT INTO duplicate_batches (api_batch_id, local_id, detected_at, note)"
    " VALUES ('msgbatch_old_dup', ?, '2026-11-24T15:40:37.123Z', 'old')"
)


async def _adopted_intent(store: Store) -> int:
    await add_tasks(store, "a")
    intent = await claim(store, "a")
    assert await store.mark_created(intent, api_batch("msgbatch_1"))
    return intent


async def _read_after_the_upgrade(store: Store, intent: int) -> None:
    [candidate] = await store.candidate_batches()
    assert (candidate.api_batch_id, candidate.state) == ("msgbatch_old_dup", "in_progress")
    assert candidate.intent_id == intent
    assert candidate.detected_at == "2026-11-24T15:40:37.123Z"
    rows = await store.batches_in(BatchState.IN_PROGRESS)
    assert [(b.api_batch_id, b.candidate_for) for b in rows] == [
        ("msgbatch_1", None), ("msgbatch_old_dup", intent),
    ]  # fmt: skip
    assert (await store.status_counts())[TaskStatus.SUBMITTED] == 1


async def test_pruning_keeps_a_candidate_and_its_intent_on_record(
    store: Store, peek: Peek, clock: FakeClock
) -> None:
    await add_tasks(store, "a")
    intent = await claim(store, "a")
    assert await store.mark_created(
        intent, api_batch("msgbatch_1", "ended"), [api_batch("msgbatch_2", "ended")]
    )
    [candidate] = [b for b in await store.batches_in(BatchState.ENDED) if b.candidate_for]
    await store.write_results(candidate.local_id, [line("a", "two")], MAX_ATTEMPTS)
    await store.finish_batch(candidate.local_id, "none", matched_lines=1)
    await store.finish_batch(intent, "none", matched_lines=0)
    [(task_id,)] = peek.query("SELECT id FROM tasks")
    assert await store.accounts.delete_tasks([task_id], START.replace(year=2030)) == 1

    forgotten = await store.accounts.forget_empty_batches()
    assert forgotten.batches == 0  # both named by the duplicate report
    [report] = await store.candidate_batches()
    assert (report.api_batch_id, report.state, report.intent_id) == (
        "msgbatch_2", "completed", intent,
    )  # fmt: skip
