"""The store's housekeeping side as the rest of batchd sees it (`store.accounts`): usage
and sizes for the money features, result gaps, and prune's reads and deletes of old rows.
The contract every method keeps is interface.py's (one write, one transaction; flat in
history)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

from batchd.store.values import (
    ForgottenBatches,
    PendingFingerprint,
    PrunableTask,
    PruneExportPage,
    ResultGaps,
    SizeTotals,
    UsageTotals,
)


class StoreAccounts(Protocol):
    """Reads and writes about money, result gaps and old rows (`store.accounts`)."""

    async def usage_by_model(self, since_day: str | None = None) -> list[UsageTotals]:
        """Usage of succeeded results per model (the ledger), on or after `since_day`."""

    async def kept_usage_by_model(self, kept_in: str) -> list[UsageTotals]:
        """Of the ledger, the usage of billed lines no task holds, kept in `kept_in`
        ('duplicate': duplicate_results, 'unmatched': unmatched_results), per model."""

    async def pending_sizes(self, limit: int | None = None) -> list[SizeTotals]:
        """Request sizes per model of pending tasks (the oldest `limit`, or all)."""

    async def task_sizes(self, task_ids: Sequence[int]) -> list[SizeTotals]:
        """Request sizes per model of exactly these tasks (a chunk about to be sent)."""

    async def pending_fingerprint(self, limit: int) -> PendingFingerprint:
        """A cheap fingerprint of the oldest `limit` pending tasks."""

    async def batch_sizes(self, local_ids: Sequence[int]) -> dict[int, list[SizeTotals]]:
        """Request sizes per model of every task each batch carried, whatever became of it."""

    async def result_gaps(self) -> ResultGaps:
        """Result lines kept as unmatched, and requests requeued for want of a result."""

    def iter_prunable(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[PrunableTask]]:
        """Final tasks completed before `cutoff`, oldest first (completion time, then id),
        in pages, paged by key on tasks_by_completion: only entries before the cutoff read
        (see "Flat costs"). Deleting a page before the next is read is safe."""

    def iter_prunable_ids(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[int]]:
        """The ids of `iter_prunable` from the index alone, without reading params or
        results (the status is not read: batchd clears the time of a task it retries)."""

    def iter_prunable_export(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncGenerator[PruneExportPage, None]:
        """`iter_prunable` as export lines (`batchd/store/prunelines.py`), built by the
        database with the stored texts spliced wherever the line stays valid JSON. A
        generator: a caller that stops early closes it (`aclose`), which ends the reads
        in flight and gives their connections back at once."""

    def delete_prunable(self, cutoff: datetime, *, transaction_rows: int) -> AsyncIterator[int]:
        """Delete the tasks `iter_prunable_ids` gives, each transaction finding and
        deleting the next `transaction_rows` of them (each still final and before the
        cutoff); yields each transaction's count."""

    async def delete_tasks(self, task_ids: Sequence[int], cutoff: datetime) -> int:
        """Delete these tasks if still final and completed before `cutoff` (one transaction)."""

    async def forget_empty_batches(self) -> ForgottenBatches:
        """Drop links of deleted tasks, then finished batches nothing refers to (one short
        transaction per batch). A batch named in duplicate_batches stays. Looks only at
        batches that lost a task since last looked at (flat in history: migration 007)."""

    async def storage_bytes(self) -> int:
        """Bytes the database takes (SQLite: its main file's pages)."""

    async def reclaim_space(self) -> None:
        """Give the space of deleted rows back (SQLite: VACUUM; a server database may do
        nothing here and leave it to its own maintenance)."""
