"""The PostgreSQL schema: `migrations/postgresql/NNN_name.sql`, each applied once, recorded.

Each migration runs in a transaction of its own that first takes a transaction-level
advisory lock (per schema), so daemons starting together on one database apply each file
exactly once: the second waits, then finds it recorded. DDL is transactional here, so a
migration that fails leaves nothing behind. Refused, without altering anything:
- a schema recorded by a newer batchd (SchemaTooNewError, as for SQLite);
- a schema where tables of batchd's names belong to another application (ForeignSchemaError):
  batchd's `tasks` carries a table comment starting `batchd:`, and its schema_migrations
  has batchd's columns. Another application's `tasks` must never receive our UPDATEs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg

from batchd.store.errors import SchemaTooNewError, StoreError
from batchd.store.postgres.connection import PostgresTarget, postgres_errors, quote_ident
from batchd.store.postgres.errors import ForeignSchemaError, PostgresRefusedError

_MIGRATION_FILE = re.compile(r"(\d+)_(\w+)\.sql")
# The first key of batchd's advisory locks ("btch"); the second is the schema's hash.
LOCK_NAMESPACE = 0x62746368
TASKS_MARK = "batchd:"
# Every table a batchd migration creates: one of these without batchd's records is foreign.
BATCHD_TABLES = (
    "tasks",
    "batches",
    "batch_tasks",
    "duplicate_batches",
    "unmatched_results",
    "usage_ledger",
    "missing_results",
)
_MIGRATIONS_COLUMNS = ("applied_at", "name", "version")
_CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""
_TABLES_FOUND = """
SELECT c.relname, obj_description(c.oid, 'pg_class')
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relname = ANY($1::text[])"""
_MIGRATIONS_TABLE_COLUMNS = """
SELECT a.attname FROM pg_attribute AS a
WHERE a.attrelid = format('%I.schema_migrations', current_schema())::regclass
  AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attname"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    script: str


def shipped_migrations() -> list[Migration]:
    """The PostgreSQL migrations installed with this batchd, by version."""
    found: dict[int, Migration] = {}
    folder = resources.files("batchd.migrations") / "postgresql"
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            raise StoreError(f"migration postgresql/{entry.name} is not named NNN_name.sql")
        version = int(match[1])
        if version in found:
            raise StoreError(f"two PostgreSQL migrations share version {version}: {entry.name}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


async def migrate(
    conn: asyncpg.Connection,
    target: PostgresTarget,
    migrations: Sequence[Migration] | None = None,
) -> list[int]:
    """Apply every migration not yet recorded, each in its own locked transaction;
    returns the versions applied here. `conn` must have `target`'s session settings."""
    shipped = list(shipped_migrations() if migrations is None else migrations)
    supported = max((m.version for m in shipped), default=0)
    applied = []
    with postgres_errors(target, "migrate", conn=conn):
        for migration in shipped:
            async with conn.transaction():
                await _lock(conn, target)
                if target.schema is not None:
                    await _create_schema(conn, target)
                recorded = await _recorded_versions(conn, target, supported)
                if migration.version in recorded:
                    continue
                # Pinned to the one schema found: functions made with `SET search_path FROM
                # CURRENT` then name it alone, never "$user" of whoever fires them.
                await conn.execute(
                    "SELECT set_config('search_path', quote_ident(current_schema()), true)"
                )
                await conn.execute(_CREATE_MIGRATIONS)
                await conn.execute(migration.script)  # simple protocol: many statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied.append(migration.version)
    return applied


async def check_schema(
    conn: asyncpg.Connection,
    target: PostgresTarget,
    migrations: Sequence[Migration] | None = None,
) -> int:
    """The recorded schema version, after the checks `migrate` makes; writes nothing (for
    commands that must not migrate). 0: batchd's tables are not there yet."""
    shipped = shipped_migrations() if migrations is None else migrations
    supported = max((m.version for m in shipped), default=0)
    with postgres_errors(target, "read", conn=conn):
        async with conn.transaction(readonly=True):
            if await conn.fetchval("SELECT current_schema()") is None:
                return 0  # the configured schema does not exist yet
            return max(await _recorded_versions(conn, target, supported), default=0)


async def _lock(conn: asyncpg.Connection, target: PostgresTarget) -> None:
    # Keyed by the schema: installations in two schemas of one database do not wait on
    # each other. Released at COMMIT or ROLLBACK, never left with a pooled connection.
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(coalesce($2, current_schema(), '')))",
        LOCK_NAMESPACE,
        target.schema,
    )


async def _create_schema(conn: asyncpg.Connection, target: PostgresTarget) -> None:
    assert target.schema is not None
    exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", target.schema)
    if exists:
        return
    try:
        await conn.execute(f"CREATE SCHEMA {quote_ident(target.schema)}")
    except asyncpg.InsufficientPrivilegeError:
        raise PostgresRefusedError(
            f"{target.shown}: schema {target.schema!r} does not exist and this role may not "
            f"create it: create it (CREATE SCHEMA {quote_ident(target.schema)} AUTHORIZATION "
            "<batchd's role>) or grant CREATE on the database"
        ) from None


async def _recorded_versions(
    conn: asyncpg.Connection, target: PostgresTarget, supported: int
) -> set[int]:
    """Versions recorded in schema_migrations, once the schema is known to be batchd's."""
    schema = await conn.fetchval("SELECT current_schema()")
    if schema is None:
        raise PostgresRefusedError(
            f"{target.shown}: no schema of the search_path exists to create batchd's tables "
            "in: set [database] schema"
        )
    rows = await conn.fetch(_TABLES_FOUND, [*BATCHD_TABLES, "schema_migrations"])
    found: dict[str, str | None] = {row[0]: row[1] for row in rows}
    where = f"schema {schema!r} of {target.shown}"
    advice = "give batchd a schema of its own ([database] schema) or another database"
    if "schema_migrations" not in found:
        ours = sorted(name for name in found if name in BATCHD_TABLES)
        if ours:
            raise ForeignSchemaError(
                f"{where} already has table(s) {', '.join(ours)} that batchd did not create "
                f"(no schema_migrations): {advice}"
            )
        return set()
    columns = tuple(row[0] for row in await conn.fetch(_MIGRATIONS_TABLE_COLUMNS))
    if columns != _MIGRATIONS_COLUMNS:
        raise ForeignSchemaError(
            f"{where} has a schema_migrations table of another application (columns "
            f"{', '.join(columns)}): {advice}"
        )
    if "tasks" in found and not (found["tasks"] or "").startswith(TASKS_MARK):
        raise ForeignSchemaError(
            f"{where} has a tasks table that is not batchd's (no {TASKS_MARK!r} comment): {advice}"
        )
    recorded = {int(row[0]) for row in await conn.fetch("SELECT version FROM schema_migrations")}
    newest = max(recorded, default=0)
    if newest > supported:
        raise SchemaTooNewError(
            f"{where}: database schema version {newest} is newer than this batchd supports "
            f"({supported}); upgrade batchd"
        )
    return recorded
