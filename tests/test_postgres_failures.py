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


def test_a_tasks_table_of_another_application_is_never_touched(
    tmp_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    async def create_foreign() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(
                f"CREATE SCHEMA {quote_ident(postgres_schema)};"
                f" CREATE TABLE {quote_ident(postgres_schema)}.tasks (id int, title text)"
            )
        finally:
            await conn.close()

    asyncio.run(create_foreign())
    _fails(
        _env(tmp_path, postgres_dsn, postgres_schema),
        EXIT_CONFIG,
        "already has table(s) tasks that batchd did not create",
        "give batchd a schema of its own",
    )
