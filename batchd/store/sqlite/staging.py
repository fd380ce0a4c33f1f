"""Where each result line of a batch goes in the staging table, before it is applied.

The API streams a batch's results in any order. The store applies them in ranges of task
ids, so that each page of `tasks` is written once; reading the staged lines of a range
should not in turn hop over the whole staging table. So a staged line's key puts it in
the bucket of its task's id range: the lines of neighbouring tasks share a few staging
pages, which stay in the cache while their range is applied (bench/README.md).
"""

from __future__ import annotations

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
