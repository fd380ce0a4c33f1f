"""Which store a configuration asks for."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from batchd.config import DatabaseConfig
from batchd.store.dsn import mask_dsn
from batchd.store.errors import StoreError
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

    `read_only=True` (`status`, `results`, `estimate`, `batches`, `tasks`): the store
    never creates the database or its schema, never migrates, never writes (every write
    method raises StoreError). A missing database raises DatabaseMissingError naming it;
    a schema of another version is read where it can be, and a read that needs what that
    version lacks raises SchemaTooOldError / SchemaTooNewError, the schema untouched.
    Every backend keeps this contract (SQLite: a `mode=ro` connection and no other).

    Today `[database] path`, a SQLite file. A `url` (issue 13: `postgresql://...`) will
    select the PostgreSQL store here; nothing else in batchd needs to know which it is.
    """
    if database.url is not None:
        # Until the PostgreSQL store exists: never fall back to the SQLite file while the
        # user believes their tasks go to PostgreSQL.
        raise StoreError(
            f"{mask_dsn(database.url)}: this batchd cannot run on PostgreSQL yet (the schema "
            "and connections exist, the store does not): use [database] path"
        )
    return await SqliteStore.open(
        database.path,
        busy_timeout_ms=database.busy_timeout_ms,
        clock=clock,
        migrate=migrate,
        read_only=read_only,
    )
