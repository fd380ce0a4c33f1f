"""Usage, request sizes, result gaps and housekeeping (issue 7): `SqliteStore.accounts`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from batchd.store.sqlite import pruning
from batchd.store.sqlite.database import (
    Db,
    Row,
    SqliteDatabase,
    format_time,
    json_list,
    run,
    run_in,
)
from batchd.store.values import (
    ForgottenBatches,
    PendingFingerprint,
    PrunableTask,
    PruneExportPage,
    ResultGaps,
    SizeTotals,
    UsageTotals,
)

# Read from the params text without trusting it: rows the chunker will refuse (bad JSON,
# no model, a custom_id the API would refuse) give a NULL model and 0 max_tokens instead
# of an SQL error, so a row about to be marked invalid never holds up a budget.
_REQUEST_SIZE_COLUMNS = """
    CASE WHEN json_valid(params) AND json_type(params, '$.model') = 'text'
              AND typeof(custom_id) = 'text' AND length(custom_id) BETWEEN 1 AND 64
              AND custom_id NOT GLOB '*[^a-zA-Z0-9_-]*'
         THEN json_extract(params, '$.model') END AS model,
    length(CAST(params AS BLOB)) AS request_bytes,
    CASE WHEN json_valid(params) AND json_type(params, '$.max_tokens') = 'integer'
         THEN json_extract(params, '$.max_tokens') ELSE 0 END AS max_tokens"""
_SIZE_TOTALS = "model, count(*), sum(request_bytes), sum(max_tokens)"
_FINISHED_BATCH_STATES = ("completed", "rejected", "lost")


class SqliteAccounts:
    """Reads and writes about money, gaps and old rows, on the store's own connections
    (the same reader, writer lock and shielded transactions as every other statement)."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database

    async def usage_by_model(self, since_day: str | None = None) -> list[UsageTotals]:
        """Usage of succeeded results per model (the ledger), on or after `since_day`."""
        rows = await self._db.read(
            "SELECT model, sum(requests), sum(input_tokens), sum(output_tokens),"
            " sum(cache_creation_input_tokens), sum(cache_read_input_tokens)"
            " FROM usage_ledger WHERE day >= ? GROUP BY model ORDER BY model",
            (since_day or "",),
        )
        return [UsageTotals(*row) for row in rows]

    async def kept_usage_by_model(self, kept_in: str) -> list[UsageTotals]:
        """Of the ledger, the usage of billed lines no task holds, kept in `kept_in`
        ('duplicate': duplicate_results, 'unmatched': unmatched_results), per model."""
        rows = await self._db.read(
            "SELECT model, count(*), sum(input_tokens), sum(output_tokens),"
            " sum(cache_creation_input_tokens), sum(cache_read_input_tokens)"
            " FROM kept_line_usage WHERE kept_in = ? GROUP BY model ORDER BY model",
            (kept_in,),
        )
        return [UsageTotals(*row) for row in rows]

    async def pending_sizes(self, limit: int | None = None) -> list[SizeTotals]:
        """Request sizes per model of pending tasks (the oldest `limit`, or all)."""
        rows = await self._db.read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE status = 'pending' ORDER BY id LIMIT ?) GROUP BY model ORDER BY model",
            (-1 if limit is None else limit,),
        )
        return [SizeTotals(*row) for row in rows]

    async def task_sizes(self, task_ids: Sequence[int]) -> list[SizeTotals]:
        """Request sizes per model of exactly these tasks (a chunk about to be sent)."""
        rows = await self._db.read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE id IN (SELECT value FROM json_each(?))) GROUP BY model ORDER BY model",
            (json_list(task_ids),),
        )
        return [SizeTotals(*row) for row in rows]

    async def pending_fingerprint(self, limit: int) -> PendingFingerprint:
        """(count, min id, max id, sum of ids) of the oldest `limit` pending tasks (index only)."""
        rows = await self._db.read(
            "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0), coalesce(sum(id), 0)"
            " FROM (SELECT id FROM tasks WHERE status = 'pending' ORDER BY id LIMIT ?)",
            (limit,),
        )
        count, low, high, total = rows[0]
        return PendingFingerprint(int(count), int(low), int(high), int(total))

    async def batch_sizes(self, local_ids: Sequence[int]) -> dict[int, list[SizeTotals]]:
        """Request sizes per model of every task each batch carried, whatever became of it."""
        rows = await self._db.read(
            f"SELECT batch_id, {_SIZE_TOTALS} FROM (SELECT m.batch_id, {_REQUEST_SIZE_COLUMNS}"
            " FROM batch_tasks AS m JOIN tasks ON tasks.id = m.task_id"
            " WHERE m.batch_id IN (SELECT value FROM json_each(?)))"
            " GROUP BY batch_id, model ORDER BY batch_id, model",
            (json_list(local_ids),),
        )
        sizes: dict[int, list[SizeTotals]] = {local_id: [] for local_id in local_ids}
        for local_id, *size in rows:
            sizes[local_id].append(SizeTotals(*size))
        return sizes

    async def result_gaps(self) -> ResultGaps:
        """Result lines kept as unmatched, and requests requeued for want of a result."""
        rows = await self._db.read(
            "SELECT (SELECT count(*) FROM unmatched_results),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'no_line'),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'archived')"
        )
        unmatched, missing, archived = rows[0]
        return ResultGaps(int(unmatched), int(missing), int(archived))

    async def iter_prunable(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[PrunableTask]]:
        """Final tasks completed before `cutoff`, oldest first (by completion time, then
        id), in pages, every column: paged by key on tasks_by_completion (`pruning`)."""
        async for page in pruning.prunable_rows(self._read, format_time(cutoff), page_size):
            yield page

    async def iter_prunable_ids(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[int]]:
        """The ids alone of `iter_prunable`, from the index: params and results not read."""
        async for page in pruning.prunable_ids(self._read, format_time(cutoff), page_size):
            yield page

    async def iter_prunable_export(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncGenerator[PruneExportPage, None]:
        """`iter_prunable` as export lines, built in SQL (`pruning.export_pages`)."""
        async for page in pruning.export_pages(self._read, format_time(cutoff), page_size):
            yield page

    async def delete_prunable(
        self, cutoff: datetime, *, transaction_rows: int
    ) -> AsyncIterator[int]:
        """Delete the tasks of `iter_prunable_ids`, oldest first, each transaction finding
        and deleting the next `transaction_rows` of them; yields each one's count."""
        text = format_time(cutoff)
        key: pruning.Key | None = None
        while True:
            deleted, key = await self._db.transact(pruning.delete_page, text, key, transaction_rows)
            yield deleted
            if key is None:
                return

    async def delete_tasks(self, task_ids: Sequence[int], cutoff: datetime) -> int:
        """Delete these tasks, if they are still final and completed before `cutoff`."""
        return await self._db.transact(pruning.delete_ids, json_list(task_ids), format_time(cutoff))

    async def _read(self, sql: str, named: dict[str, Any]) -> list[Row]:
        return await self._db.read(sql, named)

    async def forget_empty_batches(self) -> ForgottenBatches:
        """Drop batch_tasks rows of deleted tasks, then finished batches nothing refers to.

        Only batches that lost a task since they were last looked at (`batches_to_check`,
        filled by a trigger on every DELETE of a task, migration 007): the cost follows
        what was deleted, not the history. One short transaction per batch, so users'
        INSERTs never wait long. A batch named in duplicate_batches stays: that report
        must survive. A batch not finished yet stays to be looked at by a later prune.
        """
        finished = await self._db.read(
            "SELECT c.batch_id FROM batches_to_check AS c JOIN batches AS b ON b.id = c.batch_id"
            " WHERE b.state IN (SELECT value FROM json_each(?)) ORDER BY c.batch_id",
            (json_list(_FINISHED_BATCH_STATES),),
        )
        links = batches = 0
        for (local_id,) in finished:
            links_gone, batch_gone = await self._db.transact(_forget_batch, local_id)
            links += links_gone
            batches += batch_gone
        await self._db.transact(
            run_in,
            "DELETE FROM batches_to_check WHERE batch_id NOT IN (SELECT id FROM batches)",
            (),
        )
        return ForgottenBatches(links, batches)

    async def storage_bytes(self) -> int:
        """The main file's size as SQLite counts it (pages x page size)."""
        rows = await self._db.read(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        )
        return int(rows[0][0])

    async def reclaim_space(self) -> None:
        """VACUUM: rewrite the file without its free pages.

        VACUUM cannot run inside a transaction, so not through `transact`: it runs on the
        writer connection under the store's lock, so no write of this process interleaves,
        and it waits for another process's write lock under busy_timeout like any writer.
        With `temp_store = MEMORY` VACUUM would build the whole copy in RAM: the copy goes
        to a temporary file for the duration, whatever the connection uses otherwise.
        """
        async with self._db.exclusive_writer("vacuum") as writer:
            rows = await writer.execute_fetchall("PRAGMA temp_store")
            previous = int(next(iter(rows))[0])
            await writer.execute("PRAGMA temp_store = FILE")
            try:
                await writer.execute("VACUUM")
            finally:
                await writer.execute(f"PRAGMA temp_store = {previous}")


async def _forget_batch(db: Db, local_id: int) -> tuple[int, int]:
    links = await run(
        db,
        "DELETE FROM batch_tasks WHERE batch_id = ?"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = batch_tasks.task_id)",
        (local_id,),
    )
    batches = await run(
        db,
        "DELETE FROM batches WHERE id = :id"
        " AND NOT EXISTS (SELECT 1 FROM batch_tasks WHERE batch_id = :id)"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE batch_id = :id)"
        " AND NOT EXISTS (SELECT 1 FROM duplicate_batches WHERE local_id = :id)"
        " AND NOT EXISTS (SELECT 1 FROM duplicate_batches WHERE harvest_id = :id)",
        {"id": local_id},
    )
    await db.execute("DELETE FROM batches_to_check WHERE batch_id = ?", (local_id,))
    return links, batches
