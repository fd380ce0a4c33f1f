"""Which store a configuration asks for."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from batchd.config import DatabaseConfig
from batchd.store.interface import Store
from batchd.store.sqlite import SqliteStore


async def open_store(
    database: DatabaseConfig,
    *,
    clock: Callable[[], datetime] | None = None,
    migrate: bool = True,
    read_only: bool = False,
) -> Store:
    """Open the store `[database]` names, applying missing migrations unless `migrate` is
    False (then a newer schema is still refused, and nothing is written).

    `[database] path`, a SQLite file, or a `url` (`postgresql://...`, or the environment's
    BATCHD_DATABASE_URL, which config.py folds in): the PostgreSQL store. Nothing else in
    batchd needs to know which it is.

    `read_only=True` (`status`, `results`, `estimate`, `batches`, `tasks`): the store
    never creates the database or its schema, never migrates, never writes (every write
    method raises StoreError). A missing database raises DatabaseMissingError naming it;
    a schema of another version is read where it can be, and a read that needs what that
    version lacks raises SchemaTooOldError / SchemaTooNewError, the schema untouched.
    Every backend keeps this contract (SQLite: a `mode=ro` connection and no other;
    PostgreSQL: read-only transactions, `default_transaction_read_only` on every
    connection).
    """
    if database.url is not None:
        # Imported here: asyncpg and the PostgreSQL store are ~0.1 s of every command's
        # start, and a SQLite user never needs them.
        from batchd.store.postgres.connection import PostgresTarget  # noqa: PLC0415
        from batchd.store.postgres.store import PostgresStore  # noqa: PLC0415

        target = PostgresTarget(database.url, database.schema)
        return await PostgresStore.open(target, clock=clock, migrate=migrate, read_only=read_only)
    return await SqliteStore.open(
        database.path,
        busy_timeout_ms=database.busy_timeout_ms,
        clock=clock,
        migrate=migrate,
        read_only=read_only,
    )
