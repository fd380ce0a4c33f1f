"""`batchd prune`: remove finished tasks completed before a cutoff, then vacuum.

Only final tasks (succeeded, errored, expired, canceled, invalid) with a `completed_at`
before the cutoff go; pending and submitted ones never do, and each delete re-checks
that, so a task retried meanwhile stays. Tasks go oldest first, paged by key on their
completion time; with an export file each page is written and synced before it is
deleted: a crash can leave exported tasks undeleted (pruned on the next run, exported
again), never deleted tasks unexported. Spending survives in the usage ledger (migration
003), so costs and budgets do not change when tasks are pruned.

The store builds the export lines in SQL, splicing the stored JSON texts
(`batchd/store/prunelines.py`), and each transaction's delete runs while the next one's
lines are read and written (two connections); without an export each transaction finds
and deletes its tasks in one go, and params and results are never read.
"""

from __future__ import annotations

import asyncio
import os
import re
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from batchd.crashpoints import crash_point
from batchd.store import Store, StoreAccounts

# Export lines read per page: a page is held as rows, then as one text and its bytes;
# 5,000 lines of ~1.7 KB peaked at 152-164 MB, 2,000 at 110-113 MB (116-119 MB before the
# lines were built in SQL), and cost no more CPU (bench/README.md, "Session 6: prune").
_PAGE = 2000
# Tasks deleted per transaction. Each commit is synced (with an export, the export file
# before it), and every transaction rewrites the index pages its deletes share with the
# next one: 20 transactions of 5,000 held prune to ~96,000 rows/s at 2,000,000 tasks.
# Larger ones hold the write lock longer, which users' INSERTs wait out (busy_timeout);
# 25,000 deletes take ~0.2 s.
_DELETE_ROWS = 25_000
# An export's first delete is of its first two pages: the deletes are the longer part, and
# they start at once instead of after 25,000 lines (bench/README.md, "Session 8: prune").
_FIRST_DELETE_PAGES = 2
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DurationError(ValueError):
    """A duration that is not like 30d, 12h, 2w."""


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s`: a whole number and one unit."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise DurationError(f"{text!r}: expected a number and a unit (s, m, h, d, w), like 30d")
    return timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])


@dataclass(frozen=True, slots=True)
class PruneReport:
    cutoff: datetime
    deleted: int
    exported: int
    batch_links_deleted: int
    batches_deleted: int
    bytes_before: int
    bytes_after: int
    vacuumed: bool


async def prune(
    store: Store,
    cutoff: datetime,
    *,
    export: IO[bytes] | None = None,
    vacuum: bool = True,
) -> PruneReport:
    """Delete final tasks completed before `cutoff` (exporting them first), then vacuum."""
    accounts = store.accounts
    bytes_before = await accounts.storage_bytes()
    exported = 0
    if export is None:
        deleted = 0
        async for count in accounts.delete_prunable(cutoff, transaction_rows=_DELETE_ROWS):
            deleted += count
    else:
        exported, deleted = await _export_then_delete(accounts, cutoff, export)
    links, batches = await accounts.forget_empty_batches()
    if vacuum:
        await accounts.reclaim_space()
    return PruneReport(
        cutoff=cutoff,
        deleted=deleted,
        exported=exported,
        batch_links_deleted=links,
        batches_deleted=batches,
        bytes_before=bytes_before,
        bytes_after=await accounts.storage_bytes(),
        vacuumed=vacuum,
    )


async def _export_then_delete(
    accounts: StoreAccounts, cutoff: datetime, export: IO[bytes]
) -> tuple[int, int]:
    """Write each page's lines, and delete their tasks a transaction at a time once the
    file holds them on disk: (exported, deleted). Memory holds a page and the ids of two
    transactions (one being deleted), whatever the database holds."""
    exported = 0
    deletes = _DeletesBehind(accounts, cutoff, export)
    try:
        doomed: list[int] = []
        batch = _FIRST_DELETE_PAGES * _PAGE
        # Closed at once on an error here (a full disk, a failed delete): PostgreSQL's pages
        # in flight are abandoned and their connections go back to the pool now, not when
        # the generator is collected.
        pages = aclosing(accounts.iter_prunable_export(cutoff, page_size=_PAGE))
        async with pages as exported_pages:
            async for page in exported_pages:
                export.write(page.lines)
                exported += len(page.task_ids)
                doomed += page.task_ids
                if len(doomed) >= batch:
                    await deletes.start(doomed)
                    doomed, batch = [], _DELETE_ROWS
        if doomed:
            await deletes.start(doomed)
    finally:
        deleted = await deletes.finish()
    return exported, deleted


class _DeletesBehind:
    """An export's delete transactions, each running while the next one's lines are read
    and written: the reads and the deletes go on two connections (SQLite's reader and
    writer threads, two PostgreSQL sessions), so neither waits for the other. One delete
    at a time: SQLite has one writer, and on PostgreSQL two would queue on the same count
    rows in their triggers."""

    def __init__(self, accounts: StoreAccounts, cutoff: datetime, export: IO[bytes]) -> None:
        self._accounts = accounts
        self._cutoff = cutoff
        self._export = export
        self._running: asyncio.Task[int] | None = None
        self._deleted = 0

    async def start(self, task_ids: list[int]) -> None:
        """Delete these tasks once what the file holds of them is on disk (synced while
        the previous delete runs) and the previous delete is done."""
        self._export.flush()
        await asyncio.to_thread(os.fsync, self._export.fileno())
        await self._wait()
        crash_point("prune_exported")
        self._running = asyncio.create_task(self._accounts.delete_tasks(task_ids, self._cutoff))

    async def finish(self) -> int:
        """The tasks deleted, once the last delete is done (even if a read failed: its
        tasks were exported and synced before it began)."""
        await self._wait()
        return self._deleted

    async def _wait(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            self._deleted += await running


def open_export(path: Path) -> IO[bytes]:
    """A new file: never overwrite an earlier export (it may be the only copy)."""
    return path.open("xb")
