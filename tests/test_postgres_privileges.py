"""Roles on a real server: what batchd says when it may not create its tables, and the
producer role docs/postgresql.md describes (insert and read tasks, nothing else)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from batchd.store.postgres.connection import PostgresTarget, connect, quote_ident
from batchd.store.postgres.errors import PostgresRefusedError
from batchd.store.postgres.migrations import migrate

pytestmark = pytest.mark.postgres
PARAMS = '{"model": "m", "max_tokens": 1, "messages": []}'
MakeRole = Callable[[], tuple[str, str]]


async def test_a_role_that_may_not_create_the_schema_is_told_what_to_run(
    make_role: MakeRole, postgres_schema: str
) -> None:
    _, dsn = make_role()
    target = PostgresTarget(dsn, postgres_schema)
    conn = await connect(target)
    try:
        with pytest.raises(PostgresRefusedError, match="may not create it") as raised:
            await migrate(conn, target)
    finally:
        await conn.close()
    assert f"CREATE SCHEMA {quote_ident(postgres_schema)}" in str(raised.value)
    assert not raised.value.retryable
    assert target.shown in str(raised.value)


async def test_a_role_that_may_not_create_tables_is_told_to_grant(
    make_role: MakeRole, postgres_dsn: str, postgres_schema: str
) -> None:
    role, dsn = make_role()
    owner = await asyncpg.connect(postgres_dsn)
    try:
        # The schema exists, but this role has only USAGE on it (PostgreSQL 15's public).
        await owner.execute(f"CREATE SCHEMA {quote_ident(postgres_schema)}")
        await owner.execute(f"GRANT USAGE ON SCHEMA {quote_ident(postgres_schema)} TO {role}")
    finally:
        await owner.close()
    target = PostgresTarget(dsn, postgres_schema)
    conn = await connect(target)
    try:
        with pytest.raises(PostgresRefusedError, match="grant this role") as raised:
            await migrate(conn, target)
        assert "permission denied" in str(raised.value)
        # Nothing half made: the transaction took schema_migrations back with it.
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


async def test_a_producer_role_inserts_and_reads_tasks_and_nothing_more(
    make_role: MakeRole, postgres_dsn: str, postgres_schema: str
) -> None:
    target = PostgresTarget(postgres_dsn, postgres_schema)
    daemon = await connect(target)
    await migrate(daemon, target)
    role, dsn = make_role()
    schema = quote_ident(postgres_schema)
    # The grants docs/postgresql.md gives.
    await daemon.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    await daemon.execute(f"GRANT SELECT, INSERT (custom_id, params) ON {schema}.tasks TO {role}")
    heard: asyncio.Queue[str] = asyncio.Queue()
    await daemon.add_listener("batchd_tasks", lambda *args: heard.put_nowait(args[3]))
    producer = await asyncpg.connect(dsn)
    try:
        await producer.execute(
            f"INSERT INTO {schema}.tasks (custom_id, params) VALUES ('p-1', $1)", PARAMS
        )
        row = await producer.fetchrow(
            f"SELECT status, result, error FROM {schema}.tasks WHERE custom_id = 'p-1'"
        )
        assert tuple(row) == ("pending", None, None)
        assert await asyncio.wait_for(heard.get(), 5) == postgres_schema  # the wake-up
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await producer.execute(f"UPDATE {schema}.tasks SET status = 'succeeded'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await producer.execute(f"DELETE FROM {schema}.tasks")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await producer.fetch(f"SELECT * FROM {schema}.batches")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # only the two columns
            await producer.execute(
                f"INSERT INTO {schema}.tasks (custom_id, params, status)"
                " VALUES ('p-2', $1, 'succeeded')",
                PARAMS,
            )
    finally:
        await producer.close()
        await daemon.close()
