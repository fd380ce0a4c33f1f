"""A read of an older schema that needs what the missing migrations add is refused the same
way on both stores: SchemaTooOldError naming both versions and `batchd migrate` (through
the store, and as the CLI's `schema_too_old` with its configuration exit code), never a
driver's own error. The schema is left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.domain import TaskStatus
from batchd.service.exits import EXIT_CONFIG
from batchd.store import SchemaTooOldError, open_store
from batchd.store.postgres.migrations import shipped_migrations as postgres_migrations
from batchd.store.sqlite.migrations import shipped_migrations as sqlite_migrations
from tests.support.backends import Peek, PostgresPeek
from tests.support.cli import batchd
from tests.support.schema import UNDO_FROM_ACKNOWLEDGED, UNDO_FROM_ACKNOWLEDGED_POSTGRESQL
from tests.support.store import add_tasks

pytestmark = pytest.mark.both_stores


def acknowledged_version(database: DatabaseConfig) -> int:
    """The migration that added the acknowledgement columns (`duplicate_batches` reads them)."""
    shipped = sqlite_migrations() if database.url is None else postgres_migrations()
    return next(m.version for m in shipped if m.name == "duplicate_acknowledged")


def newest(database: DatabaseConfig) -> int:
    shipped = sqlite_migrations() if database.url is None else postgres_migrations()
    return shipped[-1].version


def make_older(peek: Peek, version: int) -> int:
    """The schema as a batchd before the acknowledgement columns left it (and every later
    migration that cannot be applied again); returns its version."""
    postgresql = isinstance(peek, PostgresPeek)
    for statement in UNDO_FROM_ACKNOWLEDGED_POSTGRESQL if postgresql else UNDO_FROM_ACKNOWLEDGED:
        peek.execute(statement)
    peek.execute("DELETE FROM schema_migrations WHERE version >= ?", version)
    return int(peek.query("SELECT max(version) FROM schema_migrations")[0][0])


def environment(tmp_path: Path, database: DatabaseConfig) -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    if database.url is None:
        config.write_text(f'[database]\npath = "{database.path}"\n')
    else:
        config.write_text(f'[database]\nurl = "{database.url}"\nschema = "{database.schema}"\n')
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "sk-test",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # nothing listens: no read calls it
    }


async def filled(database: DatabaseConfig, *custom_ids: str) -> None:
    store = await open_store(database)
    try:
        await add_tasks(store, *custom_ids)
    finally:
        await store.close()


async def test_a_read_that_needs_a_missing_migration_raises_schema_too_old(
    database_config: DatabaseConfig, peek: Peek
) -> None:
    await filled(database_config, "a", "b")
    version = make_older(peek, acknowledged_version(database_config))
    reader = await open_store(database_config, read_only=True)
    try:
        # What that version has is read ...
        assert [t.custom_id for t in await reader.tasks_in_status(TaskStatus.PENDING, 5)] == [
            "a",
            "b",
        ]
        # ... what it lacks is refused, naming both versions and the remedy.
        with pytest.raises(SchemaTooOldError) as refused:
            await reader.duplicate_batches()
    finally:
        await reader.close()
    message = str(refused.value)
    assert f"schema version {version}, older than this batchd's ({newest(database_config)})" in (
        message
    )
    assert "batchd migrate" in message
    assert peek.query("SELECT max(version) FROM schema_migrations") == [(version,)]


async def test_status_on_an_older_schema_exits_as_schema_too_old(
    database_config: DatabaseConfig, peek: Peek, tmp_path: Path
) -> None:
    await filled(database_config, "a")
    version = make_older(peek, acknowledged_version(database_config))
    env = environment(tmp_path, database_config)
    status = batchd("status", env=env)
    assert status.returncode == EXIT_CONFIG, status.stderr
    events = [orjson.loads(line) for line in status.stderr.splitlines() if line.startswith(b"{")]
    [failure] = [event for event in events if event["level"] == "error"]
    assert failure["event"] == "schema_too_old"
    assert f"schema version {version}, older than this batchd's" in str(failure["error"])
    assert peek.query("SELECT max(version) FROM schema_migrations") == [(version,)]
    assert batchd("migrate", env=env).returncode == 0
    assert batchd("status", env=env).returncode == 0
