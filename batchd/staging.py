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
_BUCKET_SHIFT = 32  # a bucket's lines are numbered below 2**32


class StagingKeys:
    """Staging keys for the lines of one batch, whose task ids start at `first_task_id`.

    A batch's tasks were claimed together, so their ids are mostly contiguous; where they
    are not (retries of older tasks ride along), buckets are merely emptier.
    """

    def __init__(self, local_id: int, first_task_id: int) -> None:
        self.local_id = local_id
        self._first = first_task_id
        self._next: dict[int, int] = {}

    def key(self, task_id: int) -> int:
        """A new key for a line of `task_id`: after every earlier one of its bucket."""
        bucket = max(task_id - self._first, 0) // BUCKET_TASKS
        number = self._next.get(bucket, 0)
        self._next[bucket] = number + 1
        return (bucket << _BUCKET_SHIFT) | number
