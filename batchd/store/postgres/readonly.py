"""Opening a PostgreSQL store read-only (`status`, `results`, `estimate`, the listings):
never creates the schema, never migrates, never writes. Every session of such a store has
`default_transaction_read_only` on (connection.py), and every write method refuses first
(`PostgresDatabase.check_writable`), so a forgotten check still cannot write."""

from __future__ import annotations

import asyncpg
import structlog

from batchd.store.errors import DatabaseMissingError
from batchd.store.postgres import migrations
from batchd.store.postgres.connection import PostgresTarget, postgres_errors
from batchd.store.postgres.database import PostgresDatabase
from batchd.store.values import SchemaVersions

log = structlog.get_logger("batchd.store.postgres")

# `_recorded_versions` refuses a schema newer than this; a read-only open reads it anyway.
_ANY_VERSION = 2**31 - 1


def supported_version() -> int:
    """The newest schema version this batchd ships for PostgreSQL."""
    return max((m.version for m in migrations.shipped_migrations()), default=0)


async def recorded_versions(conn: asyncpg.Connection, target: PostgresTarget) -> SchemaVersions:
    """The version the schema records (0: no batchd schema there) and the newest shipped,
    in a read-only transaction; a foreign schema is refused as `migrate` refuses it."""
    with postgres_errors(target, "read", conn=conn):
        async with conn.transaction(readonly=True):
            if await conn.fetchval("SELECT current_schema()") is None:
                return SchemaVersions(0, supported_version())
            found = await migrations._recorded_versions(conn, target, _ANY_VERSION)
    return SchemaVersions(max(found, default=0), supported_version())


async def check_readable(conn: asyncpg.Connection, target: PostgresTarget) -> SchemaVersions:
    """Refuse a database without batchd's schema (never created here); warn when its
    version is not this batchd's (read where it can be, never migrated)."""
    versions = await recorded_versions(conn, target)
    if versions.recorded == 0:
        where = (
            target.shown if target.schema is None else f"schema {target.schema!r} of {target.shown}"
        )
        raise DatabaseMissingError(
            f"{where} holds no batchd database (no schema recorded): read-only commands "
            "never create one; `batchd migrate` creates the schema"
        )
    if versions.recorded != versions.supported:
        log.warning(
            "schema_version_differs",
            database=target.shown,
            schema_version=versions.recorded,
            supported=versions.supported,
            detail="read where this batchd can; never migrated by a read-only command",
        )
    return versions


async def schema_versions(database: PostgresDatabase) -> SchemaVersions:
    """`Store.schema_versions` on the store's pool (a read, whatever the store's mode); 0
    when batchd's schema is not there (a store opened with `migrate=False` before it was
    created)."""
    exists = await database.read_one("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists[0]:
        return SchemaVersions(0, supported_version())
    row = await database.read_one("SELECT coalesce(max(version), 0) FROM schema_migrations")
    return SchemaVersions(int(row[0]), supported_version())
