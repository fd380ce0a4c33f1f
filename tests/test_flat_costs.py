"""Costs that must not grow with history or queue depth (issue 16), held by behaviour (on
both stores) and by SQLite's query plans (`sqlite_only`): kept counts stay right whoever
writes, exports and prune page by key without missing or repeating a row, and no paging
query reads rows of other statuses.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from batchd.cli import prune as prune_module
from batchd.config import Config
from batchd.domain import FINAL_TASK_STATUSES, TaskStatus
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.daemon import run_daemon
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek, SqlitePeek
from tests.support.params import request_params
from tests.support.plans import sqlite_plans, sqlite_statements
from tests.support.store import (
    add_tasks,
    api_batch,
    claim,
    outcome,
    pending_ids,
    submitted_batch,
)

pytestmark = pytest.mark.both_stores

PARAMS = '{"model": "claude-x", "max_tokens": 16, "messages": []}'
# A user's statement refused whole (a repeated custom_id, a status the CHECK refuses).
REFUSED = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


def counted(peek: Peek) -> dict[str, int]:
    """What the triggers kept, and what a full count says: asserted equal by callers."""
    kept = {status: int(n) for status, n in peek.query("SELECT status, tasks FROM task_counts")}
    actual = {
        status: int(n)
        for status, n in peek.query("SELECT status, count(*) FROM tasks GROUP BY status")
    }
    assert kept == {str(s): actual.get(str(s), 0) for s in TaskStatus}, (kept, actual)
    return kept


async def assert_counts_right(store: Store, peek: Peek) -> None:
    kept = counted(peek)
    assert {str(s): n for s, n in (await store.status_counts()).items()} == kept
    for status in TaskStatus:
        assert await store.has_tasks(status) == (kept[str(status)] > 0), status


def user_writes(peek: Peek, *statements: str) -> None:
    """A user's statements, each in a transaction of its own, on either store."""
    for statement in statements:
        peek.execute(statement)


def user_sql(db_path: Path, *statements: str) -> None:
    with sqlite3.connect(db_path, timeout=5) as conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


# -- kept counts ------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_counts_of_an_existing_database_are_taken_by_the_migration(tmp_path: Path) -> None:
    """A database of an older batchd: its tasks are counted when 007 is applied (SQLite:
    PostgreSQL's 007 counts in the same statements, run by its migration tests)."""
    path = tmp_path / "old.db"
    store = await SqliteStore.open(path)
    await add_tasks(store, "a", "b", "c")
    await store.close()
    user_sql(
        path,
        "DROP TRIGGER task_counts_insert",
        "DROP TRIGGER task_counts_delete",
        "DROP TRIGGER task_counts_update",
        "DROP TABLE task_counts",
        "DROP TRIGGER tasks_deleted_batches",
        "DROP TABLE batches_to_check",
        "DROP INDEX batch_tasks_by_task",
        "DELETE FROM schema_migrations WHERE version = 7",
        "UPDATE tasks SET status = 'invalid' WHERE custom_id = 'c'",
    )
    store = await SqliteStore.open(path)
    try:
        counts = await store.status_counts()
        assert (counts[TaskStatus.PENDING], counts[TaskStatus.INVALID]) == (2, 1)
        await assert_counts_right(store, SqlitePeek(path))
    finally:
        await store.close()


