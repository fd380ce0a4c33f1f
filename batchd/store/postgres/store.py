"""`PostgresStore`: the store interface on a PostgreSQL database, composed of one part per
job, as `SqliteStore` is (`tasks`, `batches`, `writeback`, `operations`, `views`,
`harvest`, `accounts`).

The parts reach the server only through `PostgresDatabase` (database.py): the pool, the
shielded one-transaction writes, reads. Write-back lanes are connections of their own.
See `batchd/store/interface.py` for the contract and docs/design.md for the transactions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from batchd.store.postgres import migrations, readonly
from batchd.store.postgres.accounts import PostgresAccounts
from batchd.store.postgres.actions import OperatorActions
from batchd.store.postgres.batches import BatchTracking
from batchd.store.postgres.collecting import SharedCollection
from batchd.store.postgres.connection import DEFAULT_POOL_SIZE, PostgresTarget, connect
from batchd.store.postgres.database import Clock, PostgresDatabase, utc_now
from batchd.store.postgres.harvest import Harvest
from batchd.store.postgres.leader import PostgresLeadership, leadership
from batchd.store.postgres.listen import listening
from batchd.store.postgres.listings import OperatorListings
from batchd.store.postgres.liveness import holder_liveness
from batchd.store.postgres.operations import UserOperations
from batchd.store.postgres.tasks import TaskIntake
from batchd.store.postgres.views import OperatorViews
from batchd.store.postgres.writeback import LanePool, WriteBack
from batchd.store.values import SchemaVersions

# asyncpg's pool logs a traceback for every failed reconnect during an outage; the store
# reports outages itself (PostgresUnavailableError, naming the masked DSN), once.
logging.getLogger("asyncpg").setLevel(logging.CRITICAL)


class PostgresStore(
    TaskIntake,
    BatchTracking,
    WriteBack,
    UserOperations,
    OperatorViews,
    OperatorListings,
    OperatorActions,
    Harvest,
    SharedCollection,
):
    """A pool of a few connections for every statement, and two write-back lanes."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database
        self._lanes = LanePool(database)
        self._accounts = PostgresAccounts(database)

    @classmethod
    async def open(
        cls,
        target: PostgresTarget,
        *,
        clock: Clock | None = None,
        migrate: bool = True,
        pool_size: int = DEFAULT_POOL_SIZE,
        read_only: bool = False,
    ) -> PostgresStore:
        """Check (and unless `migrate` is False, migrate) the schema, then open the pool.

        The schema first, on a connection of its own: a foreign `tasks` table or a newer
        schema is refused before any pooled connection exists.
        """
        if read_only:  # every session read-only; never migrated (readonly.py)
            target = dataclasses.replace(target, read_only=True)
        conn = await connect(target)
        try:
            if read_only:
                await readonly.check_readable(conn, target)
            elif migrate:
                await migrations.migrate(conn, target)
            else:
                await migrations.check_schema(conn, target)
        finally:
            await conn.close()
        database = await PostgresDatabase.open(target, clock or utc_now, pool_size)
        return cls(database)

    @property
    def database(self) -> PostgresDatabase:
        """The pool and the clock (for tests that inspect them)."""
        return self._db

    @property
    def accounts(self) -> PostgresAccounts:
        """Usage, sizes, gaps and pruning, on this store's pool."""
        return self._accounts

    async def close(self) -> None:
        """Let a write in progress finish (it may be shielded from its caller), then close."""
        await self._db.close()
        await self._lanes.close()

    def leadership(
        self, stop: asyncio.Event, on_standby: Callable[[str], None]
    ) -> AbstractAsyncContextManager[PostgresLeadership]:
        """Lead the daemons on this database (leader.py); claims are fenced meanwhile."""
        self._db.check_writable()
        return leadership(self._db, stop, on_standby)

    def collector_liveness(self, holder: str) -> AbstractAsyncContextManager[None]:
        """Hold `holder`'s liveness lock on a connection of its own (liveness.py): its
        collection leases are taken over at once after it dies, not at their expiry."""
        self._db.check_writable()
        return holder_liveness(self._db, holder)

    def listen_for_tasks(self, wake: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """LISTEN on a connection of its own for the insert trigger's NOTIFY (listen.py)."""
        self._db.check_open()
        return listening(self._db, wake)

    async def migrate(self) -> list[int]:
        """Apply every shipped migration not yet recorded, each in its own transaction."""
        self._db.check_writable()
        conn = await connect(self._db.target)
        try:
            return await migrations.migrate(conn, self._db.target)
        finally:
            await conn.close()

    async def schema_versions(self) -> SchemaVersions:
        """The schema version the database records and the newest this batchd ships."""
        return await readonly.schema_versions(self._db)
