"""The SQLite core: connections, pragmas, the one writer lock, and shielded transactions.

One writer connection behind an asyncio.Lock (pitfalls: coroutines sharing a connection
share its transaction), one reader connection, and whatever connections the write-back
lanes open (`open_connections`), whose writes to the database take the same lock. Every
write is one `BEGIN IMMEDIATE` transaction run in a shielded inner task, so a cancelled
caller never leaves half of one behind. The other modules of this package go through the
public methods of `SqliteDatabase` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

import aiosqlite
import orjson

from batchd.crashpoints import crash_point
from batchd.store.errors import SchemaTooNewError, SchemaTooOldError, StoreError
from batchd.store.sqlite.readonly import READ_ONLY_HINTS, check_readable, read_only_uri
from batchd.store.values import SchemaVersions

Clock = Callable[[], datetime]
Db = aiosqlite.Connection
Row = tuple[Any, ...]
# How a store call holds a connection: a write transaction, a transaction that writes only
# the staging database, or no transaction at all (ATTACH and DETACH refuse to run in one).
WriteMode = Literal["immediate", "staging", "no_transaction"]
P = ParamSpec("P")
T = TypeVar("T")

# Bigger pages and cache roughly halve the shuffled UPDATEs of the write-back (pitfalls).
PAGE_SIZE = 16384
_PRAGMAS = (
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    # 16 MB, the writer's and each write-back lane's: a lane's applied range is ~7 MB of pages
    # for 5,000 tasks; the writer's claims and polls were no faster with 64 MB, which only
    # grew the daemon (bench/memory.py: 163 → 134 MB). The lanes were slower with 8 MB.
    "PRAGMA cache_size = -16384",
    # No temp_store = MEMORY: a multi-row UPDATE keeps a statement journal of every page it
    # changes, which in memory grew the daemon by ~340 MB claiming a 256 MB batch (bench/).
)
# The reader streams pending rows and counts: the OS page cache serves it as well, and a
# second 64 MB cache filled by reading a 256 MB batch's params would be ~30% of the RSS.
_READER_CACHE = "PRAGMA cache_size = -8192"
# What to tell a user for the SQLite errors that come from the environment.
_HINTS = (
    ("readonly", "this user must be able to write the file and its directory"),
    ("unable to open", "the directory must exist and be writable by this user"),
    ("disk is full", "free some disk space"),
    ("not a database", "the path points at a file that is not a SQLite database"),
    ("locked", "another process held the write lock longer than busy_timeout_ms"),
)


@dataclass(slots=True)
class Connection:
    """A connection that writes, and the lock that gives it one transaction at a time."""

    db: Db
    lock: asyncio.Lock


class Rollback(Exception):
    """Raised inside a transaction body to undo it; never leaves the store."""


class SqliteDatabase:
    """The database file: its writer (with the store's one write lock) and its reader."""

    def __init__(
        self, path: Path, stack: AsyncExitStack, writer: Db, reader: Db, clock: Clock, *,
        busy_timeout_ms: int, read_only: bool = False,
    ) -> None:  # fmt: skip
        self.path = path
        self.read_only = read_only
        # Set by a read-only open whose schema is not this batchd's: a read that needs a
        # table or column that version lacks is refused naming both versions.
        self.schema_versions: SchemaVersions | None = None
        self._stack = stack
        self._reader = reader
        self._clock = clock
        self._busy_timeout_ms = busy_timeout_ms
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False
        # The writer and the store's lock: every write to the database file holds it.
        self.main = Connection(writer, asyncio.Lock())

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int,
        clock: Clock,
        prepare_writer: Callable[[Db], Awaitable[None]],
    ) -> SqliteDatabase:
        """Connect the writer (then `prepare_writer(writer)`) and the read-only reader."""
        stack = AsyncExitStack()
        try:
            with sqlite_errors(path, "open"):
                _create_group_writable(path)
                writer = await connect(stack, path, busy_timeout_ms, new_page_size=True)
                await prepare_writer(writer)
                reader = await connect(stack, path, busy_timeout_ms, new_page_size=False)
                # A stray write through the reader would bypass the lock: forbid it.
                await reader.execute("PRAGMA query_only = ON")
                await reader.execute(_READER_CACHE)
        except BaseException:
            await stack.aclose()
            raise
        return cls(path, stack, writer, reader, clock, busy_timeout_ms=busy_timeout_ms)

    @classmethod
    async def open_read_only(
        cls, path: Path, *, busy_timeout_ms: int, clock: Clock
    ) -> SqliteDatabase:
        """One `mode=ro` connection: never creates the file, never writes (readonly.py)."""
        check_readable(path)
        stack = AsyncExitStack()
        try:
            with sqlite_errors(path, "open", read_only=True):
                reader = await aiosqlite.connect(
                    read_only_uri(path), uri=True, isolation_level=None
                )
                stack.push_async_callback(close_connection, reader)
                await reader.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                await reader.execute("PRAGMA query_only = ON")
                await reader.execute(_READER_CACHE)
                # The first read maps the -wal/-shm files: their errors are said here.
                await reader.execute_fetchall("SELECT count(*) FROM sqlite_master")
        except BaseException:
            await stack.aclose()
            raise
        # No writer: `main` is the reader, and every write path refuses first.
        return cls(
            path, stack, reader, reader, clock, busy_timeout_ms=busy_timeout_ms, read_only=True
        )

    @property
    def writer(self) -> Db:
        return self.main.db

    @property
    def reader(self) -> Db:
        """The read-only connection (tests trace its statements and their plans)."""
        return self._reader

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held by every write to the database file, whichever connection makes it."""
        return self.main.lock

    async def close(self) -> None:
        """Let a write in progress finish (it may be shielded from its caller), then close."""
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._stack.aclose()

    def check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")

    def check_writable(self) -> None:
        """Refuse a write on a store opened read-only, before any connection is touched."""
        self.check_open()
        if self.read_only:
            raise StoreError(f"{self.path}: the store was opened read-only; this would write")

    async def open_connections(
        self, count: int, prepare: Callable[[Db], Awaitable[None]]
    ) -> list[Db]:
        """`count` more connections, each prepared, closed with the store; all or none.

        Connections half opened by a failed attempt (out of file descriptors, a temporary
        directory that refuses a file) are closed at once, not kept until the store closes
        while every retry opens more.
        """
        self.check_writable()
        opened: list[Db] = []
        async with AsyncExitStack() as opening:
            for _ in range(count):
                with sqlite_errors(self.path, "open"):
                    db = await connect(
                        opening, self.path, self._busy_timeout_ms, new_page_size=False
                    )
                    await prepare(db)
                opened.append(db)
            self.check_open()
            self._stack.push_async_callback(opening.pop_all().aclose)
        return opened

    # -- transactions ------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, mode: WriteMode, conn: Connection) -> AsyncIterator[Db]:
        """The one way to write: the locks, `BEGIN IMMEDIATE`, COMMIT or ROLLBACK.

        Every write to the database file holds the store's lock, whichever connection makes
        it: our own connections never wait on each other in SQLite's busy handler. A lane's
        staging-only transaction holds only the lane's lock, so it runs while another
        connection writes.
        """
        async with AsyncExitStack() as locks:
            if mode == "immediate" and conn.lock is not self.write_lock:
                await locks.enter_async_context(self.write_lock)  # always before a lane's lock
            await locks.enter_async_context(conn.lock)
            db = conn.db
            if mode == "no_transaction":  # ATTACH / DETACH: refused inside a transaction
                yield db
                return
            # IMMEDIATE waits for the write lock under busy_timeout; a deferred transaction
            # that upgrades would fail at once with "database is locked" (pitfalls). A body
            # that writes only the staging database never upgrades: its deferred BEGIN
            # takes no write lock on the database file, so users' INSERTs do not wait.
            await db.execute("BEGIN" if mode == "staging" else "BEGIN IMMEDIATE")
            try:
                yield db
                if mode == "immediate":
                    crash_point("store_commit")  # tests/crash: a kill -9 inside a transaction
                await db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (disk full, I/O error).
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise

    async def transact(
        self, body: Callable[Concatenate[Db, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `body(db, ...)` as one transaction in a task the caller's cancellation can't stop.

        Cancelling an awaited statement does not stop it (pitfalls), so a cancelled caller
        must not be able to interrupt the body between statements either.
        """
        return await self.shielded("immediate", self.main, body, *args, **kwargs)

    async def shielded(
        self,
        mode: WriteMode,  # positional, as `conn`: keywords belong to the body
        conn: Connection,
        body: Callable[Concatenate[Db, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`body(db, ...)` on `conn` in `mode`, shielded from the caller's cancellation."""
        self.check_writable()

        async def run() -> T:
            with sqlite_errors(self.path, "write to"):
                async with self._write(mode, conn) as db:
                    return await body(db, *args, **kwargs)

        task = asyncio.create_task(run(), name="batchd-store-write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    @asynccontextmanager
    async def exclusive_writer(self, action: str) -> AsyncIterator[Db]:
        """The writer under the store's lock, outside any transaction (VACUUM)."""
        self.check_writable()
        async with self.write_lock:
            with sqlite_errors(self.path, action):
                yield self.writer

    async def hold_writes(self, seconds: float) -> None:
        """No write of ours, on any connection, for `seconds`: a user's write waiting in
        SQLite's busy handler gets the lock at its next try."""
        if self.read_only:
            return  # nothing of ours writes
        async with self.write_lock:
            await asyncio.sleep(seconds)

    async def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        """One statement on the reader, fully fetched: no read transaction outlives it."""
        with sqlite_errors(self.path, "read", read_only=self.read_only), _schema_errors(self):
            return cast(list[Row], list(await self._reader.execute_fetchall(sql, params)))

    def now(self) -> str:
        return format_time(self._clock())


# -- connections -------------------------------------------------------------------------------


def _create_group_writable(path: Path) -> None:
    """Create a new database file 0660 (less the umask) rather than SQLite's 0644.

    Users feed the daemon from other accounts through a shared group (docs/operations.md);
    SQLite copies the main file's mode onto -wal and -shm, so this one mode decides all.
    """
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o660))


async def connect(
    stack: AsyncExitStack, path: Path, busy_timeout_ms: int, *, new_page_size: bool
) -> Db:
    db = await aiosqlite.connect(path, isolation_level=None)
    stack.push_async_callback(close_connection, db)
    await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # page_size only takes effect before the first table exists.
    if new_page_size and next(iter(await db.execute_fetchall("PRAGMA page_count")))[0] == 0:
        await db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    mode = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot open database {path}: journal_mode is {mode}, WAL is required")
    for pragma in _PRAGMAS:
        await db.execute(pragma)
    return db


async def close_connection(db: Db) -> None:
    """Close `db` and return only once its worker thread has ended.

    aiosqlite resolves `close()` just before its worker thread leaves its loop, so a
    closed connection could still count as a live thread: a store that says its
    connections are closed (a failed lane opening, `close()`) must leave none behind.
    """
    await db.close()
    # aiosqlite does not expose its worker thread; a later version without the attribute
    # only loses this wait, never the close. The thread sets no event to await, and
    # join() would block the loop (to_thread would leave an executor thread instead).
    worker = getattr(db, "_thread", None)
    while isinstance(worker, threading.Thread) and worker.is_alive():  # noqa: ASYNC110
        await asyncio.sleep(0.001)


@contextmanager
def sqlite_errors(path: Path, action: str, *, read_only: bool = False) -> Iterator[None]:
    """SQLite errors from the environment become StoreError naming the path and a remedy."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise  # our bugs, not the environment's
    except sqlite3.Error as exc:
        message = f"cannot {action} database {path}: {exc}"
        hints = READ_ONLY_HINTS if read_only else _HINTS
        hint = next((hint for key, hint in hints if key in str(exc)), None)
        raise StoreError(f"{message} ({hint})" if hint else message) from exc


@contextmanager
def _schema_errors(database: SqliteDatabase) -> Iterator[None]:
    """A read of another version's schema that needs what that version lacks: refused,
    naming both versions (a read-only open reads other versions where it can)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        versions = database.schema_versions
        if versions is None or not str(exc).startswith("no such"):
            raise
        found = f"database {database.path} has schema version {versions.recorded}"
        if versions.recorded > versions.supported:
            raise SchemaTooNewError(
                f"{found}, newer than this batchd supports ({versions.supported}), and this "
                f"read needs what it changed ({exc}): use the batchd that migrated it"
            ) from exc
        raise SchemaTooOldError(
            f"{found}, older than this batchd's ({versions.supported}), and this read needs "
            f"what the missing migrations add ({exc}): run `batchd migrate` (stop an older "
            "batchd daemon first)"
        ) from exc


# -- statements --------------------------------------------------------------------------------


async def run(db: Db, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
    async with db.execute(sql, params) as cursor:
        return cursor.rowcount


async def run_many(db: Db, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    async with db.executemany(sql, rows) as cursor:
        return cursor.rowcount


# Transaction bodies for one-statement writes, so they need no method of their own.
async def run_in(db: Db, sql: str, params: Sequence[Any]) -> int:
    return await run(db, sql, params)


async def run_many_in(db: Db, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    return await run_many(db, sql, rows)


async def fetch_in(db: Db, sql: str, params: Sequence[Any]) -> list[Row]:
    return cast(list[Row], list(await db.execute_fetchall(sql, params)))


def json_list(values: Iterable[Any]) -> str:
    return orjson.dumps(list(values)).decode()


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """The SQL default's form, `%Y-%m-%dT%H:%M:%fZ` (milliseconds), so all of them sort."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def parse_optional_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