async def test_counts_stay_right_under_users_inserts_updates_and_deletes(
    store: Store, peek: Peek, store_backend: str
) -> None:
    await add_tasks(store, "a", "b", "c")
    # A repeated custom_id ignored, one inserted: only the new one counts.
    ignoring = (
        f"INSERT OR IGNORE INTO tasks (custom_id, params) VALUES ('a', '{PARAMS}'), ('u3', 'x')"
        if store_backend == "sqlite"
        else f"INSERT INTO tasks (custom_id, params) VALUES ('a', '{PARAMS}'), ('u3', '\"x\"')"
        " ON CONFLICT DO NOTHING"
    )
    user_writes(
        peek,
        f"INSERT INTO tasks (custom_id, params) VALUES ('u1', '{PARAMS}'), ('u2', '{PARAMS}')",
        ignoring,
        # An upsert that changes the status of an existing row instead of inserting.
        "INSERT INTO tasks (custom_id, params) VALUES ('b', '{}')"
        " ON CONFLICT (custom_id) DO UPDATE SET status = 'canceled'",
        "INSERT INTO tasks (custom_id, params) VALUES ('c', '{}') ON CONFLICT DO NOTHING",
        "UPDATE tasks SET status = 'invalid', error = 'mine' WHERE custom_id = 'u1'",
        "UPDATE tasks SET error = 'no status change' WHERE custom_id = 'u2'",
        "UPDATE tasks SET status = status WHERE custom_id = 'u2'",
        "DELETE FROM tasks WHERE custom_id IN ('a', 'u3')",
    )
    await assert_counts_right(store, peek)
    with pytest.raises(REFUSED):  # refused whole: nothing counted
        user_writes(peek, "INSERT INTO tasks (custom_id, params) VALUES ('z', '{}'), ('b', '{}')")
    with pytest.raises(REFUSED):
        user_writes(peek, "UPDATE tasks SET status = 'nonsense' WHERE custom_id = 'c'")
    await assert_counts_right(store, peek)
    assert (await store.status_counts())[TaskStatus.PENDING] == 2  # c and u2


@pytest.mark.sqlite_only
async def test_a_replace_counts_right_on_a_connection_with_recursive_triggers(
    store: Store, db_path: Path, peek: Peek
) -> None:
    """SQLite fires the DELETE trigger of a row REPLACE removes only with this pragma
    (the limit named in migration 007 and README); with it, the counts stay right."""
    await add_tasks(store, "a", "b")
    user_sql(
        db_path,
        "PRAGMA recursive_triggers = ON",
        "UPDATE tasks SET status = 'errored' WHERE custom_id = 'a'",
        "INSERT OR REPLACE INTO tasks (custom_id, params) VALUES ('a', '{}')",
    )
    await assert_counts_right(store, peek)


async def test_counts_stay_right_through_every_transition_of_the_store(
    store: Store, peek: Peek
) -> None:
    ids = [f"t{n}" for n in range(12)]
    await add_tasks(store, *ids)
    [bad] = await pending_ids(store, ["t11"])
    assert await store.mark_invalid([(bad, "refused by the chunker")]) == 1
    await assert_counts_right(store, peek)
    # A refused create: one named invalid, one the user canceled meanwhile, the rest back.
    local_id = await claim(store, "t0", "t1", "t2")
    await store.request_cancel(["t2"])
    await store.release_intent(local_id, "refused", [("t1", "bad request")])
    await assert_counts_right(store, peek)
    # Results of every kind, a retry among them; the missing one requeued at the finish.
    local_id = await submitted_batch(store, "msgbatch_1", *[f"x{n}" for n in range(5)])
    await store.request_cancel(["x4", "t3"])  # flagged while submitted, and one pending
    report = await store.write_results(
        local_id,
        [
            outcome("x0"),
            outcome("x1", "errored", error="bad", retryable=False),
            outcome("x2", "errored", error="overloaded", retryable=True),
            outcome("x3", "expired"),
        ],
        max_attempts=3,
    )
    assert (report.written, report.requeued) == (3, 1)
    await assert_counts_right(store, peek)
    await store.finish_batch(local_id, "no line")
    await assert_counts_right(store, peek)
    # A lost batch requeues its tasks; retry and the prune's delete change finals.
    local_id = await claim(store, "t4", "t5")
    assert await store.mark_created(local_id, api_batch("msgbatch_2"))
    assert await store.mark_lost(local_id, "gone") == 2
    await assert_counts_right(store, peek)
    assert await store.retry_tasks([TaskStatus.ERRORED]) == 1
    await assert_counts_right(store, peek)
    finals = sorted(FINAL_TASK_STATUSES)
    future = datetime.now(UTC) + timedelta(days=1)
    [doomed] = [page async for page in store.accounts.iter_prunable_ids(future, page_size=100)]
    assert await store.accounts.delete_tasks(doomed, future) == len(doomed)
    await assert_counts_right(store, peek)
    assert not any([(await store.status_counts())[TaskStatus(s)] for s in finals])


