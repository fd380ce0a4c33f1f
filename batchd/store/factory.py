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
) -> Store:
    """Open the store `[database]` names, applying missing migrations unless `migrate` is
    False (then a newer schema is still refused, and nothing is written).

    Today `[database] path`, a SQLite file. A `url` (issue 13: `postgresql://...`) will
    select the PostgreSQL store here; nothing else in batchd needs to know which it is.
    """
    return await SqliteStore.open(
        database.path, busy_timeout_ms=database.busy_timeout_ms, clock=clock, migrate=migrate
    )
