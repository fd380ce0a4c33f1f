"""Where each result line of a batch goes in the staging table, before it is applied.

The API streams a batch's results in any order. The store applies them in ranges of task
ids, so that each page of `tasks` is written once; reading the staged lines of a range
should not in turn hop over the whole staging table. So a staged line's key puts it in
the bucket of its task's id range: the lines of neighbouring tasks share a few staging
pages, which stay in the cache while their range is applied (bench/README.md).

A key is `bucket << NUMBER_BITS | number`: the store computes the bucket in SQL from the
task id it finds for the line (so that staging is one statement per many lines, never a
Python round trip per line); the numbers come from here.
"""

from __future__ import annotations

# Task ids per bucket: their staged lines (~1 KB each) take about a MB of staging pages,
# the buckets of a range being applied fit in the staging cache (store.py).
BUCKET_TASKS = 1024
NUMBER_BITS = 32  # a line's number is below 2**32
# Keys stay below 2**63 (SQLite's integers) whatever the ids: tasks further than this many
# buckets past the batch's first task (a user's own huge ids) share the last bucket.
LAST_BUCKET = 2**31 - 1


class StagingNumbers:
    """Numbers for staged lines, in arrival order, unique for the life of one staging
    database: lines of several batches, or of a chunk rolled back, never share a key."""

    def __init__(self) -> None:
        self._next = 0

    def reserve(self, count: int) -> int:
        """The first of `count` new numbers."""
        first = self._next
        if first + count > 2**NUMBER_BITS:
            # ~4 billion lines without a reset: the store resets staging for each download.
            raise OverflowError("staging line numbers exhausted; reset the staging database")
        self._next = first + count
        return first
