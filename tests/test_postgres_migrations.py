"""The PostgreSQL schema against a real server: applied once, recorded, refused when it is
newer or not batchd's, and the users' contract (INSERT/SELECT, ledger, wake-up)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import SchemaTooNewError, open_store
from batchd.store.postgres.connection import PostgresTarget, connect, quote_ident
from batchd.store.postgres.errors import ForeignSchemaError
from batchd.store.postgres.migrations import check_schema, migrate, shipped_migrations

pytestmark = pytest.mark.postgres
ALL = [m.version for m in shipped_migrations()]
PARAMS = '{"model": "claude-haiku-4-5", "max_tokens": 300, "messages": []}'


@pytest.fixture
def target(postgres_dsn: str, postgres_schema: str) -> PostgresTarget:
    return PostgresTarget(postgres_dsn, postgres_schema)


@pytest.fixture
async def conn(target: PostgresTarget) -> AsyncIterator[asyncpg.Connection]:
    opened = await connect(target)
    try:
        yield opened
    finally:
        await opened.close()


async def schema_snapshot(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() ORDER BY 1, 2"
    )
    return [tuple(row) for row in rows]


def test_postgresql_migrations_keep_the_sqlite_version_numbers() -> None:
    sqlite_dir = Path(__file__).parent.parent / "migrations"
    sqlite_versions = sorted(p.name for p in sqlite_dir.glob("*.sql"))
    assert [f"{m.version:03d}_{m.name}.sql" for m in shipped_migrations()] == sqlite_versions


async def test_migrations_apply_once_each_and_are_recorded(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    assert await check_schema(conn, target) == 0
    assert await migrate(conn, target) == ALL
    assert await migrate(conn, target) == []
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [
        (m.version, m.name) for m in shipped_migrations()
    ]
    assert await check_schema(conn, target) == ALL[-1]
    # In the configured schema, which batchd created.
    assert await conn.fetchval("SELECT current_schema()") == target.schema


async def test_daemons_migrating_at_once_apply_each_file_once(target: PostgresTarget) -> None:
    conns = [await connect(target) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, target) for c in conns))
        assert sorted(v for applied in results for v in applied) == ALL
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(ALL)
    finally:
        for c in conns:
            await c.close()


async def test_a_newer_schema_is_refused_and_left_unaltered(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    await migrate(conn, target, shipped_migrations()[:2])
    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
    before = await schema_snapshot(conn)
    with pytest.raises(SchemaTooNewError, match="version 99 is newer than this batchd supports"):
        await migrate(conn, target)
    with pytest.raises(SchemaTooNewError):
        await check_schema(conn, target)
    assert await schema_snapshot(conn) == before
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations WHERE version < 99") == 2


async def test_a_tasks_table_of_another_application_is_refused(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    assert target.schema is not None
    await conn.execute(f"CREATE SCHEMA {quote_ident(target.schema)}")
    await conn.execute("CREATE TABLE tasks (id serial PRIMARY KEY, title text)")
    before = await schema_snapshot(conn)
    with pytest.raises(ForeignSchemaError, match=r"table\(s\) tasks that batchd did not create"):
        await migrate(conn, target)
    with pytest.raises(ForeignSchemaError):
        await check_schema(conn, target)
    assert await schema_snapshot(conn) == before  # no schema_migrations, nothing else


async def test_another_applications_schema_migrations_is_refused(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    assert target.schema is not None
    await conn.execute(f"CREATE SCHEMA {quote_ident(target.schema)}")
    # Rails' (and others') table of the same name.
    await conn.execute("CREATE TABLE schema_migrations (version varchar PRIMARY KEY)")
    with pytest.raises(ForeignSchemaError, match="schema_migrations table of another app"):
        await migrate(conn, target)


async def test_a_tasks_table_without_batchds_mark_is_refused_even_if_recorded(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    await migrate(conn, target)
    await conn.execute("COMMENT ON TABLE tasks IS 'the to-do list app'")
    with pytest.raises(ForeignSchemaError, match="tasks table that is not batchd's"):
        await migrate(conn, target)


async def test_the_default_schema_is_used_without_a_schema_setting(
    fresh_postgres_database: object,
) -> None:
    assert callable(fresh_postgres_database)
    target = PostgresTarget(fresh_postgres_database())
    conn = await connect(target)
    try:
        assert await migrate(conn, target) == ALL
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        assert "tasks" in [row[0] for row in tables]
    finally:
        await conn.close()


async def test_every_sqlite_column_exists_in_postgresql(
    conn: asyncpg.Connection, target: PostgresTarget, tmp_path: Path
) -> None:
    await migrate(conn, target)
    store = await open_store(DatabaseConfig(path=tmp_path / "parity.db"))
    await store.close()
    with sqlite3.connect(tmp_path / "parity.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        sqlite_columns = {
            (table, row[1]) for table in tables for row in db.execute(f"PRAGMA table_info({table})")
        }
    db.close()
    pg_columns = {(table, column) for table, column, _ in await schema_snapshot(conn)}
    assert sqlite_columns == pg_columns


@pytest.fixture
async def user(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A user's own session: no batchd settings, tables named with their schema."""
    opened = await asyncpg.connect(postgres_dsn)
    try:
        yield opened
    finally:
        await opened.close()


