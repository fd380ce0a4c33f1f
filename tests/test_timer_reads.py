"""Nothing on a timer reads all rows (issue 16), held by the query plans on both stores.

Everything the daemon and the operator views read on a timer: the web view's /api/status
and `batchd status` (the whole snapshot, with its throughput per batch and latest errors),
the progress display (the snapshot without accounting), /metrics' gauges, and
`status --watch`'s throughput (`completed_since`). Each statement they run is planned
again here (SQLite: EXPLAIN QUERY PLAN of what the connections ran; PostgreSQL: EXPLAIN of
what the pool ran, with its arguments, on a table of 20,000 analysed tasks), and none may
read the tasks or batches tables, or their status or state indexes, from end to end.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.config import Config
from batchd.domain import TaskStatus
from batchd.service.gauges import register_database_gauges
from batchd.service.metrics import batchd_registry
from batchd.service.status import status_snapshot
from batchd.store import Store
from batchd.store.postgres.connection import quote_ident
from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore
from tests.support.backends import Peek
from tests.support.plans import pool_statements, sqlite_plans, sqlite_statements

ON_POSTGRESQL = pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)

# The tables that grow with the history; a timer may read small ones whole (task_counts,
# the usage ledger: a row per day and model, the result gaps).
BIG_TABLES = ("tasks", "batches", "batch_tasks")
# Partial indexes whose every entry a timer may read: the few foreign batches.
FEW_ENTRIES = ("INDEX batches_foreign",)
_ALIAS = re.compile(r"\b(tasks|batches|batch_tasks)\s+AS\s+(\w+)", re.IGNORECASE)


async def timer_reads(store: Store) -> None:
    """Every read a timer makes, once."""
    now = datetime.now(UTC)
    await status_snapshot(store, Config(), now)  # `batchd status`, the web view
    await status_snapshot(store, Config(), now, accounting=False)  # the progress display
    await store.completed_since(now - timedelta(seconds=60))  # `status --watch`
    registry = batchd_registry()
    register_database_gauges(registry, store, Config(), lambda: now)
    await registry.refresh()  # /metrics


# -- SQLite -----------------------------------------------------------------------------------


async def test_timer_reads_walk_an_index_on_sqlite(store: SqliteStore, db_path: Path) -> None:
    async with sqlite_statements(store) as seen:
        await timer_reads(store)
    found = sqlite_plans(db_path, seen)
    assert len(found) >= 10
    for sql, plan in found:
        names = set(BIG_TABLES) | {alias for _, alias in _ALIAS.findall(sql)}
        scans = [
            step for step in plan if step.startswith("SCAN ") and not step.endswith(FEW_ENTRIES)
        ]
        assert not [step for step in scans if step.split()[1] in names], (sql, plan)
    by_sql = dict(found)
    [since] = [plan for sql, plan in found if "completed_at >=" in sql and "FROM tasks" in sql]
    assert since == ["SEARCH tasks USING COVERING INDEX tasks_by_completion (completed_at>?)"]
    [batches] = [plan for sql, plan in by_sql.items() if "state = 'completed'" in sql]
    assert batches == [
        "SEARCH batches USING INDEX batches_by_completion (state=? AND completed_at>?)"
    ]


# -- PostgreSQL -------------------------------------------------------------------------------


async def pg_plans(peek: Any, seen: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(
        peek.dsn, server_settings={"search_path": quote_ident(peek.schema)}
    )
    try:
        # On a table this small a scan of it all is the planner's cheapest plan for some
        # reads (a hash join over 20,000 rows), which it leaves at 2,000,000 (bench/flat.py
        # reads prints the plans at that size). Seq scans priced out, a read that has no
        # index to walk still shows one; the others show the index they would use.
        await conn.execute("SET enable_seqscan = off")
        found = []
        for sql, args in seen:
            if not sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "DELETE")):
                continue
            if ";" in sql.strip().rstrip(";"):  # the pool's reset of a released connection
                continue
            # EXPLAIN without ANALYZE plans a write without running it.
            rows = await conn.fetch(f"EXPLAIN {sql}", *(args or ()))
            found.append((sql, "\n".join(row[0] for row in rows)))
        return found
    finally:
        await conn.close()


def history(peek: Peek, tasks: int, batches: int) -> None:
    """`tasks` finished tasks and `batches` completed batches, two days old, analysed: a
    history the planner believes in."""
    peek.execute(
        "INSERT INTO batches (state, request_count, body_bytes, intent_at, completed_at)"
        " SELECT 'completed', 100, 0, now() - interval '2 days', now() - interval '2 days'"
        f" FROM generate_series(1, {batches})"
    )
    peek.execute(
        "INSERT INTO tasks (custom_id, params, status, result, completed_at)"
        " SELECT 'h' || n, '{}', CASE WHEN n % 10 = 0 THEN 'errored' ELSE 'succeeded' END,"
        " '{}', now() - interval '2 days' FROM generate_series(1, " + str(tasks) + ") AS n"
    )
    peek.execute("ANALYZE tasks")
    peek.execute("ANALYZE batches")


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_timer_reads_walk_an_index_on_postgresql(store: Store, peek: Peek) -> None:
    assert isinstance(store, PostgresStore)
    history(peek, 20_000, 2_000)
    async with pool_statements(store) as seen:
        await timer_reads(store)
    found = await pg_plans(peek, seen)
    assert len(found) >= 10
    for sql, plan in found:
        assert "Seq Scan on tasks" not in plan, (sql, plan)
        assert "Seq Scan on batches" not in plan, (sql, plan)
    [since] = [plan for sql, plan in found if "completed_at >=" in sql and "FROM tasks" in sql]
    assert "tasks_by_completion" in since, since
    [batches] = [plan for sql, plan in found if "state = 'completed'" in sql]
    assert "batches_by_completion" in batches, batches


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_prune_checks_its_cutoff_in_the_completion_index_on_postgresql(
    store: Store, peek: Peek
) -> None:
    """`completed_at < cutoff` an index condition, not a filter on the table: prune reads
    no recent finished task's row (more in tests/test_prune_plans.py)."""
    assert isinstance(store, PostgresStore)
    history(peek, 20_000, 1)
    cutoff = datetime.now(UTC) - timedelta(days=365)
    async with pool_statements(store) as seen:
        [page async for page in store.accounts.iter_prunable_ids(cutoff)]
        [page async for page in store.accounts.iter_prunable(cutoff)]
    found = await pg_plans(peek, seen)
    assert len(found) == 2  # one page each, from tasks_by_completion (migration 013)
    for sql, plan in found:
        assert "tasks_by_completion" in plan, (sql, plan)
        assert "Seq Scan" not in plan, (sql, plan)
        conds = [line for line in plan.splitlines() if "Index Cond" in line]
        assert any("completed_at <" in cond for cond in conds), (sql, plan)
        filters = [line for line in plan.splitlines() if "Filter" in line]
        assert not any("completed_at" in line for line in filters), (sql, plan)


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_cancelling_one_task_reads_one_row_on_postgresql(store: Store, peek: Peek) -> None:
    """Among 20,000 pending tasks, every statement of a cancel finds its row by key."""
    peek.execute(
        "INSERT INTO tasks (custom_id, params) SELECT 'p' || n, '{}'"
        " FROM generate_series(1, 20000) AS n"
    )
    peek.execute("ANALYZE tasks")
    assert isinstance(store, PostgresStore)
    async with pool_statements(store) as seen:
        report = await store.request_cancel(["p777"])
    assert report.canceled == ("p777",)
    found = [(sql, plan) for sql, plan in await pg_plans(peek, seen) if "tasks" in sql]
    assert len(found) == 3  # the rows by custom_id, then the two updates by id
    for sql, plan in found:
        assert "Seq Scan" not in plan, (sql, plan)
        conds = [line for line in plan.splitlines() if "Index Cond" in line]
        assert conds, (sql, plan)
        assert all("= ANY" in cond and "id" in cond for cond in conds), (sql, plan)


