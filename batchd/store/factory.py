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
) -> Store:
    """Open the store `[database]` names, applying missing migrations unless `migrate` is
    False (then a newer schema is still refused, and nothing is written).

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
        database.path, busy_timeout_ms=database.busy_timeout_ms, clock=clock, migrate=migrate
    )