async def test_users_insert_and_select_as_the_readme_says(
    conn: asyncpg.Connection, target: PostgresTarget, user: asyncpg.Connection
) -> None:
    await migrate(conn, target)
    tasks = f"{quote_ident(str(target.schema))}.tasks"
    await user.execute(f"INSERT INTO {tasks} (custom_id, params) VALUES ('q-1', $1)", PARAMS)
    row = await user.fetchrow(f"SELECT status, result, error FROM {tasks} WHERE custom_id = 'q-1'")
    assert tuple(row) == ("pending", None, None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await user.execute(f"INSERT INTO {tasks} (custom_id, params) VALUES ('q-1', $1)", PARAMS)
    with pytest.raises(asyncpg.InvalidTextRepresentationError):  # not JSON: refused at once
        await user.execute(f"INSERT INTO {tasks} (custom_id, params) VALUES ('q-2', 'nope')")
    with pytest.raises(asyncpg.GeneratedAlwaysError):  # ids are batchd's
        await user.execute(
            f"INSERT INTO {tasks} (id, custom_id, params) VALUES (7, 'q-3', $1)", PARAMS
        )
    defaults = await user.fetchrow(
        f"SELECT attempts, cancel_requested, batch_id, created_at IS NOT NULL AS stamped"
        f" FROM {tasks} WHERE custom_id = 'q-1'"
    )
    assert tuple(defaults) == (0, False, None, True)
    # jsonb: the answer's text is one path expression away.
    await conn.execute(
        "UPDATE tasks SET status = 'succeeded', result = $1::jsonb WHERE custom_id = 'q-1'",
        '{"type": "succeeded", "message": {"content": [{"type": "text", "text": "Hi"}]}}',
    )
    text = await user.fetchval(
        f"SELECT result->'message'->'content'->0->>'text' FROM {tasks} WHERE custom_id = 'q-1'"
    )
    assert text == "Hi"
    with pytest.raises(asyncpg.CheckViolationError):
        await user.execute(f"UPDATE {tasks} SET status = 'done'")


async def test_usage_ledger_counts_each_success_once_per_statement(
    conn: asyncpg.Connection, target: PostgresTarget, user: asyncpg.Connection
) -> None:
    await migrate(conn, target)
    await conn.executemany(
        "INSERT INTO tasks (custom_id, params) VALUES ($1, $2)",
        [(f"t-{i}", PARAMS) for i in range(4)],
    )
    succeed = (
        "UPDATE tasks SET status = 'succeeded', model = 'm', input_tokens = 10,"
        " output_tokens = 5, cache_read_input_tokens = 1, completed_at = '2026-12-01T10:00:00Z'"
    )
    await conn.execute(f"{succeed} WHERE custom_id IN ('t-0', 't-1', 't-2')")
    await conn.execute(f"{succeed} WHERE custom_id IN ('t-0', 't-1', 't-2')")  # already: no-op
    # A user's session whose search_path lacks batchd's schema fires the trigger too.
    await user.execute(
        f"UPDATE {quote_ident(str(target.schema))}.tasks SET status = 'succeeded', model = 'm',"
        " output_tokens = 7, completed_at = '2026-12-02T23:59:59+01:00' WHERE custom_id = 't-3'"
    )
    rows = await conn.fetch(
        "SELECT day::text, model, requests, input_tokens, output_tokens,"
        " cache_creation_input_tokens, cache_read_input_tokens FROM usage_ledger ORDER BY day"
    )
    assert [tuple(r) for r in rows] == [
        ("2026-12-01", "m", 3, 30, 15, 0, 3),
        ("2026-12-02", "m", 1, 0, 7, 0, 0),  # 23:59:59+01:00 is the 2nd in UTC
    ]


async def test_an_insert_notifies_a_listener_at_commit_once_per_statement(
    conn: asyncpg.Connection, target: PostgresTarget
) -> None:
    await migrate(conn, target)
    listener = await connect(target)
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    await listener.add_listener(
        "batchd_tasks", lambda _c, _p, ch, payload: heard.put_nowait((ch, payload))
    )
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO tasks (custom_id, params)"
                " SELECT 'n-' || i, $1::jsonb FROM generate_series(1, 100) AS i",
                PARAMS,
            )
            await asyncio.sleep(0.2)
            assert heard.empty()  # nothing before COMMIT
        assert await asyncio.wait_for(heard.get(), 5) == ("batchd_tasks", target.schema)
        await asyncio.sleep(0.2)
        assert heard.empty()  # one statement, one notification
    finally:
        await listener.close()


async def test_jsonb_params_are_rewritten_so_a_body_counts_params_text(
    conn: asyncpg.Connection, target: PostgresTarget, user: asyncpg.Connection
) -> None:
    """What the PostgreSQL store must build bodies from (pitfalls: jsonb rewrites text)."""
    await migrate(conn, target)
    tasks = f"{quote_ident(str(target.schema))}.tasks"
    sent = '{"max_tokens":1,"model":"m","model":"n",  "messages":[]}'
    await user.execute(f"INSERT INTO {tasks} (custom_id, params) VALUES ('j-1', $1)", sent)
    text, size = await conn.fetchrow(
        "SELECT params::text, octet_length(params::text) FROM tasks WHERE custom_id = 'j-1'"
    )
    assert text == '{"model": "n", "messages": [], "max_tokens": 1}'  # not the user's bytes
    assert size == len(text.encode()) != len(sent.encode())
    with pytest.raises(asyncpg.UntranslatableCharacterError):  # \u0000: refused at INSERT
        await user.execute(
            f"INSERT INTO {tasks} (custom_id, params) VALUES ('j-2', $1)", '{"a": "\\u0000"}'
        )


async def test_a_schema_name_that_needs_quoting_works(postgres_dsn: str) -> None:
    odd = 'Jobs "2026"; DROP'
    target = PostgresTarget(postgres_dsn, odd)
    conn = await connect(target)
    try:
        assert await migrate(conn, target) == ALL
        assert await conn.fetchval("SELECT current_schema()") == odd
        assert await conn.fetchval("SELECT count(*) FROM tasks") == 0
    finally:
        await conn.execute(f"DROP SCHEMA {quote_ident(odd)} CASCADE")
        await conn.close()