def literal(value: Any) -> str:
    """An argument as SQL text, for EXECUTE (which takes no parameters)."""
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    assert isinstance(value, str), value
    assert "'" not in value, value
    return f"'{value}'"


async def generic_plans(peek: Any, seen: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    """The plan PostgreSQL caches for each statement after its fifth run (the generic one,
    planned without its arguments' values), forced."""
    conn = await asyncpg.connect(
        peek.dsn, server_settings={"search_path": quote_ident(peek.schema)}
    )
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        found = []
        for n, (sql, args) in enumerate(seen):
            if not sql.lstrip().upper().startswith("SELECT") or ";" in sql.strip().rstrip(";"):
                continue
            await conn.execute(f"PREPARE s{n} AS {sql}")
            params = ", ".join(literal(arg) for arg in args or ())
            execute = f"EXECUTE s{n}({params})" if params else f"EXECUTE s{n}"
            rows = await conn.fetch(f"EXPLAIN {execute}")
            found.append((sql, "\n".join(row[0] for row in rows)))
        return found
    finally:
        await conn.close()


@pytest.mark.postgres
@ON_POSTGRESQL
async def test_cached_plans_walk_the_status_index_on_postgresql(store: Store, peek: Peek) -> None:
    """The idle check and the pages of exports and prune, as planned once cached: on a
    history of one status, `status = $1` was priced as that status, and the plans read
    the whole table (a seq scan for the idle check; the primary key filtered by status for
    a page of errored results)."""
    assert isinstance(store, PostgresStore)
    history(peek, 20_000, 1)
    peek.execute("UPDATE tasks SET status = 'succeeded'")
    peek.execute("ANALYZE tasks")
    cutoff = datetime.now(UTC) - timedelta(days=365)
    async with pool_statements(store) as seen:
        await store.has_tasks(TaskStatus.PENDING, TaskStatus.SUBMITTED)
        [line async for line in store.iter_result_lines([TaskStatus.ERRORED])]
        [page async for page in store.accounts.iter_prunable_ids(cutoff)]
    found = await generic_plans(peek, seen)
    assert len(found) == 1 + 1 + 1  # prune: one page of tasks_by_completion
    for sql, plan in found:
        assert "Seq Scan" not in plan, (sql, plan)
        # Bounded by the status, or (prune) by the cutoff: never the primary key alone.
        conds = [line for line in plan.splitlines() if "Index Cond" in line]
        assert conds, (sql, plan)
        assert all("status =" in line or "completed_at <" in line for line in conds), (sql, plan)
