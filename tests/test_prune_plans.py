"""Every statement of `batchd prune` reads tasks_by_completion from its key, only entries
before the cutoff and no sort, on both stores (issue 16: flat in history): the plans of
the statements each store runs, EXPLAINed (PostgreSQL's cached generic plans too)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.cli import prune as prune_module
from batchd.store import Store
from batchd.store.postgres.connection import quote_ident
from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek
from tests.support.plans import pool_statements, sqlite_statements

CUTOFF = datetime(2026, 6, 1, tzinfo=UTC)


def history(peek: Peek, *, old: int, recent: int) -> None:
    """`old` tasks finished before CUTOFF (two times: ties, then the key's next time) and
    `recent` after it, then a few pending."""
    for count, completed in ((old // 2, "2026-01-01"), (old - old // 2, "2026-02-01"),
                             (recent, "2026-09-01")):  # fmt: skip
        peek.execute_together(
            "INSERT INTO tasks (custom_id, params, status, result, completed_at)"
            f" VALUES (?, '{{}}', 'succeeded', '{{}}', '{completed}T00:00:00.000Z')",
            [(f"{completed}-{n}",) for n in range(count)],
        )
    peek.execute_each(
        "INSERT INTO tasks (custom_id, params) VALUES (?, '{}')", [(f"p{n}",) for n in range(3)]
    )


async def every_prune_read(store: Store, tmp_path: Path) -> None:
    """Each prune statement, past a key too: pages of 3 over 8 old tasks."""
    accounts = store.accounts
    assert sum([len(p) async for p in accounts.iter_prunable(CUTOFF, page_size=3)]) == 8
    assert sum([len(p) async for p in accounts.iter_prunable_ids(CUTOFF, page_size=3)]) == 8
    pages = [p async for p in accounts.iter_prunable_export(CUTOFF, page_size=3)]
    assert sum(len(p.task_ids) for p in pages) == 8
    assert sum([n async for n in accounts.delete_prunable(CUTOFF, transaction_rows=3)]) == 8


async def test_prune_reads_the_completion_index_from_its_key_on_sqlite(
    store: SqliteStore, peek: Peek, db_path: Path, tmp_path: Path
) -> None:
    history(peek, old=8, recent=20)
    async with sqlite_statements(store) as seen:
        await every_prune_read(store, tmp_path)
    checked = set()
    with sqlite3.connect(db_path) as conn:
        for sql in seen:
            if "FROM tasks" not in sql or sql.startswith("DELETE"):
                continue
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
            [step] = [step for step in plan if "tasks" in step]
            if "json_each" in sql:  # the rows an export line could not splice: by id
                assert "INTEGER PRIMARY KEY (rowid=?)" in step, (sql, plan)
                continue
            assert step.startswith("SEARCH tasks USING"), (sql, plan)
            assert "INDEX tasks_by_completion (completed_at" in step, (sql, plan)
            assert "completed_at<?" in step or "rowid>?" in step, (sql, plan)
            if sql.startswith("SELECT completed_at, id FROM"):  # ids: the index alone
                assert "COVERING INDEX" in step, (sql, plan)
            checked.add(step)
    conn.close()
    # The first page, the rest of a time after the key, the times after it.
    assert any("(completed_at<?)" in step for step in checked)
    assert any("(completed_at=? AND rowid>?)" in step for step in checked)
    assert any("(completed_at>? AND completed_at<?)" in step for step in checked)


def literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, datetime), value
    return f"'{value.isoformat()}'::timestamptz"


@pytest.mark.postgres
@pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)
async def test_prune_reads_the_completion_index_from_its_key_on_postgresql(
    store: Store, peek: Any, tmp_path: Path
) -> None:
    """Custom and generic plans (the one cached after five runs, forced): an index range
    of tasks_by_completion from the key to the cutoff, never a sort or the status index."""
    assert isinstance(store, PostgresStore)
    history(peek, old=8, recent=20_000)
    peek.execute("ANALYZE tasks")
    async with pool_statements(store) as seen:
        await every_prune_read(store, tmp_path)
    reads = [(sql, args) for sql, args in seen if sql.startswith("SELECT completed_at")]
    assert any("(completed_at, id) >" in sql for sql, _ in reads)
    conn = await asyncpg.connect(
        peek.dsn, server_settings={"search_path": quote_ident(peek.schema)}
    )
    try:
        for n, (sql, args) in enumerate(reads):
            params = ", ".join(literal(arg) for arg in args)
            await conn.execute(f"PREPARE s{n} AS {sql}")
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                arguments = f"({params})" if args else ""  # the bounds: no parameter
                rows = await conn.fetch(f"EXPLAIN EXECUTE s{n}{arguments}")
                plan = "\n".join(row[0] for row in rows)
                assert "Sort" not in plan, (sql, mode, plan)
                assert "Seq Scan" not in plan, (sql, mode, plan)
                assert "tasks_by_completion" in plan, (sql, mode, plan)
                assert "tasks_by_status" not in plan, (sql, mode, plan)
                conds = [line for line in plan.splitlines() if "Index Cond" in line]
                assert any("completed_at <" in cond for cond in conds), (sql, mode, plan)
                if "(completed_at, id) >" in sql:
                    assert any("ROW(completed_at, id) >" in cond for cond in conds), plan
        # A prune without export deletes a range of the index, sent unprepared with its
        # bounds written in: planned for them, an index range, never the whole table.
        deletes = [sql for sql, _ in seen if sql.startswith("DELETE FROM tasks WHERE completed_at")]
        assert len(deletes) == 3, deletes  # 3 + 3 + the last 2 (no upper bound)
        for sql in deletes:
            plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {sql}"))
            assert "Seq Scan" not in plan, (sql, plan)
            assert "tasks_by_status" not in plan, (sql, plan)
            assert "tasks_by_completion" in plan, (sql, plan)
            conds = [line for line in plan.splitlines() if "Index Cond" in line]
            assert conds, (sql, plan)
            for bound in ("ROW(completed_at, id) >", "ROW(completed_at, id) <="):
                if bound.removeprefix("ROW") in sql:
                    assert any(bound in cond for cond in conds), (sql, plan)
    finally:
        await conn.close()


@pytest.mark.both_stores
async def test_prune_survives_rows_left_with_a_time_but_no_final_status(
    store: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's UPDATE may leave a pending task with a completion time: prune reads past
    it and keeps it (each delete checks the status), with and without the key."""
    history(peek, old=8, recent=0)
    peek.execute("UPDATE tasks SET status = 'pending' WHERE custom_id IN ('2026-01-01-1', "
                 "'2026-02-01-3')")  # fmt: skip
    monkeypatch.setattr(prune_module, "_DELETE_ROWS", 3)
    report = await prune_module.prune(store, CUTOFF, vacuum=False)
    assert report.deleted == 6
    left = sorted(row[0] for row in peek.query("SELECT custom_id FROM tasks"))
    assert left == ["2026-01-01-1", "2026-02-01-3", "p0", "p1", "p2"]