async def test_counts_match_a_full_count_after_a_mixed_daemon_run_with_user_writes(
    store: Store, daemon_config: Callable[..., Config], peek: Peek, store_backend: str
) -> None:
    """Errors, retries, expiries, invalid rows and user cancels from the daemon; INSERTs,
    UPDATEs and DELETEs from a user's connection while it runs."""
    faults = FaultConfig(error_rate=0.3, retryable_error_share=0.5, expire_rate=0.1)
    fake_config = FakeApiConfig(
        processing_seconds=0.2, seed=3, faults=faults, models=("claude-haiku-4-5-20251001",)
    )
    await store.enqueue((f"t-{n}", request_params(f"question {n}")) for n in range(200))
    # PostgreSQL's params are jsonb: a row that is JSON but no request is its invalid one.
    bad = "{oops" if store_backend == "sqlite" else '{"oops": true}'
    await store.enqueue([("not-a-request", bad), ("cancel-me", request_params("late"))])
    await store.request_cancel(["cancel-me"])

    async def concurrent_writes() -> None:
        for n in range(20):
            params = request_params(f"user {n}")
            await asyncio.to_thread(
                user_writes,
                peek,
                f"INSERT INTO tasks (custom_id, params) VALUES ('u-{n}', '{params}')",
                f"DELETE FROM tasks WHERE custom_id = 't-{n}' AND status <> 'submitted'",
                f"UPDATE tasks SET status = 'canceled' WHERE custom_id = 't-{50 + n}'"
                " AND status = 'pending'",
            )
            await asyncio.sleep(0.02)

    async with FakeApiServer(fake_config) as fake:
        config = daemon_config(fake.base_url, max_requests=50, max_attempts=3)
        daemon = asyncio.create_task(run_daemon(config, "k", exit_when_idle=True))
        await concurrent_writes()
        assert await asyncio.wait_for(daemon, 60) == 0
    kept = counted(peek)
    assert kept["pending"] == kept["submitted"] == 0
    assert kept["invalid"] >= 1
    assert kept["canceled"] >= 1
    assert kept["succeeded"] > 0
    await assert_counts_right(store, peek)


# -- pages by key -----------------------------------------------------------------------------


async def test_results_export_pages_across_statuses_without_missing_or_repeating(
    store: Store, peek: Peek
) -> None:
    """Statuses interleaved by id, pending rows between them, pages of 3."""
    ids = [f"r{n:02d}" for n in range(40)]
    await add_tasks(store, *ids)
    kinds = ["succeeded", "errored", "pending", "expired", "canceled"]
    by_status: dict[str, list[str]] = {kind: [] for kind in kinds}
    updates = []
    for n, custom_id in enumerate(ids):
        kind = kinds[(n * 7) % len(kinds)]
        by_status[kind].append(custom_id)
        if kind != "pending":
            result = f'{{"type": "{kind}", "n": {n}}}'
            updates.append((kind, result if n % 9 else None, custom_id))  # a few without
    peek.execute_each("UPDATE tasks SET status = ?, result = ? WHERE custom_id = ?", updates)
    asked = [TaskStatus.SUCCEEDED, TaskStatus.ERRORED, TaskStatus.CANCELED]
    lines = [line async for line in store.iter_result_lines(asked, page_size=3)]
    expected = [
        (custom_id, f'{{"type": "{kind}", "n": {n}}}')
        for n, custom_id in enumerate(ids)
        if (kind := kinds[(n * 7) % len(kinds)]) in asked and n % 9
    ]
    # As JSON values: PostgreSQL keeps results as jsonb (its own key order).
    got = [(line.custom_id, orjson.loads(line.result_json)) for line in lines]
    assert got == [(custom_id, orjson.loads(result)) for custom_id, result in expected]
    assert len(expected) > 9  # several pages, each status present
    assert [line async for line in store.iter_result_lines([], page_size=3)] == []


