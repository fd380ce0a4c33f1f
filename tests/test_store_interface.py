"""The seam between batchd and its database: the factory, and what lives only in store/."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest

import batchd
from batchd.config import DatabaseConfig
from batchd.store import SchemaTooNewError, StoreError, open_store
from batchd.store.postgres.store import PostgresStore
from batchd.store.sqlite import SqliteStore

PACKAGE = Path(batchd.__file__).parent


async def test_open_store_opens_the_sqlite_file_of_the_config_with_its_busy_timeout(
    db_path: Path,
) -> None:
    store = await open_store(DatabaseConfig(path=db_path, busy_timeout_ms=1234))
    try:
        assert isinstance(store, SqliteStore)
        rows = await store.database.writer.execute_fetchall("PRAGMA busy_timeout")
        assert next(iter(rows))[0] == 1234
        assert (await store.enqueue([("a", "{}")])).inserted == 1
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT custom_id FROM tasks").fetchall() == [("a",)]
    conn.close()


@pytest.mark.postgres
async def test_open_store_opens_postgresql_for_a_url_and_never_the_sqlite_file(
    db_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    config = DatabaseConfig(path=db_path, url=postgres_dsn, schema=postgres_schema)
    store = await open_store(config)
    try:
        assert isinstance(store, PostgresStore)
        assert (await store.enqueue([("a", '{"model": "m"}')])).inserted == 1
        assert [t.custom_id async for t in store.iter_pending()] == ["a"]
    finally:
        await store.close()
    assert not db_path.exists()
    with pytest.raises(StoreError, match="closed"):
        await store.status_counts()


async def test_open_store_without_migrating_refuses_a_newer_schema_and_writes_nothing(
    db_path: Path,
) -> None:
    await (await open_store(DatabaseConfig(path=db_path))).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="999"):
        await open_store(DatabaseConfig(path=db_path), migrate=False)


async def test_a_closed_store_refuses_every_call_through_the_interface(db_path: Path) -> None:
    store = await open_store(DatabaseConfig(path=db_path))
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.enqueue([("a", "{}")])
    with pytest.raises(StoreError, match="closed"):
        await store.accounts.reclaim_space()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_store_package_talks_to_a_database_driver() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if "store" not in p.relative_to(PACKAGE).parts]
    assert outside  # the walk found the rest of batchd
    drivers = {"aiosqlite", "sqlite3", "asyncpg", "psycopg"}
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(_imports(p) & drivers)
        for p in outside
        if _imports(p) & drivers
    }
    assert offenders == {}


def test_callers_import_the_interface_not_a_backend() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if "store" not in p.relative_to(PACKAGE).parts]
    offenders = {
        str(p.relative_to(PACKAGE))
        for p in outside
        if any(name.startswith("batchd.store.sqlite") for name in _imports(p))
    }
    assert offenders == set()


def test_every_store_module_keeps_to_one_job_in_under_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in (PACKAGE / "store").rglob("*.py")
    }
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}
