"""The store against real SQLite files: migrations, every transition, the write-back."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.domain import BatchState, TaskStatus, Usage
from batchd.store import SchemaTooNewError, Store, StoreError, open_store
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek
from tests.support.store import (
    PARAMS,
    START,
    FakeClock,
    add_tasks,
    api_batch,
    claim,
    outcome,
    pending_ids,
    query,
    submitted_batch,
)

# The store runs on `clock`, at START; every test using `store` runs on both databases.
pytestmark = [pytest.mark.fake_clock, pytest.mark.both_stores]


def task(path: Path, custom_id: str) -> dict[str, Any]:
    conn = sqlite3.connect(path, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM tasks WHERE custom_id = ?", (custom_id,)).fetchone()
    finally:
        conn.close()
    assert found is not None, custom_id
    return dict(found)


# -- opening and migrations --------------------------------------------------------------------


async def test_open_applies_migrations_once_and_records_them(db_path: Path, clock: FakeClock):
    store = await SqliteStore.open(db_path, clock=clock)
    try:
        assert await store.migrate() == []
    finally:
        await store.close()
    assert query(db_path, "SELECT version, name, applied_at FROM schema_migrations") == [
        (1, "initial", "2026-11-24T15:40:37.123Z"),
        (2, "batch_tasks", "2026-11-24T15:40:37.123Z"),
        (3, "usage_ledger", "2026-11-24T15:40:37.123Z"),
        (4, "short_downloads", "2026-11-24T15:40:37.123Z"),
        (5, "missing_reason", "2026-11-24T15:40:37.123Z"),
        (6, "harvest", "2026-11-24T15:40:37.123Z"),
        (7, "flat_costs", "2026-11-24T15:40:37.123Z"),
        (8, "duplicate_acknowledged", "2026-11-24T15:40:37.123Z"),
        (9, "collect_lease", "2026-11-24T15:40:37.123Z"),
        (10, "completion_indexes", "2026-11-24T15:40:37.123Z"),
        (11, "batch_checks", "2026-11-24T15:40:37.123Z"),
        (12, "tasks_fillfactor", "2026-11-24T15:40:37.123Z"),
        (13, "prune_by_completion", "2026-11-24T15:40:37.123Z"),
        (14, "collector_liveness", "2026-11-24T15:40:37.123Z"),
        (15, "kept_line_usage", "2026-11-24T15:40:37.123Z"),
        (16, "task_revision", "2026-11-24T15:40:37.123Z"),
    ]
    reopened = await SqliteStore.open(db_path, clock=clock)
    try:
        assert await reopened.migrate() == []
    finally:
        await reopened.close()
    assert query(db_path, "SELECT count(*) FROM schema_migrations") == [(16,)]


async def test_upgrade_from_v1_remembers_tasks_of_batches_in_flight(db_path: Path):
    store = await SqliteStore.open(db_path)
    try:
        local_id = await submitted_batch(store, "msgbatch_1", "a", "b")
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:  # back to how batchd with schema v1 left it
        conn.execute("DROP TABLE batch_tasks")
        conn.execute("DELETE FROM schema_migrations WHERE version = 2")
    conn.close()
    upgraded = await SqliteStore.open(db_path, migrate=False)
    try:
        assert await upgraded.migrate() == [2]
        report = await upgraded.write_results(local_id, [outcome("a"), outcome("b")], 3)
        assert (report.written, report.unmatched) == (2, ())
    finally:
        await upgraded.close()


async def test_upgrade_to_v5_keeps_missing_results_as_missing_lines(db_path: Path):
    store = await SqliteStore.open(db_path)
    await store.close()
    with sqlite3.connect(db_path) as conn:  # a v4 database with one missing result
        conn.execute("ALTER TABLE missing_results DROP COLUMN reason")
        conn.execute("DELETE FROM schema_migrations WHERE version = 5")
        conn.execute("INSERT INTO missing_results VALUES ('msgbatch_1', 'a', '2026-11-01')")
    conn.close()
    upgraded = await SqliteStore.open(db_path, migrate=False)
    try:
        assert await upgraded.migrate() == [5]
    finally:
        await upgraded.close()
    assert query(db_path, "SELECT custom_id, reason FROM missing_results") == [("a", "no_line")]
    with sqlite3.connect(db_path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO missing_results VALUES ('msgbatch_1', 'b', 'now', 'lost')")
    conn.close()


@pytest.mark.sqlite_only  # pragmas of SQLite's file
async def test_new_database_uses_wal_and_large_pages(store: Store, peek: Peek):
    assert peek.query("PRAGMA journal_mode") == [("wal",)]
    assert peek.query("PRAGMA page_size") == [(16384,)]


async def test_newer_schema_is_refused_naming_both_versions(db_path: Path):
    await (await SqliteStore.open(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', '2030-01-01T00:00:00Z')")
    conn.close()
    for migrate in (True, False):
        with pytest.raises(SchemaTooNewError, match=r"version 99 is newer .* supports \(16\)"):
            await SqliteStore.open(db_path, migrate=migrate)


async def test_not_a_database_is_a_store_error_naming_the_path(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite, just text long enough to have a header" * 20)
    with pytest.raises(StoreError, match="not a database") as caught:
        await SqliteStore.open(path)
    assert str(path) in str(caught.value)


_READ_ONLY_PROBE = """
import asyncio, os, sys
from pathlib import Path
from batchd.store import Store, StoreError
from batchd.store.sqlite import SqliteStore
asyncio.new_event_loop().close()  # load the loop's modules while they are still readable
if os.geteuid() == 0:
    # root ignores file modes: become a user they apply to.
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
async def probe():
    try:
        store = await SqliteStore.open(Path(sys.argv[1]))
    except StoreError as exc:
        print(exc)
        return 0
    await store.close()
    print("opened for writing")
    return 1
