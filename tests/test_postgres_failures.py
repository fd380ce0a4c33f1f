"""PostgreSQL that cannot be used, as users meet it: `batchd` as a real process, one line
naming the masked DSN and what to do, and an exit code systemd restarts on only where a
retry can help (75: the server may come back; 78: a person must fix something)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from batchd.service.exits import EXIT_CONFIG, EXIT_TEMPFAIL, NOT_RESTARTABLE
from batchd.store.postgres.connection import quote_ident
from tests.support.cli import batchd

pytestmark = pytest.mark.postgres


def _env(tmp_path: Path, url: str, schema: str | None = None) -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    extra = f'schema = "{schema}"\n' if schema else ""
    config.write_text(f'[database]\nurl = "{url}"\n{extra}')
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
        "ANTHROPIC_API_KEY": "sk-test",
    }


def _with(dsn: str, *, password: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def _fails(env: dict[str, str], code: int, *words: str) -> str:
    for command in ("status", "run"):
        done = batchd(command, env=env, timeout=60)
        err = done.stderr.decode()
        assert done.returncode == code, (command, err[-2000:])
        assert "***" in err, (command, err[-2000:])
        assert all(word in err for word in words), (command, err[-2000:])
    return err


def test_an_unreachable_server_is_temporary_and_restarted_on(tmp_path: Path) -> None:
    err = _fails(
        _env(tmp_path, "postgresql://batchd:hunter2@127.0.0.1:1/batchd"),
        EXIT_TEMPFAIL,
        "postgresql://batchd:***@127.0.0.1:1/batchd",
        "is the server running",
    )
    assert "hunter2" not in err
    assert EXIT_TEMPFAIL not in NOT_RESTARTABLE


def test_a_wrong_password_is_for_a_person_to_fix(tmp_path: Path, postgres_dsn: str) -> None:
    err = _fails(
        _env(tmp_path, _with(postgres_dsn, password="wrong-pw-1234")),
        EXIT_CONFIG,
        "check the password",
    )
    assert "wrong-pw-1234" not in err
    assert EXIT_CONFIG in NOT_RESTARTABLE


def test_a_database_that_does_not_exist_says_create_it(tmp_path: Path, postgres_dsn: str) -> None:
    _fails(
        _env(tmp_path, _with(postgres_dsn, database="no_such_db_batchd")),
        EXIT_CONFIG,
        "no_such_db_batchd",
        "create the database",
    )


# What another application's schema is made of, read from the catalogs: its relations
# (relfilenode changes on TRUNCATE or a rewrite), their columns, constraints, indexes and
# triggers, grants, and the schema's own functions and types. Any change batchd made there,
# even one put back in the same run, shows as a difference.
_SCHEMA_CATALOG = (
    (
        "SELECT c.relname, c.relkind::text, c.relfilenode::bigint, c.relowner::regrole::text,"
        " c.relacl::text FROM pg_class c WHERE c.relnamespace = $1::regnamespace"
    ),
    (
        "SELECT a.attrelid::regclass::text, a.attnum, a.attname,"
        " format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE c.relnamespace = $1::regnamespace AND a.attnum > 0 AND NOT a.attisdropped"
    ),
    (
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = $1::regnamespace"
    ),
    ("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = $1"),
    (
        "SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = $1::regnamespace"
    ),
    (
        "SELECT proname, pg_get_function_identity_arguments(oid) FROM pg_proc"
        " WHERE pronamespace = $1::regnamespace"
    ),
    ("SELECT typname, typtype::text FROM pg_type WHERE typnamespace = $1::regnamespace"),
    ("SELECT nspowner::regrole::text, nspacl::text FROM pg_namespace WHERE nspname = $1"),
)


async def _snapshot(dsn: str, schema: str) -> list[list[tuple[object, ...]]]:
    """The schema's catalog rows, then every row of its tasks table with its xmin and ctid
    (an UPDATE that writes the same values back still changes both)."""
    conn = await asyncpg.connect(dsn)
    try:
        found = [sorted(map(tuple, await conn.fetch(sql, schema))) for sql in _SCHEMA_CATALOG]
        rows = await conn.fetch(
            f"SELECT xmin::text, ctid::text, * FROM {quote_ident(schema)}.tasks ORDER BY id"
        )
        return [*found, [tuple(row) for row in rows]]
    finally:
        await conn.close()


def test_a_tasks_table_of_another_application_is_never_touched(
    tmp_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    schema = quote_ident(postgres_schema)

    async def create_foreign() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(
                f"CREATE SCHEMA {schema};"
                f" CREATE TABLE {schema}.tasks (id int PRIMARY KEY, title text NOT NULL,"
                "  status text DEFAULT 'todo');"
                f" CREATE INDEX tasks_title ON {schema}.tasks (title);"
                f" INSERT INTO {schema}.tasks (id, title, status)"
                "  VALUES (1, 'write the report', 'todo'), (2, 'pending', 'pending'),"
                "         (3, 'a task of theirs', NULL)"
            )
        finally:
            await conn.close()

    asyncio.run(create_foreign())
    before = asyncio.run(_snapshot(postgres_dsn, postgres_schema))
    # The snapshot sees what it guards: the table, its index, its three rows.
    assert {name for name, *_ in before[0]} == {"tasks", "tasks_pkey", "tasks_title"}
    assert len(before[-1]) == 3
    _fails(
        _env(tmp_path, postgres_dsn, postgres_schema),
        EXIT_CONFIG,
        "already has table(s) tasks that batchd did not create",
        "give batchd a schema of its own",
    )
    # After `status` and `run` both refused it: no relation added or dropped, no column,
    # constraint, index, trigger, grant, function or type changed, no row written.
    assert asyncio.run(_snapshot(postgres_dsn, postgres_schema)) == before
