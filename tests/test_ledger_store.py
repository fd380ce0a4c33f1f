"""Money paid is money recorded: every billed result line reaches the usage ledger once.

The API bills succeeded lines only (spec §5: errored, canceled and expired requests are
not billed). A succeeded line written to a task is counted by the tasks trigger (migration
003); one kept in `duplicate_results` (another batch answered first) or in
`unmatched_results` (no task of its batch: a task the user deleted, a stray custom_id) is
counted as it is kept, in the same transaction, and a line kept twice (a re-download)
counts once. A foreign batch's lines (another client's) are dropped, and leave the ledger
with them. A batch whose tasks the user DELETEd while it was in flight is ours, not
foreign. On both stores (real SQLite files, a real PostgreSQL schema per test), no mocks.
"""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from batchd.config import Config, DatabaseConfig
from batchd.domain import BatchOrigin, BatchState, Outcome, Usage
from batchd.money.spending import usage_status
from batchd.store import KeptLine, Store, open_store
from batchd.store.postgres.migrations import shipped_migrations as postgres_migrations
from batchd.store.sqlite import SqliteStore
from batchd.store.sqlite.migrations import shipped_migrations as sqlite_migrations
from tests.support.backends import Peek
from tests.support.schema import (
    UNDO_KEPT_LINE_USAGE,
    UNDO_TASK_REVISION,
    UNDO_TASK_REVISION_POSTGRESQL,
)
from tests.support.store import START, add_tasks, api_batch, claim

pytestmark = [pytest.mark.fake_clock, pytest.mark.both_stores]
MAX_ATTEMPTS = 3
USAGE = Usage(input_tokens=100, output_tokens=20, cache_creation_input_tokens=3,
              cache_read_input_tokens=7)  # fmt: skip
MESSAGE = {"model": "claude-x", "usage": {"input_tokens": 100, "output_tokens": 20,
           "cache_creation_input_tokens": 3, "cache_read_input_tokens": 7}}  # fmt: skip


def paid(custom_id: str, source: str) -> Outcome:
    """A succeeded (billed) line whose JSON says which batch it came from."""
    return Outcome(
        custom_id=custom_id,
        result_type="succeeded",
        result_json=orjson.dumps(
            {"type": "succeeded", "from": source, "message": MESSAGE}
        ).decode(),
        error=None,
        retryable=False,
        usage=USAGE,
        model="claude-x",
    )


def kept(outcome: Outcome) -> KeptLine:
    """An unmatched line as the collector keeps it (the `result` text spliced in)."""
    line = (
        f'{{"custom_id":{orjson.dumps(outcome.custom_id).decode()},"result":{outcome.result_json}}}'
    )
    return KeptLine.of(outcome, line)


def ledger(peek: Peek) -> tuple[int, int, int, int, int]:
    """(requests, input, output, cache-write, cache-read) summed over the whole ledger."""
    [row] = peek.query(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(input_tokens), 0),"
        " coalesce(sum(output_tokens), 0), coalesce(sum(cache_creation_input_tokens), 0),"
        " coalesce(sum(cache_read_input_tokens), 0) FROM usage_ledger"
    )
    return tuple(int(value) for value in row)  # type: ignore[return-value]


def times(requests: int) -> tuple[int, int, int, int, int]:
    return (requests, 100 * requests, 20 * requests, 3 * requests, 7 * requests)