async def test_prune_pages_by_key_exporting_every_old_final_task_once(
    store: Store, peek: Peek, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prune_module, "_PAGE", 4)
    ids = [f"p{n:02d}" for n in range(30)]
    await add_tasks(store, *ids)
    finals = ["succeeded", "errored", "expired", "canceled", "invalid"]
    old, recent = "2026-01-01T00:00:00.000Z", "2099-01-01T00:00:00.000Z"
    doomed = []
    for n, custom_id in enumerate(ids):
        if n % 6 == 5:
            continue  # stays pending
        completed = recent if n % 7 == 3 else old
        # The time as a literal: either store reads it from this text.
        peek.execute(
            f"UPDATE tasks SET status = ?, completed_at = '{completed}', result = '{{}}'"
            " WHERE custom_id = ?",
            finals[n % len(finals)],
            custom_id,
        )
        if completed == old:
            doomed.append(custom_id)
    export_path = tmp_path / "pruned.jsonl"
    with prune_module.open_export(export_path) as export:
        report = await prune_module.prune(
            store, datetime(2026, 6, 1, tzinfo=UTC), export=export, vacuum=False
        )
    exported = [orjson.loads(line)["custom_id"] for line in export_path.read_bytes().splitlines()]
    assert exported == doomed
    assert (report.deleted, report.exported) == (len(doomed), len(doomed))
    left = [row[0] for row in peek.query("SELECT custom_id FROM tasks ORDER BY id")]
    assert left == [custom_id for custom_id in ids if custom_id not in doomed]
    await assert_counts_right(store, peek)


async def test_prune_without_export_deletes_the_same_pages(
    store: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prune_module, "_PAGE", 3)
    await add_tasks(store, *[f"q{n}" for n in range(10)])
    user_writes(
        peek,
        "UPDATE tasks SET status = 'succeeded', completed_at = '2026-01-01T00:00:00.000Z'"
        " WHERE id % 3 <> 0",
    )
    report = await prune_module.prune(store, datetime(2026, 6, 1, tzinfo=UTC), vacuum=False)
    assert (report.deleted, report.exported) == (7, 0)
    assert counted(peek)["pending"] == 3
    assert sum(counted(peek).values()) == 3


# -- query plans ------------------------------------------------------------------------------
# SQLite's plans and statement trace: PostgreSQL's statements page the same way
# (postgres/keyset.py), held there by the behaviour tests above.


@pytest.mark.sqlite_only
async def test_timer_reads_use_the_kept_counts_or_one_index_entry(
    store: SqliteStore, db_path: Path
) -> None:
    await add_tasks(store, "a")
    async with sqlite_statements(store) as seen:
        await store.status_counts()
        await store.has_tasks(TaskStatus.PENDING, TaskStatus.SUBMITTED)
    for sql, plan in sqlite_plans(db_path, seen):
        if "FROM tasks" in sql:
            assert all(
                "COVERING INDEX tasks_by_status (status=?)" in step
                for step in plan
                if "tasks" in step
            ), (sql, plan)
            assert "EXISTS" in sql
        else:
            assert plan == ["SCAN task_counts"], (sql, plan)


@pytest.mark.sqlite_only
async def test_paging_queries_read_only_rows_of_their_statuses_in_id_order(
    store: SqliteStore, db_path: Path
) -> None:
    await add_tasks(store, "a", "b")
    async with sqlite_statements(store) as seen:
        [line async for line in store.iter_result_lines(list(FINAL_TASK_STATUSES))]
        [task async for task in store.iter_pending()]
    checked = 0
    for sql, plan in sqlite_plans(db_path, seen):
        assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
        reads = [step for step in plan if "tasks" in step]
        assert reads, (sql, plan)
        for step in reads:
            assert step.startswith("SEARCH tasks USING"), (sql, plan)
            assert "tasks_by_status (status=? AND id>?" in step, (sql, plan)
        checked += 1
    # A query per status asked: results, then pending. (prune pages tasks_by_completion
    # instead: tests/test_prune_plans.py.)
    assert checked >= 5 + 1


