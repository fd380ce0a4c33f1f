"""`SqliteStore`: the store interface on one SQLite file, composed of one part per job.

The parts (`tasks`, `batches`, `writeback`, `operations`, `views`, `harvest`, `accounts`)
each hold the SQL of their job and reach the database only through `SqliteDatabase`'s
public methods (`database.py`): the writer lock, shielded transactions, the reader. See
`batchd/store/interface.py` for the contract and docs/design.md for the transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import structlog

from batchd.store.sqlite import migrations, staging
from batchd.store.sqlite.accounts import SqliteAccounts
from batchd.store.sqlite.actions import OperatorActions
from batchd.store.sqlite.batches import BatchTracking
from batchd.store.sqlite.collecting import SharedCollection
from batchd.store.sqlite.database import Clock, Db, SqliteDatabase, utc_now
from batchd.store.sqlite.harvest import Harvest
from batchd.store.sqlite.operations import UserOperations
from batchd.store.sqlite.tasks import TaskIntake
from batchd.store.sqlite.views import OperatorViews
from batchd.store.sqlite.writeback import LanePool, SqliteWriteBackLane, WriteBack
from batchd.store.values import SchemaVersions

log = structlog.get_logger("batchd.store")


class SqliteStore(
    TaskIntake,
    BatchTracking,
    WriteBack,
    UserOperations,
    OperatorViews,
    OperatorActions,
    Harvest,
    SharedCollection,
):
    """One writer connection behind an asyncio.Lock, one reader connection, and the
    write-back lanes (each a connection whose writes to the database take that lock too)."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._db = database
        self._main_lane = SqliteWriteBackLane(database, database.main)
        self._lanes = LanePool(database)
        self._accounts = SqliteAccounts(database)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        clock: Clock | None = None,
        migrate: bool = True,
        read_only: bool = False,
    ) -> SqliteStore:
        """Open (creating if needed) the database at `path`; apply missing migrations.

        `read_only`: never create, never migrate, never write (see `open_read_only`).
        """
        if read_only:
            return await cls.open_read_only(
                path, busy_timeout_ms=busy_timeout_ms, clock=clock or utc_now
            )
        database = await SqliteDatabase.open(
            path, busy_timeout_ms=busy_timeout_ms, clock=clock or utc_now,
            prepare_writer=_attach_staging,
        )  # fmt: skip
        try:
            store = cls(database)
            if migrate:
                await store.migrate()
            else:
                await migrations.check_version(database, migrations.shipped_migrations())
        except BaseException:
            await database.close()
            raise
        return store

    @classmethod
    async def open_read_only(cls, path: Path, *, busy_timeout_ms: int, clock: Clock) -> SqliteStore:
        """The existing database at `path`, `mode=ro`: a missing file or one without a
        batchd schema is refused; a schema of another version is read where it can be (a
        read that needs what it lacks raises SchemaTooOldError / SchemaTooNewError)."""
        database = await SqliteDatabase.open_read_only(
            path, busy_timeout_ms=busy_timeout_ms, clock=clock
        )
        try:
            versions = await migrations.check_readable_schema(database)
        except BaseException:
            await database.close()
            raise
        if versions.recorded != versions.supported:
            log.warning(
                "schema_version_differs",
                database=str(path),
                schema_version=versions.recorded,
                supported=versions.supported,
                detail="read where this batchd can; never migrated by a read-only command",
            )
        return cls(database)

    @property
    def database(self) -> SqliteDatabase:
        """The connections and the write lock (for tests that inspect or fault them)."""
        return self._db

    @property
    def lanes(self) -> LanePool:
        return self._lanes

    @property
    def accounts(self) -> SqliteAccounts:
        """Usage, sizes, gaps and pruning, on this store's connections."""
        return self._accounts

    async def close(self) -> None:
        """Let a write in progress finish (it may be shielded from its caller), then close."""
        await self._db.close()

    async def migrate(self) -> list[int]:
        """Apply every shipped migration not yet recorded, each in its own transaction."""
        self._db.check_writable()
        return await migrations.migrate(self._db)

    @asynccontextmanager
    async def leadership(
        self, stop: asyncio.Event, on_standby: Callable[[str], None]
    ) -> AsyncIterator[AlwaysLeading]:
        """The daemon's file lock already admits one: it leads, for good."""
        yield AlwaysLeading()

    def collector_liveness(self, holder: str) -> AbstractAsyncContextManager[None]:
        """Nothing to hold: the file lock admits one daemon, whose leases are its own."""
        return contextlib.nullcontext()

    def listen_for_tasks(self, wake: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """Nothing to listen to: SQLite has no notifications across processes; the
        daemon's poll tick finds new tasks."""
        return contextlib.nullcontext()

    async def schema_versions(self) -> SchemaVersions:
        """The schema version the database records and the newest this batchd ships."""
        return await migrations.schema_versions(self._db)

    # --- issue 14 reads ---
    # Read-only methods for operator views go in a part of their own (`views.py`, the
    # `OperatorViews` mixin), through `self._db.read(...)`, and into `Store`.


class AlwaysLeading:
    """The one daemon a SQLite file admits (its file lock) leads for good."""

    @property
    def leading(self) -> bool:
        return True

    async def acquired(self) -> bool:
        return True


async def _attach_staging(db: Db) -> None:
    # Looked up at each call: tests replace staging.attach_staging to make it fail.
    await staging.attach_staging(db)