async def test_a_duplicate_line_is_counted_once_even_when_downloaded_again(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    await store.release_intent(intent, "outcome unknown, nothing found", watch_until=START)
    again = await claim(store, "a", "b")  # the requests sent again
    assert await store.mark_created(again, api_batch("msgbatch_again", "ended"))
    assert await store.record_candidate(intent, api_batch("msgbatch_late", "ended"), "late")
    [late] = [
        b.local_id
        for b in await store.batches_in(BatchState.ENDED)
        if b.api_batch_id == "msgbatch_late"
    ]

    first = await store.write_results(late, [paid("a", "late"), paid("b", "late")], MAX_ATTEMPTS)
    assert first.written == 2
    assert ledger(peek) == times(2)
    # The resubmission's lines: paid too, kept as duplicates, and counted.
    report = await store.write_results(
        again, [paid("a", "again"), paid("b", "again")], MAX_ATTEMPTS
    )
    assert report.duplicates == 2
    assert ledger(peek) == times(4)
    # Downloaded again (a crash before the finish): kept once, counted once.
    await store.write_results(again, [paid("a", "again"), paid("b", "again")], MAX_ATTEMPTS)
    await store.write_results(late, [paid("a", "late")], MAX_ATTEMPTS)
    assert peek.query("SELECT count(*) FROM duplicate_results") == [(2,)]
    assert ledger(peek) == times(4)
    kept = {
        kind: await store.accounts.kept_usage_by_model(kind) for kind in ("duplicate", "unmatched")
    }
    assert {kind: [(u.model, u.requests) for u in rows] for kind, rows in kept.items()} == {
        "duplicate": [("claude-x", 2)],
        "unmatched": [],
    }


async def test_an_unmatched_paid_line_is_counted_once_and_an_unpaid_one_not_at_all(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a")
    intent = await claim(store, "a")
    assert await store.mark_created(intent, api_batch("msgbatch_1", "ended"))
    errored = Outcome("zz", "errored", '{"type": "errored"}', "boom", retryable=True)
    lines = [kept(paid("stray", "1")), kept(errored), KeptLine("malformed-line-3", "{")]
    await store.keep_unmatched("msgbatch_1", lines)
    await store.keep_unmatched("msgbatch_1", lines[:1])  # downloaded again
    assert peek.query("SELECT count(*) FROM unmatched_results") == [(3,)]
    assert ledger(peek) == times(1)
    day = peek.query("SELECT day FROM usage_ledger")
    assert [str(d)[:10] for (d,) in day] == [START.date().isoformat()]


async def test_a_foreign_batchs_dropped_lines_leave_the_ledger_with_them(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_theirs", "ended"))
    await store.keep_unmatched("msgbatch_theirs", [kept(paid("x-1", "t")), kept(paid("x-2", "t"))])
    assert ledger(peek) == times(2)
    finished = await store.finish_batch(intent, "no line", matched_lines=0)
    assert finished.origin == BatchOrigin.FOREIGN
    # Another client's requests: not ours to pay, nothing left in the ledger.
    assert ledger(peek) == times(0)
    assert peek.query("SELECT count(*) FROM usage_ledger") == [(0,)]


async def test_a_batch_whose_tasks_were_all_deleted_in_flight_is_ours_not_foreign(
    store: Store, peek: Peek
) -> None:
    await add_tasks(store, "a", "b", "other")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_ours", "ended"))
    peek.execute("DELETE FROM tasks WHERE custom_id IN ('a', 'b')")  # the user's DELETE
    report = await store.write_results(intent, [paid("a", "ours"), paid("b", "ours")], MAX_ATTEMPTS)
    assert report.unmatched == ("a", "b")
    await store.keep_unmatched("msgbatch_ours", [kept(paid("a", "ours")), kept(paid("b", "ours"))])
    finished = await store.finish_batch(intent, "no line", matched_lines=0)

    assert finished.origin != BatchOrigin.FOREIGN
    assert finished.missing_requeued == ()
    assert peek.query("SELECT count(*) FROM foreign_batches") == [(0,)]
    assert peek.query("SELECT foreign_lines FROM batches") == [(0,)]
    assert sorted(peek.query("SELECT custom_id FROM unmatched_results")) == [("a",), ("b",)]
    evidence = await store.shared_key_evidence()
    assert (evidence.batches, evidence.proven_foreign) == (0, 0)
    assert ledger(peek) == times(2)  # paid, and counted
    assert peek.task("other")["status"] == "pending"  # never in it, untouched


async def test_a_batch_with_some_members_alive_and_no_line_of_theirs_is_still_foreign(
    store: Store, peek: Peek
) -> None:
    # Deleting one task does not excuse a batch whose lines name none of the others.
    await add_tasks(store, "a", "b")
    intent = await claim(store, "a", "b")
    assert await store.mark_created(intent, api_batch("msgbatch_theirs", "ended"))
    peek.execute("DELETE FROM tasks WHERE custom_id = 'a'")
    await store.keep_unmatched("msgbatch_theirs", [kept(paid("x-1", "t")), kept(paid("x-2", "t"))])
    finished = await store.finish_batch(intent, "no line", matched_lines=0)
    assert finished.origin == BatchOrigin.FOREIGN
    assert finished.missing_requeued == ("b",)
    assert ledger(peek) == times(0)


async def test_billed_lines_kept_by_an_older_batchd_are_counted_once_by_the_upgrade(
    database_config: DatabaseConfig, peek: Peek
) -> None:
    store = await open_store(database_config)
    try:
        await add_tasks(store, "a", "b")
        intent = await claim(store, "a", "b")
        assert await store.mark_created(intent, api_batch("msgbatch_1", "ended"))
        errored = Outcome("zz", "errored", '{"type": "errored"}', "boom", retryable=True)
        lines = [kept(paid("x-1", "1")), kept(paid("x-2", "1")), kept(errored)]
        await store.keep_unmatched("msgbatch_1", [*lines, KeptLine("malformed-line-9", "{")])
    finally:
        await store.close()
    # As a batchd before migration 015 left it: the lines kept, none of them counted.
    undo_from_015(peek, database_config)
    peek.execute("DELETE FROM usage_ledger")
    # A billed line holding the escape \u0000, as an older batchd kept one (both tables):
    # PostgreSQL cannot read any field of it as text, so its upgrade leaves it out rather
    # than stop; SQLite reads and counts it.
    nul_line = kept(paid("x-nul", "1")).line.replace('"from":"1"', '"from":"1\\u0000"')
    assert "\\u0000" in nul_line
    for table in ("unmatched_results", "duplicate_results"):
        peek.execute(
            f"INSERT INTO {table} (api_batch_id, custom_id, line, received_at)"
            " VALUES ('msgbatch_old', 'x-nul', ?, '2026-11-24T15:40:37.123Z')",
            nul_line,
        )
    for _ in range(2):  # the upgrade, then an open that has nothing left to apply
        upgraded = await open_store(database_config)
        await upgraded.close()
    # One line of one API batch, though kept in both tables: counted once, where it can be.
    nul_line_counted = 1 if database_config.url is None else 0
    assert ledger(peek) == times(2 + nul_line_counted)
    assert peek.query("SELECT count(*) FROM unmatched_results") == [(5,)]


async def test_status_reads_a_schema_before_015_without_the_kept_share(
    database_config: DatabaseConfig, peek: Peek
) -> None:
    await (await open_store(database_config)).close()
    undo_from_015(peek, database_config)
    store = await open_store(database_config, read_only=True)
    try:
        usage = await usage_status(store.accounts, Config())
    finally:
        await store.close()
    assert (usage["requests"], usage["kept_aside"]) == (0, None)


def undo_from_015(peek: Peek, database: DatabaseConfig) -> None:
    """The schema as a batchd before migration 015 left it (the migrations after it undone
    too: a store applies only those past the newest it finds)."""
    shipped = sqlite_migrations() if database.url is None else postgres_migrations()
    [version] = [m.version for m in shipped if m.name == "kept_line_usage"]
    assert [m.name for m in shipped if m.version > version] == ["task_revision"]
    revision = UNDO_TASK_REVISION if database.url is None else UNDO_TASK_REVISION_POSTGRESQL
    for statement in (*revision, *UNDO_KEPT_LINE_USAGE):
        peek.execute(statement)
    peek.execute("DELETE FROM schema_migrations WHERE version >= ?", version)


async def test_a_billed_line_whose_model_holds_a_nul_is_kept_and_counted(
    store: Store, peek: Peek
) -> None:
    # PostgreSQL's text refuses a NUL: kept as the text \u0000 there, as every other text
    # the API sends (docs/postgresql.md), never a write-back failing each cycle.
    line = dataclasses.replace(paid("x-1", "1"), model="claude\x00x")
    await store.keep_unmatched("msgbatch_1", [kept(line)])
    assert ledger(peek) == times(1)
    [(model,)] = peek.query("SELECT model FROM kept_line_usage")
    assert model in ("claude\x00x", "claude\\u0000x")
    assert (model == "claude\x00x") == isinstance(store, SqliteStore)
