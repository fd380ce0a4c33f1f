"""Where staged result lines go: one bucket per range of task ids, whatever the arrival
order; and the staging database itself, private to the daemon and gone with it."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

from batchd.staging import BUCKET_TASKS, StagingKeys
from batchd.store import Store
from tests.test_collector import ApiStub, ended_batch
from tests.test_store import outcome, query


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
    keys = StagingKeys(1, first)
    arrival = task_ids[:]
    random.Random(4).shuffle(arrival)
    key_of = {task_id: keys.key(task_id) for task_id in arrival}

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


def test_sparse_or_older_task_ids_still_get_distinct_ordered_keys() -> None:
    keys = StagingKeys(1, 1000)
    older, far = keys.key(3), keys.key(1000 + 50 * BUCKET_TASKS)
    again = keys.key(3)
    assert len({older, far, again}) == 3
    assert older < again < far  # an id below the first shares the first bucket


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
