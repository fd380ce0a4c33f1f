"""Where staged result lines go: one bucket per range of task ids, whatever the arrival
order; and the staging database itself, private to the daemon and gone with it."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from batchd.staging import BUCKET_TASKS, NUMBER_BITS, StagingNumbers
from batchd.store import Store
from tests.test_collector import ApiStub, ended_batch
from tests.test_store import PARAMS, add_tasks, api_batch, claim, outcome, query


def open_files() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is closed by now.
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


async def test_keys_of_shuffled_lines_group_them_by_task_id_range(
    store: Store, db_path: Path
) -> None:
    cids = [f"t-{n}" for n in range(3 * BUCKET_TASKS + 5)]
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", *cids)
    task_id = dict(query(db_path, "SELECT custom_id, id FROM tasks"))
    arrival = cids[:]
    random.Random(4).shuffle(arrival)
    for start in range(0, len(arrival), 700):  # chunks as the collector stages them
        report = await store.stage_results(local_id, [outcome(c) for c in arrival[start:][:700]])
        assert report.staged == len(arrival[start:][:700])
    staged = await store._writer.execute_fetchall(
        "SELECT seq, task_id FROM staging.results ORDER BY seq"
    )
    by_key = [task for _, task in staged]

    # Read back in key order (as the staging table stores them), the lines come bucket by
    # bucket, each holding exactly the next BUCKET_TASKS task ids...
    ids = sorted(task_id.values())
    buckets = [
        sorted(by_key[start : start + BUCKET_TASKS]) for start in range(0, len(ids), BUCKET_TASKS)
    ]
    assert buckets == [
        ids[start : start + BUCKET_TASKS] for start in range(0, len(ids), BUCKET_TASKS)
    ]
    # ... and within a bucket in arrival order.
    first_bucket = set(buckets[0])
    assert by_key[:BUCKET_TASKS] == [task_id[c] for c in arrival if task_id[c] in first_bucket]


def test_line_numbers_are_never_reused_until_a_reset_and_stay_below_2_to_the_32() -> None:
    numbers = StagingNumbers()
    assert [numbers.reserve(3), numbers.reserve(1), numbers.reserve(5)] == [0, 3, 4]
    numbers.reserve(2**NUMBER_BITS - 9 - 1)
    assert numbers.reserve(1) == 2**NUMBER_BITS - 1
    with pytest.raises(OverflowError):
        numbers.reserve(1)


async def test_staging_lives_in_an_unlinked_private_file_not_beside_the_database(
    store: Store, db_path: Path
) -> None:
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", "a", "b", "c")
    before = sorted(os.listdir(db_path.parent))
    # More than the staging cache holds, so SQLite has to write its file.
    big = '{"type": "succeeded", "text": "%s"}' % ("x" * 8_000_000)
    lines = [replace(outcome(custom_id), result_json=big) for custom_id in ("a", "b", "c")]
    report = await store.stage_results(local_id, lines)
    assert report.staged == 3

    # Nothing new next to the database, and nothing staged inside it.
    assert sorted(os.listdir(db_path.parent)) == before
    tables = query(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")
    assert ("results",) not in tables
    # SQLite's temporary file holding it is already unlinked: a kill -9 leaves nothing.
    temp_files = [link for link in open_files() if "etilqs_" in link]
    assert temp_files
    assert all(link.endswith("(deleted)") for link in temp_files), temp_files

    await store.clear_staging()
    assert await store.apply_staged(local_id, 3, max_rows=10) is None
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE status = 'submitted'").fetchone() == (
            3,
        )
    conn.close()


async def test_a_batch_spanning_huge_task_ids_is_staged_and_written(
    store: Store, db_path: Path
) -> None:
    await add_tasks(store, "small")
    # A user's own ids for two tasks, far beyond the others, in the same batch.
    with sqlite3.connect(db_path) as conn:
        for task_id, custom_id in ((2**62, "big"), (2**63 - 1, "biggest")):
            conn.execute(
                "INSERT INTO tasks (id, custom_id, params) VALUES (?, ?, ?)",
                (task_id, custom_id, PARAMS),
            )
    conn.close()
    local_id = await claim(store, "small", "big", "biggest")
    assert await store.mark_created(local_id, api_batch("msgbatch_1", "ended"))

    lines = [outcome("biggest"), outcome("big"), outcome("small")]
    report = await store.stage_results(local_id, lines)
    assert report.staged == 3
    keys = await store._writer.execute_fetchall("SELECT seq FROM staging.results")
    assert all(0 <= key < 2**63 for (key,) in keys)  # SQLite's integers, never wrapped
    applied = await store.apply_staged(local_id, 3, max_rows=10)
    assert applied is not None
    assert applied.report.written == 3
    assert query(db_path, "SELECT id, status FROM tasks ORDER BY id") == [
        (1, "succeeded"),
        (2**62, "succeeded"),
        (2**63 - 1, "succeeded"),
    ]


async def test_staging_heals_after_a_reset_that_stopped_halfway(
    store: Store, db_path: Path
) -> None:
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", "a")
    await store._writer.execute("DETACH DATABASE staging")  # as if the re-attach had failed
    await store.clear_staging()
    assert (await store.stage_results(local_id, [outcome("a")])).staged == 1
    applied = await store.apply_staged(local_id, 3, max_rows=10)
    assert applied is not None
    assert applied.report.written == 1


async def test_a_key_used_twice_fails_loudly_instead_of_dropping_the_line(
    store: Store, db_path: Path
) -> None:
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", "a", "b")
    # A row already holding the key the next line will get (only a bug could do this).
    await store._writer.execute(
        "INSERT INTO staging.results (seq, task_id, batch_id, custom_id, result_type,"
        " result_json, retryable) VALUES (0, 999, ?, 'other', 'succeeded', '{}', 0)",
        (local_id,),
    )
    with pytest.raises(sqlite3.IntegrityError):
        await store.stage_results(local_id, [outcome("a")])
    # A repeated line is still merely ignored.
    await store.clear_staging()
    report = await store.stage_results(local_id, [outcome("b"), outcome("b")])
    assert (report.staged, report.repeated) == (1, 1)
