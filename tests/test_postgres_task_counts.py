"""The PostgreSQL task counts (migration 007) against a real server: statement-level
triggers keep them equal to a full count under every kind of write a user or a store makes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from batchd.domain import TaskStatus
from batchd.store.postgres.connection import PostgresTarget, connect
from batchd.store.postgres.migrations import migrate

pytestmark = pytest.mark.postgres
PARAMS = '{"model": "claude-haiku-4-5", "max_tokens": 300, "messages": []}'


@pytest.fixture
async def conn(postgres_dsn: str, postgres_schema: str) -> AsyncIterator[asyncpg.Connection]:
    target = PostgresTarget(postgres_dsn, postgres_schema)
    opened = await connect(target)
    try:
        await migrate(opened, target)
        yield opened
    finally:
        await opened.close()


async def assert_counts_right(conn: asyncpg.Connection) -> dict[str, int]:
    kept = {r["status"]: r["tasks"] for r in await conn.fetch("SELECT * FROM task_counts")}
    rows = await conn.fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status")
    actual = {r["status"]: r["n"] for r in rows}
    assert kept == {str(s): actual.get(str(s), 0) for s in TaskStatus}
    return kept


async def test_counts_stay_right_under_inserts_updates_deletes_and_truncate(
    conn: asyncpg.Connection,
) -> None:
    insert = "INSERT INTO tasks (custom_id, params) VALUES ($1, $2)"
    await conn.executemany(insert, [(f"t{n}", PARAMS) for n in range(10)])
    await conn.execute(
        "INSERT INTO tasks (custom_id, params) VALUES ('t1', $1), ('u1', $1)"
        " ON CONFLICT (custom_id) DO NOTHING",
        PARAMS,
    )
    await conn.execute(
        "INSERT INTO tasks (custom_id, params) VALUES ('t2', $1)"
        " ON CONFLICT (custom_id) DO UPDATE SET status = 'canceled'",
        PARAMS,
    )
    await conn.execute("UPDATE tasks SET status = 'submitted' WHERE custom_id IN ('t3', 't4')")
    await conn.execute(
        "UPDATE tasks SET status = CASE status WHEN 'submitted' THEN 'succeeded'"
        " ELSE 'errored' END WHERE custom_id IN ('t3', 't5')"
    )
    await conn.execute("UPDATE tasks SET error = 'no status change' WHERE custom_id = 't6'")
    await conn.execute("DELETE FROM tasks WHERE custom_id IN ('t0', 't3')")
    kept = await assert_counts_right(conn)
    assert (kept["pending"], kept["canceled"], kept["submitted"]) == (6, 1, 1)
    with pytest.raises(asyncpg.CheckViolationError):  # refused whole: nothing counted
        await conn.execute("UPDATE tasks SET status = 'nonsense' WHERE custom_id = 't7'")
    await assert_counts_right(conn)
    await conn.execute("TRUNCATE tasks CASCADE")
    assert set((await assert_counts_right(conn)).values()) == {0}
