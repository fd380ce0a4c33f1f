"""`batchd prune` deletes in transactions of several pages (issue 16: fewer synced commits),
never a task whose export line is not yet written; an export reads the next transaction's
pages while a delete runs, never more than that transaction ahead (its ids in memory);
without an export each transaction finds and deletes its own tasks; on both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.cli import prune as prune_module
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.store import add_tasks
from tests.support.waiting import eventually

pytestmark = pytest.mark.both_stores

OLD = "2026-01-01T00:00:00.000Z"


async def test_prune_deletes_pages_in_larger_transactions_after_their_export(
    store: Store, peek: Peek, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prune_module, "_PAGE", 3)
    monkeypatch.setattr(prune_module, "_DELETE_ROWS", 7)
    await add_tasks(store, *[f"t{n:02d}" for n in range(25)])
    peek.execute(f"UPDATE tasks SET status = 'succeeded', result = '{{}}', completed_at = '{OLD}'")
    export_path = tmp_path / "pruned.jsonl"
    accounts = store.accounts
    real_delete = accounts.delete_tasks
    transactions: list[int] = []

    async def delete_tasks(task_ids: Sequence[int], cutoff: datetime) -> int:
        transactions.append(len(task_ids))
        # Every task deleted now is in the file already (flushed, then synced).
        on_disk = {
            orjson.loads(line)["custom_id"] for line in export_path.read_bytes().splitlines()
        }
        doomed = {name for name, id_ in peek.query("SELECT custom_id, id FROM tasks")
                  if id_ in set(task_ids)}  # fmt: skip
        assert len(doomed) == len(task_ids)
        assert doomed <= on_disk
        assert len(on_disk) == sum(transactions)  # not more: a transaction's pages
        return await real_delete(task_ids, cutoff)

    monkeypatch.setattr(accounts, "delete_tasks", delete_tasks)
    with prune_module.open_export(export_path) as out:
        report = await prune_module.prune(
            store, datetime(2026, 6, 1, tzinfo=UTC), export=out, vacuum=False
        )
    # The first two pages of 3 at once, then pages gathered until 7 ids or more: 9, 9,
    # then the last one.
    assert transactions == [6, 9, 9, 1]
    assert report.deleted == 25
    assert peek.query("SELECT count(*) FROM tasks") == [(0,)]
    lines = export_path.read_bytes().splitlines()
    assert [orjson.loads(line)["custom_id"] for line in lines] == [f"t{n:02d}" for n in range(25)]


async def test_an_export_reads_on_while_a_delete_runs_never_a_transaction_further(
    store: Store, peek: Peek, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each delete waits until the export has read a page of the next transaction (a
    prune reading and deleting in turn would never get there: the wait fails), then
    lets the reads run on: they stop at the end of that transaction, its ids waiting
    for this delete to finish."""
    monkeypatch.setattr(prune_module, "_PAGE", 3)
    monkeypatch.setattr(prune_module, "_DELETE_ROWS", 7)
    await add_tasks(store, *[f"t{n:02d}" for n in range(25)])
    peek.execute(f"UPDATE tasks SET status = 'succeeded', result = '{{}}', completed_at = '{OLD}'")
    accounts = store.accounts
    real_pages, real_delete = accounts.iter_prunable_export, accounts.delete_tasks
    pages_read: list[int] = []
    pages_during: list[int] = []

    async def iter_prunable_export(cutoff: datetime, *, page_size: int) -> AsyncIterator[Any]:
        async for page in real_pages(cutoff, page_size=page_size):
            pages_read.append(len(page.task_ids))
            yield page

    async def delete_tasks(task_ids: Sequence[int], cutoff: datetime) -> int:
        before = len(pages_read)
        following = min(3, 9 - before)  # 25 tasks: 8 pages of 3, then 1
        if following:  # a transaction follows: its pages are read meanwhile
            await eventually(
                lambda: len(pages_read) - before >= following,
                "the next pages read during a delete",
                10,
            )
        await asyncio.sleep(0.2)  # room for reads past the next transaction, if any were made
        pages_during.append(len(pages_read) - before)
        return await real_delete(task_ids, cutoff)

    monkeypatch.setattr(accounts, "iter_prunable_export", iter_prunable_export)
    monkeypatch.setattr(accounts, "delete_tasks", delete_tasks)
    with prune_module.open_export(tmp_path / "pruned.jsonl") as out:
        report = await prune_module.prune(
            store, datetime(2026, 6, 1, tzinfo=UTC), export=out, vacuum=False
        )
    assert report.deleted == report.exported == 25
    # Transactions of 2 pages (6 ids), then 3 pages (9, 9), then the last page (1 id): the
    # next one's pages read during each delete, never more.
    assert pages_during == [3, 3, 1, 0]
    assert peek.query("SELECT count(*) FROM tasks") == [(0,)]


async def test_prune_without_export_finds_and_deletes_each_transactions_tasks(
    store: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oldest first, `_DELETE_ROWS` a transaction, nothing read or deleted twice; a task
    finished since the cutoff, pending or retried (no time) stays."""
    monkeypatch.setattr(prune_module, "_DELETE_ROWS", 7)
    await add_tasks(store, *[f"t{n:02d}" for n in range(30)])
    # Completion times out of id order: the oldest go first, ties by id.
    for n in range(25):
        peek.execute(
            f"UPDATE tasks SET status = 'succeeded', completed_at = '2026-0{1 + n % 3}-01"
            f"T00:00:00.000Z' WHERE custom_id = 't{n:02d}'"
        )
    peek.execute("UPDATE tasks SET status = 'errored', completed_at = '2026-09-01T00:00:00.000Z'"
                 " WHERE custom_id IN ('t25', 't26')")  # fmt: skip
    accounts = store.accounts
    real = accounts.delete_prunable
    transactions: list[int] = []
    gone: list[str] = []

    async def delete_prunable(cutoff: datetime, *, transaction_rows: int) -> AsyncIterator[int]:
        before = {row[0] for row in peek.query("SELECT custom_id FROM tasks")}
        async for count in real(cutoff, transaction_rows=transaction_rows):
            transactions.append(count)
            after = {row[0] for row in peek.query("SELECT custom_id FROM tasks")}
            gone.extend(sorted(before - after, key=lambda name: (int(name[1:]) % 3, name)))
            before = after
            yield count

    monkeypatch.setattr(accounts, "delete_prunable", delete_prunable)
    report = await prune_module.prune(store, datetime(2026, 6, 1, tzinfo=UTC), vacuum=False)
    assert transactions == [7, 7, 7, 4]
    assert report.deleted == 25
    # By completion time (January: n % 3 == 0, then February, then March), then id.
    assert gone == sorted((f"t{n:02d}" for n in range(25)), key=lambda c: (int(c[1:]) % 3, c))
    left = sorted(row[0] for row in peek.query("SELECT custom_id FROM tasks"))
    assert left == [f"t{n:02d}" for n in range(25, 30)]