@pytest.mark.sqlite_only
async def test_a_status_without_a_further_match_is_not_read_again_on_each_page(
    store: SqliteStore, db_path: Path
) -> None:
    """Pending rows (no result) after every exported row: read once in all, not on each
    page of the export (SQLite's merge of the ranges scanned them per page)."""
    await add_tasks(store, *[f"d{n:02d}" for n in range(30)])
    user_sql(db_path, "UPDATE tasks SET status = 'succeeded', result = '{}' WHERE id <= 10")
    async with sqlite_statements(store) as seen:
        lines = [
            line
            async for line in store.iter_result_lines(
                [TaskStatus.SUCCEEDED, TaskStatus.PENDING], page_size=2
            )
        ]
    assert len(lines) == 10
    assert sum("status = 'pending'" in sql for sql in seen) == 1
    assert sum("status = 'succeeded'" in sql for sql in seen) == 6  # 5 full pages, 1 empty


@pytest.mark.sqlite_only
async def test_changes_to_named_tasks_are_planned_by_key_not_by_status(
    store: SqliteStore, db_path: Path
) -> None:
    await add_tasks(store, "a", "b", "c")
    local_id = await claim(store, "b")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    [a_id] = await pending_ids(store, ["a"])
    async with sqlite_statements(store) as seen:
        await store.request_cancel(["a", "b", "nobody"])
        await store.accounts.delete_tasks([a_id], datetime.now(UTC) + timedelta(days=1))
        await store.mark_invalid([(a_id, "x")])
        await store.mark_invalid([(a_id, "x")], ["0"])  # as read: by id too
    checked = 0
    for sql, plan in sqlite_plans(db_path, seen):
        if "tasks" not in sql:
            continue
        assert not any("tasks_by_status" in step for step in plan), (sql, plan)
        assert not any(step.startswith("SCAN tasks") for step in plan), (sql, plan)
        checked += 1
    assert checked >= 5


async def test_prune_forgets_only_batches_that_lost_tasks_and_only_once_finished(
    store: Store, peek: Peek
) -> None:
    """A user's DELETE marks the batches its tasks were in (trigger); forget_empty_batches
    looks at those alone, and keeps an unfinished one marked until it is finished."""
    done_a = await submitted_batch(store, "msgbatch_a", "a1", "a2")
    done_b = await submitted_batch(store, "msgbatch_b", "b1")
    for local_id, ids in ((done_a, ["a1", "a2"]), (done_b, ["b1"])):
        await store.write_results(local_id, [outcome(i) for i in ids], 3)
        await store.finish_batch(local_id, "unused")
    await add_tasks(store, "c1")
    running = await claim(store, "c1")
    assert await store.mark_created(running, api_batch("msgbatch_c"))
    user_writes(peek, "DELETE FROM batches_to_check")  # as if every batch had been looked at
    user_writes(peek, "DELETE FROM tasks WHERE custom_id IN ('a1', 'a2', 'c1')")
    assert peek.query("SELECT batch_id FROM batches_to_check ORDER BY 1") == [
        (done_a,),
        (running,),
    ]
    assert await store.accounts.forget_empty_batches() == (2, 1)  # a's links, then a
    assert peek.query("SELECT id FROM batches ORDER BY id") == [(done_b,), (running,)]
    assert peek.query("SELECT batch_id FROM batches_to_check") == [(running,)]
    await store.update_batch(running, api_batch("msgbatch_c", "ended"))
    await store.finish_batch(running, "no line")
    assert await store.accounts.forget_empty_batches() == (1, 1)
    assert peek.query("SELECT id FROM batches") == [(done_b,)]
    assert peek.query("SELECT count(*) FROM batches_to_check") == [(0,)]
