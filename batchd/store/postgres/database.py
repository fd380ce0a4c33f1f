"""The PostgreSQL core: a small pool, shielded transactions, reads, and the store's clock.

Every write is one transaction on a pooled connection, run in a task of its own that the
caller's cancellation cannot stop (a cancelled statement still runs on the server, so a
caller must never see half of one: interface.py). Server and network errors become
`PostgresError`s naming the masked DSN (connection.py); our own bugs pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar

import asyncpg

from batchd.crashpoints import crash_point
from batchd.store.errors import SchemaTooNewError, SchemaTooOldError, StoreError
from batchd.store.postgres import migrations
from batchd.store.postgres.connection import (
    Conn,
    PostgresTarget,
    acquired,
    connect,
    create_pool,
)

Clock = Callable[[], datetime]
Row = asyncpg.Record
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Lease:
    """The leader lock as pg_locks shows it (leader.py): which backend holds which keys."""

    pid: int
    classid: int
    objid: int


class Rollback(Exception):
    """Raised inside a transaction body to undo it; never leaves the store."""


class PostgresDatabase:
    """The pool, the clock, and the one way to write (`transact`)."""

    def __init__(self, target: PostgresTarget, pool: asyncpg.Pool, clock: Clock) -> None:
        self.target = target
        self._pool = pool
        self._clock = clock
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False
        # Set while this daemon leads (leader.py): every claim is fenced by it.
        self.lease: Lease | None = None

    @classmethod
    async def open(cls, target: PostgresTarget, clock: Clock, pool_size: int) -> PostgresDatabase:
        return cls(target, await create_pool(target, pool_size), clock)

    @property
    def shown(self) -> str:
        return self.target.shown

    async def close(self) -> None:
        """Let a write in progress finish (it may be shielded from its caller), then close."""
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self._pool.terminate() if self._pool.is_closing() else await self._close_pool()

    async def _close_pool(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=5.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()  # a server gone away must not hold up a shutdown

    def check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.shown}: the store is closed")

    @property
    def read_only(self) -> bool:
        return self.target.read_only

    def check_writable(self) -> None:
        """Refuse a write on a store opened read-only, before any connection is touched."""
        self.check_open()
        if self.read_only:
            raise StoreError(f"{self.shown}: the store was opened read-only")

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (a write-back lane, LISTEN); the caller closes it."""
        self.check_writable()
        return await connect(self.target)

    def now(self) -> datetime:
        return to_millis(self._clock())

    async def transact(
        self, body: Callable[Concatenate[Conn, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`body(conn, ...)` as one transaction on a pooled connection, shielded."""
        self.check_writable()

        async def run() -> T:
            async with acquired(self._pool, self.target, "write to") as conn:
                return await in_transaction(conn, body, *args, **kwargs)

        return await self.shielded(run())

    async def shielded(self, work: Awaitable[T]) -> T:
        """Run `work` in a task the caller's cancellation cannot stop; close() waits for it."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def read(self, sql: str, *params: Any) -> list[Row]:
        """One statement on a pooled connection, fully fetched (no long read transaction)."""
        self.check_open()
        async with acquired(self._pool, self.target, "read") as conn:
            try:
                return list(await conn.fetch(sql, *params))
            except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as exc:
                mismatch = await self._schema_mismatch(conn, exc)
                if mismatch is None:
                    raise
                raise mismatch from exc

    async def read_in_key_order(self, sql: str, *params: Any) -> list[Row]:
        """`read` for a keyset page (`... WHERE status = $1 AND id > $2 ORDER BY id LIMIT
        $3`), planned without a sort: read from the index in key order, never every row
        of the status sorted for one page. The statistics of a queue go stale within a run
        (100,000 tasks pending where ANALYZE saw none), and a page planned from them read
        and sorted every pending row: 0.25-0.4 s a page of 1,000 (bench/README.md)."""
        self.check_open()
        async with (
            acquired(self._pool, self.target, "read") as conn,
            conn.transaction(readonly=True),
        ):
            await conn.execute("SET LOCAL enable_sort = off")
            return list(await conn.fetch(sql, *params))

    @contextlib.asynccontextmanager
    async def key_order_sessions(self, count: int) -> AsyncIterator[list[Conn]]:
        """Up to `count` pooled connections (one left to the pool's other users, when it
        has more than one) for a run of keyset pages (an export), each planned as
        `read_in_key_order` plans (no sort) and without JIT (a plan priced with a disabled
        sort crosses `jit_above_cost`: 0.2 s of compiling for a page of 7 ms), set once a
        session (the pool's RESET ALL at release undoes it). Each page is its own
        statement: no transaction held between pages, one round trip a page."""
        self.check_open()
        usable = max(1, min(count, self._pool.get_max_size() - 1))
        async with contextlib.AsyncExitStack() as stack:
            conns: list[Conn] = []
            for _ in range(usable):
                conn = await stack.enter_async_context(acquired(self._pool, self.target, "read"))
                await conn.execute("SET enable_sort = off; SET jit = off")
                conns.append(conn)
            yield conns

    async def _schema_mismatch(self, conn: Conn, exc: asyncpg.PostgresError) -> StoreError | None:
        """A read of another version's schema that needs what that version lacks: refused,
        naming both versions, as the SQLite store refuses it (a read-only open reads other
        versions where it can). None at this batchd's version: then it is a bug of ours."""
        recorded = 0
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            recorded = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"
            )
        supported = max((m.version for m in migrations.shipped_migrations()), default=0)
        where = (
            self.shown
            if self.target.schema is None
            else f"{self.shown} (schema {self.target.schema!r})"
        )
        found = f"database {where} has schema version {recorded}"
        if recorded > supported:
            return SchemaTooNewError(
                f"{found}, newer than this batchd supports ({supported}), and this read "
                f"needs what it changed ({exc}): use the batchd that migrated it"
            )
        if recorded < supported:
            return SchemaTooOldError(
                f"{found}, older than this batchd's ({supported}), and this read needs what "
                f"the missing migrations add ({exc}): run `batchd migrate` (stop an older "
                "batchd daemon first)"
            )
        return None

    async def read_one(self, sql: str, *params: Any) -> Row:
        rows = await self.read(sql, *params)
        return rows[0]


async def in_transaction(
    conn: Conn,
    body: Callable[Concatenate[Conn, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`body(conn, ...)` between BEGIN and COMMIT (ROLLBACK on any exception)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        result = await body(conn, *args, **kwargs)
        crash_point("store_commit")  # tests/crash: a kill -9 inside a transaction
    except BaseException:
        # The server may already have ended the session (a restart): the original error
        # is the one to report, not the rollback's.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            if not conn.is_closed():
                await transaction.rollback()
        raise
    await transaction.commit()
    return result


def count_of(status: str) -> int:
    """The row count of an asyncpg command tag (`UPDATE 3` -> 3)."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


def text_time(moment: datetime | None) -> str | None:
    """A timestamptz as the SQLite store shows times, `%Y-%m-%dT%H:%M:%S.fffZ`."""
    if moment is None:
        return None
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def to_millis(moment: datetime) -> datetime:
    """Times kept to the millisecond, as the SQLite store keeps them: the same clock gives
    the same stored times on both."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def utc_now() -> datetime:
    return datetime.now(UTC)


def ids(values: Sequence[int]) -> list[int]:
    return [int(value) for value in values]
