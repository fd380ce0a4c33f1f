"""Usage, request sizes, result gaps and housekeeping on PostgreSQL: `PostgresStore.accounts`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime

from batchd.store.postgres import pruning
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, count_of, ids
from batchd.store.values import (
    ForgottenBatches,
    PendingFingerprint,
    PrunableTask,
    PruneExportPage,
    ResultGaps,
    SizeTotals,
    UsageTotals,
)

# As SQLite's: rows the chunker will refuse (no model, a custom_id the API would refuse)
# give a NULL model and 0 max_tokens instead of an SQL error. Bytes of params::text, the
# text a body is built from.
_REQUEST_SIZE_COLUMNS = """
    CASE WHEN jsonb_typeof(params->'model') = 'string'
              AND custom_id ~ '^[a-zA-Z0-9_-]{1,64}$'
         THEN params->>'model' END AS model,
    octet_length(params::text) AS request_bytes,
    CASE WHEN jsonb_typeof(params->'max_tokens') = 'number'
              AND params->>'max_tokens' ~ '^-?[0-9]{1,18}$'
         THEN (params->>'max_tokens')::bigint ELSE 0 END AS max_tokens"""
_SIZE_TOTALS = "model, count(*), sum(request_bytes)::bigint, sum(max_tokens)::bigint"
_FINISHED_BATCH_STATES = ["completed", "rejected", "lost"]


class PostgresAccounts:
    """Reads and writes about money, gaps and old rows, on the store's pool."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def usage_by_model(self, since_day: str | None = None) -> list[UsageTotals]:
        """Usage of succeeded results per model (the ledger), on or after `since_day`."""
        rows = await self._db.read(
            "SELECT model, sum(requests)::bigint, sum(input_tokens)::bigint,"
            " sum(output_tokens)::bigint, sum(cache_creation_input_tokens)::bigint,"
            " sum(cache_read_input_tokens)::bigint FROM usage_ledger"
            " WHERE $1::text IS NULL OR day >= $1::text::date GROUP BY model ORDER BY model",
            since_day or None,
        )
        return [UsageTotals(*row) for row in rows]

    async def kept_usage_by_model(self, kept_in: str) -> list[UsageTotals]:
        """Of the ledger, the usage of billed lines no task holds, kept in `kept_in`
        ('duplicate': duplicate_results, 'unmatched': unmatched_results), per model."""
        rows = await self._db.read(
            "SELECT model, count(*), sum(input_tokens)::bigint, sum(output_tokens)::bigint,"
            " sum(cache_creation_input_tokens)::bigint, sum(cache_read_input_tokens)::bigint"
            " FROM kept_line_usage WHERE kept_in = $1 GROUP BY model ORDER BY model",
            kept_in,
        )
        return [UsageTotals(*row) for row in rows]

    async def pending_sizes(self, limit: int | None = None) -> list[SizeTotals]:
        """Request sizes per model of pending tasks (the oldest `limit`, or all)."""
        rows = await self._db.read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE status = 'pending' ORDER BY id LIMIT $1) AS sized"
            " GROUP BY model ORDER BY model",
            limit,
        )
        return [SizeTotals(*row) for row in rows]

    async def task_sizes(self, task_ids: Sequence[int]) -> list[SizeTotals]:
        """Request sizes per model of exactly these tasks (a chunk about to be sent)."""
        rows = await self._db.read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE id = ANY($1::bigint[])) AS sized GROUP BY model ORDER BY model",
            ids(task_ids),
        )
        return [SizeTotals(*row) for row in rows]

    async def pending_fingerprint(self, limit: int) -> PendingFingerprint:
        """(count, min id, max id, sum of ids) of the oldest `limit` pending tasks (index only)."""
        row = await self._db.read_one(
            "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0), coalesce(sum(id), 0)"
            " FROM (SELECT id FROM tasks WHERE status = 'pending' ORDER BY id LIMIT $1) AS p",
            limit,
        )
        return PendingFingerprint(int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    async def batch_sizes(self, local_ids: Sequence[int]) -> dict[int, list[SizeTotals]]:
        """Request sizes per model of every task each batch carried, whatever became of it."""
        rows = await self._db.read(
            f"SELECT batch_id, {_SIZE_TOTALS} FROM (SELECT m.batch_id, {_REQUEST_SIZE_COLUMNS}"
            " FROM batch_tasks AS m JOIN tasks ON tasks.id = m.task_id"
            " WHERE m.batch_id = ANY($1::bigint[])) AS sized"
            " GROUP BY batch_id, model ORDER BY batch_id, model",
            ids(local_ids),
        )
        sizes: dict[int, list[SizeTotals]] = {local_id: [] for local_id in local_ids}
        for local_id, *size in rows:
            sizes[local_id].append(SizeTotals(*size))
        return sizes

    async def result_gaps(self) -> ResultGaps:
        """Result lines kept as unmatched, and requests requeued for want of a result."""
        row = await self._db.read_one(
            "SELECT (SELECT count(*) FROM unmatched_results),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'no_line'),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'archived')"
        )
        return ResultGaps(int(row[0]), int(row[1]), int(row[2]))

    async def iter_prunable(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[PrunableTask]]:
        """Final tasks completed before `cutoff`, oldest first (by completion time, then
        id), in pages, every column: paged by key on tasks_by_completion (`pruning`)."""
        async for page in pruning.prunable_rows(self._db, cutoff, page_size):
            yield page

    async def iter_prunable_ids(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncIterator[list[int]]:
        """The ids alone of `iter_prunable`, from the index: params and results not read."""
        async for page in pruning.prunable_ids(self._db, cutoff, page_size):
            yield page

    async def iter_prunable_export(
        self, cutoff: datetime, *, page_size: int = 5000
    ) -> AsyncGenerator[PruneExportPage, None]:
        """`iter_prunable` as export lines, built by the server (`pruning.export_pages`)."""
        async for page in pruning.export_pages(self._db, cutoff, page_size):
            yield page

    async def delete_prunable(
        self, cutoff: datetime, *, transaction_rows: int
    ) -> AsyncIterator[int]:
        """Delete the tasks of `iter_prunable_ids`, oldest first, each transaction finding
        and deleting the next `transaction_rows` of them; yields each one's count."""
        key: pruning.Key | None = None
        while True:
            deleted, key = await self._db.transact(
                pruning.delete_page, cutoff, key, transaction_rows
            )
            yield deleted
            if key is None:
                return

    async def delete_tasks(self, task_ids: Sequence[int], cutoff: datetime) -> int:
        """Delete these tasks, if they are still final and completed before `cutoff`."""
        return await self._db.transact(pruning.delete_ids, ids(task_ids), cutoff)

    async def forget_empty_batches(self) -> ForgottenBatches:
        """Drop batch_tasks rows of deleted tasks, then finished batches nothing refers to;
        one short transaction per batch. A batch named in duplicate_batches stays.

        Only batches that lost a task since they were last looked at (`batches_to_check`,
        filled by a statement trigger on every DELETE of tasks, migration 007): the cost
        follows what was deleted, not the history. A batch not finished yet stays to be
        looked at by a later prune."""
        finished = await self._db.read(
            "SELECT c.batch_id FROM batches_to_check AS c JOIN batches AS b ON b.id = c.batch_id"
            " WHERE b.state = ANY($1::text[]) ORDER BY c.batch_id",
            _FINISHED_BATCH_STATES,
        )
        links = batches = 0
        for (local_id,) in finished:
            links_gone, batch_gone = await self._db.transact(_forget_batch, local_id)
            links += links_gone
            batches += batch_gone
        await self._db.transact(_forget_vanished_checks)
        return ForgottenBatches(links, batches)

    async def storage_bytes(self) -> int:
        """Bytes batchd's tables take (with their indexes and TOAST), not the database's."""
        row = await self._db.read_one(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint"
            " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        )
        return int(row[0])

    async def reclaim_space(self) -> None:
        """Nothing: autovacuum makes the space of deleted rows reusable; giving it back to
        the filesystem (VACUUM FULL) locks `tasks` against users, an operator's decision."""
        self._db.check_writable()


async def _forget_batch(conn: Conn, local_id: int) -> tuple[int, int]:
    links = await conn.execute(
        "DELETE FROM batch_tasks WHERE batch_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = batch_tasks.task_id)",
        local_id,
    )
    batches = await conn.execute(
        "DELETE FROM batches WHERE id = $1"
        " AND NOT EXISTS (SELECT 1 FROM batch_tasks WHERE batch_id = $1)"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE batch_id = $1)"
        " AND NOT EXISTS (SELECT 1 FROM duplicate_batches WHERE local_id = $1)"
        " AND NOT EXISTS (SELECT 1 FROM duplicate_batches WHERE harvest_id = $1)",
        local_id,
    )
    await conn.execute("DELETE FROM batches_to_check WHERE batch_id = $1", local_id)
    return count_of(links), count_of(batches)


async def _forget_vanished_checks(conn: Conn) -> None:
    await conn.execute(
        "DELETE FROM batches_to_check AS c WHERE NOT EXISTS"
        " (SELECT 1 FROM batches AS b WHERE b.id = c.batch_id)"
    )
