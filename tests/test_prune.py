"""`prune`: only old finished tasks go, exported first; empty batches go; the file shrinks."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from batchd.cli.commands import status_snapshot
from batchd.cli.prune import DurationError, open_export, parse_duration, prune
from batchd.domain import Outcome, TaskStatus, Usage
from batchd.store import Store
from tests.support.store import START, FakeClock, add_tasks, query, submitted_batch

pytestmark = pytest.mark.fake_clock  # the store runs on `clock`, at START


def test_durations() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(days=14)
    for bad in ("30", "d", "1.5d", "-3d", "3y"):
        with pytest.raises(DurationError, match="like 30d"):
            parse_duration(bad)


def succeeded(custom_id: str, text: str = "x") -> Outcome:
    result = orjson.dumps({"type": "succeeded", "message": {"content": text}}).decode()
    return Outcome(custom_id, "succeeded", result, None, False, Usage(10, 5), "claude-x")


async def test_prune_exports_then_removes_only_old_finished_tasks(
    store: Store, db_path: Path, clock: FakeClock, tmp_path: Path
) -> None:
    big = "y" * 50_000  # enough pages for VACUUM to give back
    old = await submitted_batch(store, "msgbatch_old", *(f"old-{n}" for n in range(40)))
    await store.write_results(old, [succeeded(f"old-{n}", big) for n in range(40)], 3)
    await store.finish_batch(old, "unused")
    clock.now = START + timedelta(days=40)
    recent = await submitted_batch(store, "msgbatch_new", "new-1", "in-flight")
    await store.write_results(recent, [succeeded("new-1")], 3)  # "in-flight": submitted
    await add_tasks(store, "waiting")  # pending
    before = {row[0] for row in query(db_path, "SELECT custom_id FROM tasks")}
    spent_before = (await status_snapshot(store))["usage"]

    export_path = tmp_path / "pruned.jsonl"
    with open_export(export_path) as export:
        report = await prune(store, START + timedelta(days=10), export=export)

    remaining = {row[0] for row in query(db_path, "SELECT custom_id FROM tasks")}
    assert remaining == {"new-1", "in-flight", "waiting"}
    assert before - remaining == {f"old-{n}" for n in range(40)}
    assert (report.deleted, report.exported) == (40, 40)
    lines = [orjson.loads(line) for line in export_path.read_bytes().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"old-{n}" for n in range(40))
    first = lines[0]
    assert list(first)[:2] == ["custom_id", "result"]  # the API's own line shape first
    assert first["result"]["message"]["content"] == big
    assert (first["status"], first["usage"]["input_tokens"]) == ("succeeded", 10)
    assert first["params"]["model"] == "claude-x"
    # The old batch carries nothing now: it and its links go; the recent one stays.
    assert query(db_path, "SELECT api_batch_id FROM batches") == [("msgbatch_new",)]
    assert (report.batches_deleted, report.batch_links_deleted) == (1, 40)
    assert report.vacuumed
    assert report.bytes_after < report.bytes_before - 1_000_000
    # Money already spent is not forgotten with the tasks.
    assert (await status_snapshot(store))["usage"] == spent_before
    with pytest.raises(FileExistsError):
        open_export(export_path)  # an earlier export is never overwritten


async def test_prune_keeps_a_task_that_was_retried_meanwhile(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    old = await submitted_batch(store, "msgbatch_old", "a", "b")
    await store.write_results(old, [succeeded("a"), succeeded("b")], 3)
    await store.finish_batch(old, "unused")
    clock.now = START + timedelta(days=40)
    cutoff = START + timedelta(days=10)
    accounts = store.accounts
    [rows] = [page async for page in accounts.iter_prunable(cutoff, page_size=10)]
    assert [row[1] for row in rows] == ["a", "b"]
    await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"])  # between listing and deleting
    assert await accounts.delete_tasks([row[0] for row in rows], cutoff) == 1
    assert query(db_path, "SELECT custom_id, status FROM tasks") == [("a", "pending")]
    # b's link goes; a's stays while the task exists, and with it the batch.
    assert await accounts.forget_empty_batches() == (1, 0)
    assert query(db_path, "SELECT count(*) FROM batches") == [(1,)]


async def test_vacuum_runs_while_another_connection_reads(store: Store, db_path: Path) -> None:
    reader = sqlite3.connect(db_path, timeout=5)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()  # an open read transaction
        report = await prune(store, START, vacuum=False)
        assert report.deleted == 0
        reader.execute("COMMIT")
        report = await prune(store, START)
        assert report.vacuumed
    finally:
        reader.close()
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