sys.exit(asyncio.run(probe()))
"""


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # pytest's tmp_path sits under a root-only directory the unprivileged probe can't enter.
    directory = Path(tempfile.mkdtemp(prefix="batchd-ro-"))
    directory.chmod(0o755)
    yield directory
    directory.chmod(0o755)
    shutil.rmtree(directory)


async def test_read_only_database_is_a_store_error_naming_the_path(world_readable_dir: Path):
    path = world_readable_dir / "batchd.db"
    await (await SqliteStore.open(path)).close()
    path.chmod(0o444)
    world_readable_dir.chmod(0o555)
    probe = subprocess.run(
        [sys.executable, "-c", _READ_ONLY_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert str(path) in probe.stdout
    assert "readonly database" in probe.stdout
    assert "write the file and its directory" in probe.stdout


@pytest.mark.sqlite_only  # SQLite's page cap is the test's disk; PostgreSQL: its server's
async def test_disk_full_on_write_is_a_store_error_and_the_store_keeps_working(
    store: Store, peek: Peek
):
    writer = store.database.writer  # a page cap is how SQLite lets a test fill the disk
    pages = next(iter(await writer.execute_fetchall("PRAGMA page_count")))[0]
    await writer.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreError, match="disk is full") as caught:
        await store.enqueue((f"big-{i}", "x" * 2000) for i in range(200))
    assert str(store.database.path) in str(caught.value)
    await writer.execute("PRAGMA max_page_count = 1073741823")
    await add_tasks(store, "after")
    assert (await store.status_counts())[TaskStatus.PENDING] == 1


async def test_user_insert_from_another_connection_while_open(store: Store, peek: Peek):
    peek.execute("INSERT INTO tasks (custom_id, params) VALUES ('by-user', ?)", PARAMS)
    await add_tasks(store, "by-daemon")
    assert [t.custom_id async for t in store.iter_pending()] == ["by-user", "by-daemon"]


async def test_cancelled_caller_still_commits_its_whole_transaction(
    database_config: DatabaseConfig, peek: Peek
):
    store = await open_store(database_config)
    caller = asyncio.create_task(store.enqueue((f"t{i}", PARAMS) for i in range(3000)))
    await asyncio.sleep(0)  # the write transaction has started
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await store.close()  # waits for the shielded transaction
    assert peek.query("SELECT count(*) FROM tasks") == [(3000,)]


# -- intake ------------------------------------------------------------------------------------


async def test_enqueue_reports_existing_and_repeated_custom_ids(store: Store):
    await add_tasks(store, "a")
    items = [("a", PARAMS), ("b", PARAMS), ("b", PARAMS)]
    items += [(f"n{i}", PARAMS) for i in range(5000)]  # "c" lands in the second chunk
    items += [("c", PARAMS), ("n7", PARAMS), ("c", PARAMS)]
    report = await store.enqueue(items)
    assert report.inserted == 5002  # b, n0..n4999, c
    assert report.duplicates == ("a", "b", "n7", "c")


async def test_iter_pending_pages_oldest_first_skipping_other_statuses(store: Store):
    await add_tasks(store, *(f"t{i}" for i in range(7)))
    first = [t async for t in store.iter_pending(page_size=100)]
    assert await store.mark_invalid([(first[2].id, "bad params")]) == 1
    paged = [t async for t in store.iter_pending(page_size=2)]
    assert [t.custom_id for t in paged] == ["t0", "t1", "t3", "t4", "t5", "t6"]
    # The same request; PostgreSQL's jsonb keeps no text of its own (key order, spaces).
    assert orjson.loads(paged[0].params) == orjson.loads(PARAMS)
    assert paged[0].attempts == 0


async def test_iter_pending_keeps_pages_of_big_rows_small(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    big = PARAMS.replace("}", ', "metadata": {"pad": "%s"}}' % ("x" * 1_000_000), 1)
    await store.enqueue([(f"big-{n}", big) for n in range(30)])
    await add_tasks(store, *(f"small-{n}" for n in range(300)))
    pages: list[int] = []  # params bytes held by each page

    def spy(read: Any) -> Any:
        async def spying(sql: str, *params: Any) -> list[Any]:
            rows = await read(sql, *params)
            if rows and len(rows[0]) > 2:  # a page of tasks, not of their sizes
                pages.append(sum(len(row[2]) for row in rows))
            return rows

        return spying

    # PostgreSQL reads its pages through read_in_key_order (planned without a sort).
    for name in ("read", "read_in_key_order"):
        if hasattr(store.database, name):
            monkeypatch.setattr(store.database, name, spy(getattr(store.database, name)))
    tasks = [t async for t in store.iter_pending(page_size=1000, page_bytes=4_000_000)]
    assert [t.custom_id for t in tasks] == [f"big-{n}" for n in range(30)] + [
        f"small-{n}" for n in range(300)
    ]
    assert max(pages) <= 4_000_000 + len(big)  # never the 30 MB of big rows at once
    assert len(pages) < 20  # and the small rows still come many to a page


async def test_mark_invalid_only_touches_pending_tasks(store: Store, peek: Peek):
    await add_tasks(store, "a", "b")
    a, b = await pending_ids(store, ["a", "b"])
    await claim(store, "b")
    assert await store.mark_invalid([(a, "no model"), (b, "no model")]) == 1
    assert peek.task("a")["status"] == "invalid"
    assert peek.task("a")["error"] == "no model"
    assert peek.task("a")["completed_at"] == "2026-11-24T15:40:37.123Z"
    assert peek.task("b")["status"] == "submitted"


# -- submission --------------------------------------------------------------------------------


async def test_record_intent_claims_tasks_for_a_creating_batch(store: Store, peek: Peek):
    await add_tasks(store, "a", "b", "c")
    local_id = await store.record_intent(await pending_ids(store, ["a", "b"]), 4321)
    assert local_id is not None
    [batch] = await store.batches_in(BatchState.CREATING)
    assert (batch.local_id, batch.request_count, batch.body_bytes) == (local_id, 2, 4321)
    assert batch.intent_at == datetime(2026, 11, 24, 15, 40, 37, 123000, tzinfo=UTC)
    assert batch.api_batch_id is None
    claimed = peek.task("a")
    assert (claimed["status"], claimed["batch_id"], claimed["attempts"]) == (
        "submitted",
        local_id,
        1,
    )
    assert peek.task("c")["status"] == "pending"
    assert await store.in_flight_request_count() == 2


async def test_record_intent_rolls_back_when_a_task_stopped_being_pending(store: Store, peek: Peek):
    await add_tasks(store, "a", "b")
    ids = await pending_ids(store, ["a", "b"])
    await store.request_cancel(["b"])
    assert await store.record_intent(ids, 100) is None
    assert peek.query("SELECT count(*) FROM batches") == [(0,)]
    assert peek.task("a")["status"] == "pending"
    assert peek.task("a")["attempts"] == 0


async def test_mark_created_records_the_api_batch_once(store: Store):
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    assert await store.mark_created(local_id, api_batch("msgbatch_1"))
    assert not await store.mark_created(local_id, api_batch("msgbatch_2"))
    # The second is read too, for this intent's tasks only: a candidate of it.
    batch, candidate = await store.batches_in(BatchState.IN_PROGRESS)
    assert (candidate.api_batch_id, candidate.candidate_for) == ("msgbatch_2", local_id)
    assert batch.api_batch_id == "msgbatch_1"
    assert batch.candidate_for is None
    assert batch.submitted_at == datetime(2026, 11, 24, 15, 40, 37, 123000, tzinfo=UTC)
    assert batch.api_created_at == datetime(2026, 11, 24, 15, 40, 38, 500000, tzinfo=UTC)
    assert batch.request_counts == api_batch("msgbatch_1")["request_counts"]
    # The second is not adopted, but it exists on the API: kept on record as a duplicate.
    assert [row[0] for row in await store.duplicate_batches()] == ["msgbatch_2"]
    assert await store.known_api_batch_ids() == {"msgbatch_1", "msgbatch_2"}


async def test_adopting_an_ended_batch_makes_it_ended(store: Store):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    [batch] = await store.batches_in(BatchState.ENDED)
    assert batch.local_id == local_id
    assert batch.results_url is not None
    assert batch.ended_at == datetime(2026, 11, 24, 16, 0, 0, 250000, tzinfo=UTC)


async def test_release_intent_requeues_tasks_and_marks_the_refused_one_invalid(
    store: Store, peek: Peek
):
    await add_tasks(store, "a", "b", "c")
    local_id = await claim(store, "a", "b", "c")
    await store.release_intent(local_id, "create refused: 400", [("b", "refused: bad")])
    [batch] = await store.batches_in(BatchState.REJECTED)
    assert batch.note == "create refused: 400"
    assert peek.task("b")["status"] == "invalid"
    assert peek.task("b")["error"] == "refused: bad"
    for custom_id in ("a", "c"):
        requeued = peek.task(custom_id)
        assert (requeued["status"], requeued["batch_id"], requeued["attempts"]) == (
            "pending",
            None,
            0,
        )
    assert await store.in_flight_request_count() == 0
    await store.release_intent(local_id, "again")  # guarded: no longer creating
    assert (await store.batches_in(BatchState.REJECTED))[0].note == "create refused: 400"


async def test_release_intent_cancels_tasks_the_user_flagged(store: Store, peek: Peek):
    await add_tasks(store, "a", "b")
    local_id = await claim(store, "a", "b")
    await store.request_cancel(["a"])
    await store.release_intent(local_id, "create refused: 429")
    assert peek.task("a")["status"] == "canceled"
    assert peek.task("b")["status"] == "pending"


# -- polling -----------------------------------------------------------------------------------


async def test_update_batch_moves_state_forward_only(store: Store, peek: Peek):
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    await store.note_not_found(local_id, START)
    await store.update_batch(local_id, api_batch("msgbatch_1", "canceling", processing=1))
    [batch] = await store.batches_in(BatchState.CANCELING)
    assert batch.not_found_since is None
    await store.update_batch(local_id, api_batch("msgbatch_1", "in_progress", processing=1))
    assert (await store.batches_in(BatchState.CANCELING))[0].local_id == local_id
    await store.update_batch(local_id, api_batch("msgbatch_1", "ended", succeeded=1))
    [ended] = await store.batches_in(BatchState.ENDED)
    assert ended.request_counts is not None
    assert ended.request_counts["succeeded"] == 1
    assert ended.results_url is not None
    assert peek.query("SELECT last_polled_at FROM batches") == [("2026-11-24T15:40:37.123Z",)]


async def test_update_batch_ignores_a_poll_of_another_api_batch(store: Store):
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    await store.update_batch(local_id, api_batch("msgbatch_other", "ended"))
    assert [b.local_id for b in await store.batches_in(BatchState.IN_PROGRESS)] == [local_id]


async def test_note_not_found_sets_and_clears(store: Store):
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    await store.note_not_found(local_id, START + timedelta(seconds=5))
    [batch] = await store.batches_in(BatchState.IN_PROGRESS)
    assert batch.not_found_since == datetime(2026, 11, 24, 15, 40, 42, 123000, tzinfo=UTC)
    await store.note_not_found(local_id, None)
    assert (await store.batches_in(BatchState.IN_PROGRESS))[0].not_found_since is None


async def test_mark_lost_requeues_submitted_tasks_keeping_attempts(store: Store, peek: Peek):
    await add_tasks(store, "a", "b", "c")
    local_id = await claim(store, "a", "b", "c")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    await store.request_cancel(["c"])
    assert await store.mark_lost(local_id, "404 on retrieve") == 2
    lost = peek.task("a")
    assert (lost["status"], lost["batch_id"], lost["attempts"]) == ("pending", None, 1)
    assert lost["error"] == "batch msgbatch_1 lost: 404 on retrieve"
    assert peek.task("c")["status"] == "canceled"
    [batch] = await store.batches_in(BatchState.LOST)
    assert batch.note == "404 on retrieve"
    assert await store.mark_lost(local_id, "again") == 0


# -- results -----------------------------------------------------------------------------------


async def test_write_results_success_records_result_and_usage(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    usage = Usage(input_tokens=11, output_tokens=22, cache_creation_input_tokens=3)
    report = await store.write_results(local_id, [outcome("a", usage=usage)], max_attempts=3)
    assert (report.written, report.requeued, report.ignored, report.unmatched) == (1, 0, 0, ())
    done = peek.task("a")
    assert done["status"] == "succeeded"
    assert done["result"] == '{"type": "succeeded"}'
    assert done["error"] is None
    assert done["model"] == "claude-x"
    assert (done["input_tokens"], done["output_tokens"]) == (11, 22)
    assert (done["cache_creation_input_tokens"], done["cache_read_input_tokens"]) == (3, 0)
    assert done["completed_at"] == "2026-11-24T15:40:37.123Z"
    assert done["batch_id"] == local_id


async def test_write_results_decides_each_failure_kind(store: Store, peek: Peek):
    ids = ["bad", "transient", "expired", "canceled", "user_canceled", "user_flag_err"]
    local_id = await submitted_batch(store, "msgbatch_1", *ids)
    await store.request_cancel(["user_canceled", "user_flag_err"])
    report = await store.write_results(
        local_id,
        [
            outcome("bad", "errored", error="invalid_request_error: no", retryable=False),
            outcome("transient", "errored", error="overloaded_error: busy", retryable=True),
            outcome("expired", "expired", error="expired before processing", retryable=True),
            outcome("canceled", "canceled", error="batch canceled", retryable=True),
            outcome("user_canceled", "canceled", error="batch canceled", retryable=True),
            outcome("user_flag_err", "errored", error="api_error: oops", retryable=True),
        ],
        max_attempts=3,
    )
    assert (report.written, report.requeued, report.ignored) == (3, 3, 0)
    bad = peek.task("bad")
    assert (bad["status"], bad["error"]) == ("errored", "invalid_request_error: no")
    assert bad["result"] == '{"type": "errored"}'
    for custom_id, error in [
        ("transient", "overloaded_error: busy"),
        ("expired", "expired before processing"),
        ("canceled", "batch canceled"),
    ]:
        again = peek.task(custom_id)
        assert (again["status"], again["batch_id"], again["result"]) == ("pending", None, None)
        assert (again["error"], again["attempts"], again["completed_at"]) == (error, 1, None)
    user = peek.task("user_canceled")
    assert (user["status"], user["error"]) == ("canceled", "canceled at user request")
    assert peek.task("user_flag_err")["status"] == "errored"


async def test_write_results_stops_retrying_at_max_attempts(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    first = await store.write_results(local_id, [outcome("a", "expired", retryable=True)], 2)
    assert first.requeued == 1
    second_id = await claim(store, "a")
    await store.mark_created(second_id, api_batch("msgbatch_2", "ended"))
    line = outcome("a", "expired", error="expired again", retryable=True)
    report = await store.write_results(second_id, [line], max_attempts=2)
    assert (report.written, report.requeued) == (1, 0)
    final = peek.task("a")
    assert (final["status"], final["attempts"], final["error"]) == ("expired", 2, "expired again")


async def test_writing_the_same_lines_again_changes_nothing(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b")
    lines = [outcome("a"), outcome("b", "errored", error="e", retryable=True)]
    await store.write_results(local_id, lines, max_attempts=3)
    before = [peek.task("a"), peek.task("b")]
    report = await store.write_results(local_id, lines, max_attempts=3)
    assert (report.written, report.requeued, report.ignored, report.unmatched) == (0, 0, 2, ())
    assert [peek.task("a"), peek.task("b")] == before


async def test_a_line_for_a_task_of_another_batch_is_unmatched(store: Store, peek: Peek):
    local_1 = await submitted_batch(store, "msgbatch_1", "a")
    await submitted_batch(store, "msgbatch_2", "b")
    report = await store.write_results(local_1, [outcome("a"), outcome("b"), outcome("zz")], 3)
    assert (report.written, report.ignored, report.unmatched) == (1, 0, ("b", "zz"))
    assert peek.task("b")["status"] == "submitted"
    assert peek.task("b")["result"] is None
    await store.keep_unmatched("msgbatch_1", [("b", '{"custom_id": "b"}'), ("zz", "{}")])
    await store.keep_unmatched("msgbatch_1", [("b", '{"custom_id": "b"}')])
    assert peek.query("SELECT custom_id FROM unmatched_results ORDER BY id") == [
        ("b",),
        ("zz",),
    ]


async def test_a_shuffled_chunk_lands_on_each_task_and_reports_unmatched_in_line_order(
    store: Store, peek: Peek
):
    # The store stages a chunk in task rowid order; the report must still follow the lines.
    local_id = await submitted_batch(store, "msgbatch_1", "t1", "t2", "t3", "t4")
    await submitted_batch(store, "msgbatch_2", "other")
    lines = [
        outcome("t4", usage=Usage(4, 40)),
        outcome("nobody"),
        outcome("t2", "errored", error="overloaded", retryable=True),
        outcome("other"),
        outcome("t1", usage=Usage(1, 10)),
        outcome("t3", "errored", error="bad request"),
    ]
    report = await store.write_results(local_id, lines, max_attempts=3)
    assert (report.written, report.requeued, report.ignored) == (3, 1, 0)
    assert report.unmatched == ("nobody", "other")
    rows = {
        row[0]: row[1:]
        for row in peek.query("SELECT custom_id, status, input_tokens, error FROM tasks")
    }
    assert rows["t1"] == ("succeeded", 1, None)
    assert rows["t4"] == ("succeeded", 4, None)
    assert rows["t2"] == ("pending", None, "overloaded")
    assert rows["t3"] == ("errored", None, "bad request")
    assert rows["other"] == ("submitted", None, None)


async def test_a_downloaded_again_line_of_a_resubmitted_task_is_ignored(store: Store, peek: Peek):
    first = await submitted_batch(store, "msgbatch_1", "a")
    line = outcome("a", "errored", error="overloaded", retryable=True)
    assert (await store.write_results(first, [line], max_attempts=3)).requeued == 1
    second = await claim(store, "a")
    report = await store.write_results(first, [line], max_attempts=3)
    assert (report.written, report.requeued, report.ignored, report.unmatched) == (0, 0, 1, ())
    resubmitted = peek.task("a")
    assert (resubmitted["status"], resubmitted["batch_id"]) == ("submitted", second)


async def test_a_repeated_line_within_a_chunk_counts_once(store: Store):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    report = await store.write_results(local_id, [outcome("a"), outcome("a")], 3)
    assert (report.written, report.ignored) == (1, 1)


async def test_finish_batch_requeues_tasks_without_a_line(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b", "c", "d")
    await store.request_cancel(["d"])
    await store.write_results(local_id, [outcome("b")], max_attempts=3)
    report = await store.finish_batch(local_id, "no result line in msgbatch_1")
    assert report.missing_requeued == ("a", "c")
    missing = peek.task("a")
    assert (missing["status"], missing["batch_id"]) == ("pending", None)
    assert missing["error"] == "no result line in msgbatch_1"
    assert peek.task("d")["status"] == "canceled"
    [batch] = await store.batches_in(BatchState.COMPLETED)
    assert batch.local_id == local_id
    assert (await store.finish_batch(local_id, "again")).missing_requeued == ()
    # On record in the same transaction as the requeue: they will be paid for again.
    assert peek.query("SELECT api_batch_id, custom_id, reason FROM missing_results") == [
        ("msgbatch_1", "a", "no_line"),
        ("msgbatch_1", "c", "no_line"),
    ]


async def test_finishing_an_archived_batch_lists_its_requests_as_archived(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b")
    report = await store.finish_batch(local_id, "results archived", archived=True)
    assert report.missing_requeued == ("a", "b")
    assert peek.query("SELECT custom_id, reason FROM missing_results") == [
        ("a", "archived"),
        ("b", "archived"),
    ]


async def test_note_download_failed_counts_attempts(store: Store):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    assert await store.note_download_failed(local_id, "404") == 1
    assert await store.note_download_failed(local_id, "truncated") == 2
    [batch] = await store.batches_in(BatchState.ENDED)
    assert (batch.download_attempts, batch.note) == (2, "truncated")


async def test_short_streams_are_counted_apart_from_transport_failures(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b")
    for _ in range(3):
        await store.note_download_failed(local_id, "connection reset")
    assert await store.note_short_stream(local_id, "1 of 2 lines") == 1
    assert await store.note_short_stream(local_id, "1 of 2 lines") == 2
    assert peek.query("SELECT download_attempts, short_downloads, note FROM batches") == [
        (5, 2, "1 of 2 lines")
    ]


async def test_staged_lines_are_applied_range_by_range_in_task_id_order(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b", "c", "d", "e")
    other = await submitted_batch(store, "msgbatch_2", "x")
    lines = [outcome("e"), outcome("x"), outcome("b"), outcome("b", "errored"), outcome("a")]
    async with store.write_back_lane() as lane:
        staged = await lane.stage_results(local_id, lines)
        assert (staged.staged, staged.repeated, staged.unmatched) == (3, 1, (1,))
        staged = await lane.stage_results(local_id, [outcome("c", "expired", retryable=True)])
        assert staged.staged == 1
        ranges = []
        after = 0
        while applied := await lane.apply_staged(local_id, 3, max_rows=2, after_task_id=after):
            ranges.append(applied.report)
            after = applied.last_task_id
        # Ranges of two task ids: (a, b), then (c, e); d never had a line.
        assert [(r.written, r.requeued, r.ignored) for r in ranges] == [(2, 0, 0), (1, 1, 0)]
        assert dict(peek.query("SELECT custom_id, status FROM tasks")) == {
            "a": "succeeded",
            "b": "succeeded",
            "c": "pending",
            "d": "submitted",
            "e": "succeeded",
            "x": "submitted",
        }
        # Applying the same staged lines again (a re-download) changes nothing.
        again = await lane.apply_staged(local_id, 3, max_rows=10)
        assert again is not None
        assert (again.report.written, again.report.ignored) == (0, 4)
        await lane.clear_staging()
        assert await lane.apply_staged(other, 3, max_rows=10) is None


async def test_duplicate_batches_are_recorded_with_the_adoption_once_and_known(store: Store):
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    adopted = api_batch("msgbatch_1")
    assert await store.mark_created(local_id, adopted, [api_batch("msgbatch_dup")])
    # Too late: the local batch is no longer `creating`, so this one is a duplicate too.
    late = api_batch("msgbatch_late")
    assert not await store.mark_created(local_id, late, [api_batch("msgbatch_dup")])
    window = f"same request count created in the window of local batch {local_id}"
    assert await store.duplicate_batches() == [
        ("msgbatch_dup", "2026-11-24T15:40:37.123Z", window),
        (
            "msgbatch_late",
            "2026-11-24T15:40:37.123Z",
            f"created for local batch {local_id} after its intent was released",
        ),
    ]
    assert await store.known_api_batch_ids() == {"msgbatch_1", "msgbatch_dup", "msgbatch_late"}


# A scale test: PostgreSQL's is bench/e2e.py --database (20 s here would double the suite's
# store tests for no behaviour the smaller tests of both stores do not already show).
@pytest.mark.sqlite_only
async def test_write_results_of_100k_outcomes_completes(store: Store):
    custom_ids = [f"task-{i:06d}" for i in range(100_000)]
    await store.enqueue((custom_id, PARAMS) for custom_id in custom_ids)
    local_id = await store.record_intent([t.id async for t in store.iter_pending()], 1)
    assert local_id is not None
    written = 0
    for start in range(0, len(custom_ids), 5000):
        chunk = [outcome(custom_id) for custom_id in custom_ids[start : start + 5000]]
        written += (await store.write_results(local_id, chunk, max_attempts=3)).written
    assert written == 100_000
    assert (await store.status_counts())[TaskStatus.SUCCEEDED] == 100_000


# -- user commands -----------------------------------------------------------------------------


async def test_request_cancel_sorts_every_custom_id(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "sub", "done")
    await store.write_results(local_id, [outcome("done")], max_attempts=3)
    await add_tasks(store, "pend")
    report = await store.request_cancel(["pend", "sub", "done", "ghost"])
    assert report.canceled == ("pend",)
    assert report.flagged == ("sub",)
    assert report.not_cancelable == ("done",)
    assert report.unknown == ("ghost",)
    pend = peek.task("pend")
    assert (pend["status"], pend["error"]) == ("canceled", "canceled at user request")
    assert (peek.task("sub")["status"], peek.task("sub")["cancel_requested"]) == (
        "submitted",
        1,
    )


async def test_batches_to_cancel_needs_every_waiting_task_flagged(store: Store):
    await add_tasks(store, "a", "b", "c")
    local_id = await claim(store, "a", "b", "c")
    await store.mark_created(local_id, api_batch("msgbatch_1"))
    assert await store.batches_to_cancel() == []
    await store.request_cancel(["a", "b"])
    assert await store.batches_to_cancel() == []
    await store.request_cancel(["c"])
    [batch] = await store.batches_to_cancel()
    assert batch.local_id == local_id
    await store.mark_canceling(local_id)
    assert await store.batches_to_cancel() == []
    assert [b.local_id for b in await store.batches_in(BatchState.CANCELING)] == [local_id]


async def test_retry_tasks_requeues_only_the_statuses_asked(store: Store, peek: Peek):
    local_id = await submitted_batch(store, "msgbatch_1", "ok", "err1", "err2")
    await store.write_results(
        local_id,
        [outcome("ok"), outcome("err1", "errored", error="e"), outcome("err2", "errored")],
        max_attempts=3,
    )
    assert await store.retry_tasks([TaskStatus.ERRORED], ["err1"]) == 1
    assert peek.task("err2")["status"] == "errored"
    assert await store.retry_tasks([TaskStatus.ERRORED, TaskStatus.EXPIRED]) == 1
    again = peek.task("err1")
    assert (again["status"], again["attempts"], again["batch_id"]) == ("pending", 0, None)
    assert (again["result"], again["error"], again["completed_at"]) == (None, None, None)
    assert peek.task("ok")["status"] == "succeeded"
    with pytest.raises(ValueError, match="only final tasks"):
        await store.retry_tasks([TaskStatus.SUBMITTED])


async def test_status_counts_include_every_status(store: Store):
    await add_tasks(store, "a", "b")
    await store.request_cancel(["b"])
    counts = await store.status_counts()
    assert set(counts) == set(TaskStatus)
    assert counts[TaskStatus.PENDING] == 1
    assert counts[TaskStatus.CANCELED] == 1
    assert counts[TaskStatus.SUCCEEDED] == 0


async def test_tasks_by_custom_id_in_the_order_asked(store: Store):
    local_id = await submitted_batch(store, "msgbatch_1", "a")
    await store.write_results(local_id, [outcome("a")], max_attempts=3)
    await add_tasks(store, "b")
    rows = await store.tasks_by_custom_id(["b", "ghost", "a"])
    assert [(r.custom_id, r.status, r.api_batch_id) for r in rows] == [
        ("b", TaskStatus.PENDING, None),
        ("a", TaskStatus.SUCCEEDED, "msgbatch_1"),
    ]
    assert rows[1].result_json == '{"type": "succeeded"}'
    assert rows[1].attempts == 1


async def test_iter_result_lines_pages_tasks_with_results(store: Store):
    ids = [f"t{i}" for i in range(5)]
    local_id = await submitted_batch(store, "msgbatch_1", *ids)
    lines = [outcome(i) for i in ids[:3]] + [outcome("t3", "errored", error="e")]
    await store.write_results(local_id, lines, max_attempts=3)
    succeeded = [
        line async for line in store.iter_result_lines([TaskStatus.SUCCEEDED], page_size=2)
    ]
    assert succeeded == [(i, '{"type": "succeeded"}') for i in ids[:3]]
    both = [cid async for cid, _ in store.iter_result_lines(list(TaskStatus))]
    assert both == ["t0", "t1", "t2", "t3"]
