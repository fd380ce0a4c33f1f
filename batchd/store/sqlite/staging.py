"""Where each result line of a batch goes in the staging table, before it is applied.

The API streams a batch's results in any order. The store applies them in ranges of task
ids, so that each page of `tasks` is written once; reading the staged lines of a range
should not in turn hop over the whole staging table. So a staged line's key puts it in
the bucket of its task's id range: the lines of neighbouring tasks share a few staging
pages, which stay in the cache while their range is applied (bench/README.md).
"""

from __future__ import annotations

from batchd.store.sqlite.database import PAGE_SIZE, Db

# Task ids per bucket: their staged lines (~1 KB each) take about a MB of staging pages,
# the buckets of a range being applied fit in the staging cache (store.py).
BUCKET_TASKS = 1024
_NUMBER_BITS = 32  # a bucket's lines are numbered below 2**32
# Keys stay below 2**63 (SQLite's integers) whatever the ids: tasks further than this many
# buckets past the batch's first task (a user's own huge ids) share the last bucket.
LAST_BUCKET = 2**31 - 1


class StagingKeys:
    """Keys for staged lines, unique for the life of one staging database.

    The numbers within a bucket are never reused until the staging database is replaced
    by an empty one, so lines of several batches, or of a chunk rolled back, never share
    a key. `first_task_id` places a batch's tasks in buckets: a batch's tasks were claimed
    together, so their ids are mostly contiguous; where they are not (retries of older
    tasks ride along) buckets are merely emptier.
    """

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def key(self, first_task_id: int, task_id: int) -> int:
        """A new key for a line of `task_id`: after every earlier one of its bucket."""
        bucket = min(max(task_id - first_task_id, 0) // BUCKET_TASKS, LAST_BUCKET)
        number = self._next.get(bucket, 0)
        self._next[bucket] = number + 1
        return (bucket << _NUMBER_BITS) | number


# Where the staged lines of a batch wait: a private database ATTACHed to each connection
# that writes back (the lanes; the writer for `write_results`) as `staging` from '' (a
# temporary file SQLite creates 0600 and unlinks as it opens it; no RAM for it), never in
# the database file or its WAL. Staging takes no write lock and no
# fsync; a crash loses it, which is harmless: the batch is still `ended` and its results
# are downloaded and staged again. Clearing it is a DETACH (the file is dropped whole): a
# DELETE of a TEMP table walked every page of a batch's lines (0.2 s per 100,000).
# A transaction applies a contiguous range of task ids, whose rows share pages of `tasks`,
# instead of a shuffled chunk that touches every page (bench/README.md). Rows are keyed by
# the bucket of their task id (above), appended within it in arrival order, and found
# by the task_id index: keying the table by task_id itself made staging 5x slower
# (shuffled inserts of ~1 KB rows split its pages), keying it by arrival made the apply
# read a random staging page per line. One batch is staged at a time (the collector
# clears it first).
_CREATE_STAGING = """
CREATE TABLE IF NOT EXISTS staging.results (
    seq INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL UNIQUE,
    batch_id INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    result_type TEXT NOT NULL,
    result_json TEXT NOT NULL,
    error TEXT,
    retryable INTEGER NOT NULL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cache_creation_input_tokens INTEGER,
    cache_read_input_tokens INTEGER,
    model TEXT
)"""
STAGING_ATTACHED = "SELECT 1 FROM pragma_database_list WHERE name = 'staging'"


async def attach_staging(db: Db) -> None:
    """Attach an empty staging database; outside any transaction."""
    await db.execute("ATTACH DATABASE '' AS staging")
    # Before its first table, pages as large as the main file's: staging ~1 KB rows into
    # 4 KB pages took ~30% longer.
    await db.execute(f"PRAGMA staging.page_size = {PAGE_SIZE}")
    # Room for the buckets of a range or two of task ids being applied.
    await db.execute("PRAGMA staging.cache_size = -8192")
    # Disposable: no fsync; the rollback journal of a chunk's few pages kept in memory.
    await db.execute("PRAGMA staging.synchronous = OFF")
    await db.execute("PRAGMA staging.journal_mode = MEMORY")
    await db.execute(_CREATE_STAGING)
