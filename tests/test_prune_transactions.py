"""`batchd prune` deletes in transactions of several pages (issue 16: fewer synced commits),
never a task whose export line is not yet written, and never more than a transaction's
ids in memory; on both stores."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from batchd.cli import prune as prune_module
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.store import add_tasks

pytestmark = pytest.mark.both_stores

OLD = "2026-01-01T00:00:00.000Z"


@pytest.mark.parametrize("export", [True, False])
async def test_prune_deletes_pages_in_larger_transactions_after_their_export(
    store: Store, peek: Peek, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export: bool
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
        if export:  # every task deleted now is in the file already (flushed, then synced)
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
    cutoff = datetime(2026, 6, 1, tzinfo=UTC)
    if export:
        with prune_module.open_export(export_path) as out:
            report = await prune_module.prune(store, cutoff, export=out, vacuum=False)
    else:
        report = await prune_module.prune(store, cutoff, vacuum=False)
    # Pages of 3 gathered until 7 ids or more: 9, 9, then the last 7.
    assert transactions == [9, 9, 7]
    assert report.deleted == 25
    assert peek.query("SELECT count(*) FROM tasks") == [(0,)]
    if export:
        lines = export_path.read_bytes().splitlines()
        assert [orjson.loads(line)["custom_id"] for line in lines] == [
            f"t{n:02d}" for n in range(25)
        ]
