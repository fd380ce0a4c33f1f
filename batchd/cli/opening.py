"""How each command opens the database: which may create it, migrate it, or write.

Only `run`, `migrate` and `enqueue` create or migrate the database (issue 14). The reads
(`status`, `results`, `estimate`, `batches`, `tasks`) open it read-only: a mistyped path
is an error naming it, never a new empty database, and another version's schema is read
where it can be, never altered. The other writes (`cancel`, `retry`, `prune`,
`acknowledge-duplicate`) need the database to exist at this batchd's schema version.

A migration is never applied under a running daemon: `batchd run` migrates with the
one-daemon lock held (service/daemon.py), and `migrate` / `enqueue` take the same lock
before migrating, so one started while a daemon of another version runs is refused
(exit 75) and the running daemon is left on the schema it knows.
"""

from __future__ import annotations

from batchd.config import DatabaseConfig
from batchd.service.exits import TemporaryError
from batchd.service.instancelock import AlreadyRunningError, daemon_lock
from batchd.store import DatabaseMissingError, SchemaTooOldError, Store, open_store
from batchd.store.dsn import mask_dsn

READ_ONLY_COMMANDS = frozenset({"status", "results", "estimate", "batches", "tasks"})
MIGRATING_COMMANDS = frozenset({"migrate", "enqueue"})


async def open_for_command(command: str, database: DatabaseConfig) -> Store:
    """The store as `command` may use it (see the module docstring)."""
    if command in READ_ONLY_COMMANDS:
        return await open_store(database, read_only=True)
    if command in MIGRATING_COMMANDS:
        return await open_migrating(database)
    return await open_current(database)


async def open_current(database: DatabaseConfig) -> Store:
    """An existing database at this batchd's schema, for a command that writes to it."""
    if database.url is None and not database.path.exists():
        raise DatabaseMissingError(
            f"no database at {database.path}: only `batchd run`, `migrate` and `enqueue` "
            "create one (check [database] path)"
        )
    store = await open_store(database, migrate=False)  # a newer schema is refused here
    try:
        recorded, supported = await store.schema_versions()
    except BaseException:
        await store.close()
        raise
    where = database.path if database.url is None else mask_dsn(database.url)
    if recorded == 0 and database.url is not None:  # a server's schema not created yet
        await store.close()
        raise DatabaseMissingError(
            f"no batchd schema in {where} (schema {database.schema or 'of the search_path'}): "
            "only `batchd run`, `migrate` and `enqueue` create one"
        )
    if recorded < supported:
        await store.close()
        raise SchemaTooOldError(
            f"database {where} has schema version {recorded}, older than this "
            f"batchd's ({supported}): run `batchd migrate` first"
        )
    return store


async def open_migrating(database: DatabaseConfig) -> Store:
    """Create or migrate as needed; a migration only while no daemon holds the lock."""
    if database.url is not None:  # a server's store keeps its own lock (issue 13)
        return await open_store(database)
    plan = f"create the database {database.path}"
    if database.path.exists():
        store = await open_store(database, migrate=False)
        try:
            recorded, supported = await store.schema_versions()
        except BaseException:
            await store.close()
            raise
        if recorded >= supported:  # nothing to apply (a newer one was refused at open)
            return store
        await store.close()
        plan = f"migrate the database's schema from version {recorded} to {supported}"
    try:
        # Held only while migrating: a daemon starting meanwhile waits for its restart.
        with daemon_lock(database.path):
            return await open_store(database)
    except AlreadyRunningError as running:
        raise TemporaryError(
            f"{running}. This batchd would {plan}, which the running daemon does not know: "
            "stop it (systemctl stop batchd), run `batchd migrate`, then start this version",
            event="migration_refused",
        ) from None
