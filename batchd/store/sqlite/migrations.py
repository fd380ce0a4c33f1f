"""The schema: versioned SQL files of `batchd/migrations/`, applied once each and recorded."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

from batchd.store.errors import DatabaseMissingError, SchemaTooNewError, StoreError
from batchd.store.sqlite.database import Db, SqliteDatabase
from batchd.store.values import SchemaVersions

_MIGRATION_FILE = re.compile(r"(\d+)_(\w+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    script: str


async def migrate(database: SqliteDatabase) -> list[int]:
    """Apply every shipped migration not yet recorded, each in its own transaction."""
    shipped = shipped_migrations()
    await database.transact(_create_migrations_table)
    await check_version(database, shipped)
    applied = []
    for migration in shipped:
        if await database.transact(_apply_migration, migration, database.now):
            applied.append(migration.version)
    return applied


async def check_version(database: SqliteDatabase, shipped: list[Migration]) -> None:
    """Refuse a database migrated by a newer batchd, before anything is written."""
    supported = max((m.version for m in shipped), default=0)
    recorded = await _recorded_version(database)
    if recorded > supported:
        raise SchemaTooNewError(
            f"{database.path}: database schema version {recorded} is newer than this batchd "
            f"supports ({supported}); upgrade batchd"
        )


async def schema_versions(database: SqliteDatabase) -> SchemaVersions:
    """The version the database records (0: none yet) and the newest shipped."""
    supported = max((m.version for m in shipped_migrations()), default=0)
    return SchemaVersions(await _recorded_version(database), supported)


async def check_readable_schema(database: SqliteDatabase) -> SchemaVersions:
    """For a read-only open: a batchd schema of any version (other versions are read where
    they can be, `SqliteDatabase.read`); a file without one is refused, never created."""
    versions = await schema_versions(database)
    if versions.recorded == 0:
        raise DatabaseMissingError(
            f"{database.path} holds no batchd database (no schema recorded): read-only "
            "commands never create one; `batchd migrate` creates the schema"
        )
    if versions.recorded != versions.supported:
        database.schema_versions = versions
    return versions


async def _recorded_version(database: SqliteDatabase) -> int:
    exists = await database.read(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    )
    if not exists:
        return 0
    rows = await database.read("SELECT coalesce(max(version), 0) FROM schema_migrations")
    return int(rows[0][0])


async def _apply_migration(db: Db, migration: Migration, now: Callable[[], str]) -> bool:
    # Checked inside the transaction: another process may have migrated meanwhile.
    done = await db.execute_fetchall(
        "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
    )
    if list(done):
        return False
    # Statement by statement: executescript would COMMIT first and escape the lock.
    for statement in _statements(migration.script):
        await db.execute(statement)
    await db.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
        (migration.version, migration.name, now()),
    )
    return True


async def _create_migrations_table(db: Db) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )


def shipped_migrations() -> list[Migration]:
    found: dict[int, Migration] = {}
    for entry in resources.files("batchd.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            raise StoreError(f"migration {entry.name} is not named NNN_name.sql")
        version = int(match[1])
        if version in found:
            raise StoreError(f"two migrations share version {version}: {entry.name}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def _statements(script: str) -> Iterator[str]:
    """Split a script where SQLite itself says a statement ends (quotes, comments, triggers)."""
    start = 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : end + 1]):
            yield script[start : end + 1]
            start = end + 1
    if script[start:].strip():
        yield script[start:]  # a last statement without ';', or trailing comments
