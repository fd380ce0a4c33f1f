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

from batchd.store import Store
from batchd.store.sqlite.staging import BUCKET_TASKS, StagingKeys
from tests.support.collector import ApiStub, ended_batch
from tests.support.store import PARAMS, add_tasks, api_batch, claim, outcome, query


def open_files() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is closed by now.
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def test_keys_of_shuffled_lines_group_them_by_task_id_range() -> None:
    first = 501
    task_ids = list(range(first, first + 3 * BUCKET_TASKS + 5))
    keys = StagingKeys()
    arrival = task_ids[:]
    random.Random(4).shuffle(arrival)
    key_of = {task_id: keys.key(first, task_id) for task_id in arrival}

    # Read back in key order (as the staging table stores them), the lines come bucket by
    # bucket, each holding exactly the next BUCKET_TASKS task ids...
    by_key = sorted(key_of, key=key_of.__getitem__)
    buckets = [
        sorted(by_key[start : start + BUCKET_TASKS])
        for start in range(0, len(by_key), BUCKET_TASKS)
    ]
    assert buckets == [
        task_ids[start : start + BUCKET_TASKS] for start in range(0, len(task_ids), BUCKET_TASKS)
    ]
    # ... and within a bucket in arrival order.
    first_bucket = set(buckets[0])
    assert by_key[:BUCKET_TASKS] == [t for t in arrival if t in first_bucket]


def test_keys_are_never_reused_across_batches_or_repeats_and_fit_sqlite() -> None:
    keys = StagingKeys()
    issued = [keys.key(1000, 3), keys.key(1000, 3), keys.key(1000, 1000 + 50 * BUCKET_TASKS)]
    issued += [keys.key(1, 3), keys.key(5000, 5001)]  # other batches, same staging database
    # A user's own huge ids (a snowflake id riding along with old small ones).
    issued += [keys.key(1, 2**62), keys.key(1, 2**63 - 1), keys.key(1, 2**63 - 1)]
    assert len(set(issued)) == len(issued)
    assert all(0 <= key < 2**63 for key in issued)
    assert issued[0] < issued[1] < issued[2]  # an id below the first shares bucket 0


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
    # A user's own id for one task, far beyond the others, in the same batch.
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO tasks (id, custom_id, params) VALUES (?, 'big', ?)", (2**62, PARAMS)
        )
    conn.close()
    local_id = await claim(store, "small", "big")
    assert await store.mark_created(local_id, api_batch("msgbatch_1", "ended"))

    report = await store.stage_results(local_id, [outcome("big"), outcome("small")])
    assert report.staged == 2
    applied = await store.apply_staged(local_id, 3, max_rows=10)
    assert applied is not None
    assert applied.report.written == 2
    assert query(db_path, "SELECT id, status FROM tasks ORDER BY id") == [
        (1, "succeeded"),
        (2**62, "succeeded"),
    ]


async def test_staging_heals_after_a_reset_that_stopped_halfway(
    store: Store, db_path: Path
) -> None:
    local_id = await ended_batch(store, db_path, ApiStub(), "msgbatch_1", "a")
    await store.database.writer.execute("DETACH DATABASE staging")  # as if the re-attach had failed
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
    await store.database.writer.execute(
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
