"""`batchd prune`: remove finished tasks completed before a cutoff, then vacuum.

Only final tasks (succeeded, errored, expired, canceled, invalid) with a `completed_at`
before the cutoff go; pending and submitted ones never do, and each delete re-checks
that, so a task retried meanwhile stays. Tasks go a page at a time, by id; with an export
file each page is written and synced before it is deleted: a crash can leave exported
tasks undeleted (pruned on the next run, exported again), never deleted tasks unexported.
Spending survives in the usage ledger (migration 003), so costs and budgets do not change
when tasks are pruned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.store import PrunableTask, Store, StoreAccounts

_PAGE = 5000
# Tasks deleted per transaction. Each commit is synced (with an export, the export file
# before it), and every transaction rewrites the index pages its deletes share with the
# next one: 20 transactions of 5,000 held prune to ~96,000 rows/s at 2,000,000 tasks.
# Larger ones hold the write lock longer, which users' INSERTs wait out (busy_timeout);
# 25,000 deletes take ~0.2 s.
_DELETE_ROWS = 25_000
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
    deleted = exported = 0
    # A page at a time, by id: memory holds a page (and the ids of one transaction)
    # whatever the database holds. With an export, the pages of a transaction are written
    # and synced before they are deleted.
    doomed: list[int] = []
    if export is None:
        async for task_ids in accounts.iter_prunable_ids(cutoff, page_size=_PAGE):
            doomed += task_ids  # params never read
            if len(doomed) >= _DELETE_ROWS:
                deleted += await accounts.delete_tasks(doomed, cutoff)
                doomed = []
    else:
        async for rows in accounts.iter_prunable(cutoff, page_size=_PAGE):
            export.write(b"".join(orjson.dumps(export_line(row)) + b"\n" for row in rows))
            exported += len(rows)
            doomed += [row[0] for row in rows]
            if len(doomed) >= _DELETE_ROWS:
                deleted += await _synced_delete(accounts, export, doomed, cutoff)
                doomed = []
    if doomed:
        deleted += await _synced_delete(accounts, export, doomed, cutoff)
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


async def _synced_delete(
    accounts: StoreAccounts, export: IO[bytes] | None, task_ids: list[int], cutoff: datetime
) -> int:
    """Delete these tasks, once what the export holds of them is on disk."""
    if export is not None:
        export.flush()
        os.fsync(export.fileno())
    return await accounts.delete_tasks(task_ids, cutoff)


def export_line(row: PrunableTask) -> dict[str, Any]:
    """A pruned task as a results line: `custom_id` and `result` first, as the API writes
    them, then what else the row held, so the export loses nothing."""
    (_, custom_id, status, result, error, params, model, *tokens, created, completed) = row
    return {
        "custom_id": custom_id,
        "result": None if result is None else _json(result),
        "status": status,
        "error": error,
        "model": model,
        "usage": None
        if tokens[0] is None
        else dict(
            zip(
                (
                    "input_tokens",
                    "output_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ),
                tokens,
                strict=True,
            )
        ),
        "created_at": created,
        "completed_at": completed,
        "params": _json(params),
    }


def _json(text: str) -> Any:
    # Parsed, not spliced: invalid tasks may hold params that are not JSON (kept as a
    # string), and a line of the export must stay valid JSON whatever a user stored.
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def open_export(path: Path) -> IO[bytes]:
    """A new file: never overwrite an earlier export (it may be the only copy)."""
    return path.open("xb")
