"""This daemon's sign of life on the database, so that its collection leases die with it.

A collection lease (collecting.py) is taken over at its expiry; a holder whose process
died (kill -9, OOM, a reboot: even one systemd restarts at once, under a new instance
name) left its batch waiting up to `[results] lease_seconds`. So each daemon holds, for
its whole life, a session advisory lock keyed by its instance name, on a connection of its
own that is never pooled (pitfalls: a session lock belongs to one connection). The server
ends the session, and the lock with it, as soon as the process dies (its kernel closes the
socket) or, host gone, once the keepalives fail (~9 s, connection.py). A lease whose
holder held this lock when it took the lease, and whose lock is free now, is free at once.

Key space: (LOCK_NAMESPACE + 3, hashtext(schema || ' ' || instance)). The leader lock is
(LOCK_NAMESPACE + 1, hashtext(schema)), the fence + 2, migrations + 0: another first key,
so no instance name can ever stand for the leader lock. Two instances whose hashes collide
only make each other look alive (their leases are then taken at expiry, as before).

A liveness connection that breaks while the process lives (a network cut, an
administrator's pg_terminate_backend) makes this daemon look dead: its leases may be
taken over at once. That holder is the "cut-off holder" the lease already makes harmless
(docs/postgresql-design.md): its renewal finds the batch taken and it stops, its finish is
refused, its applies are guarded. It takes the lock again as soon as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import structlog

from batchd.store.errors import StoreError
from batchd.store.postgres.connection import until_session_ends
from batchd.store.postgres.database import PostgresDatabase
from batchd.store.postgres.migrations import LOCK_NAMESPACE

log = structlog.get_logger("batchd.store.postgres.liveness")
LIVENESS_KEY = LOCK_NAMESPACE + 3
# The second key of `holder`'s lock, in SQL: the same expression wherever it is asked.
# The schema belongs to it: daemons of two installations never share a lock.
HOLDER_HASH = "hashtext(coalesce(current_schema(), '') || ' ' || {holder})"
# A try waits no longer than this (the first one holds up the collector's start): the
# daemon goes on anyway, its leases taken at expiry (as without the lock) until a later
# try wins it.
TRY_S = 5.0
RETRY_S = 1.0
# A ping keeps the session from looking idle (idle_session_timeout) and notices a server
# that vanished without closing the connection.
PING_S = 5.0
_BUSY = (
    "another session holds this daemon's key: the same instance name elsewhere, a hash"
    " collision, or a take asking about it at that instant; trying again"
)
_UNAVAILABLE = (StoreError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def holder_lock_free(holder_sql: str) -> str:
    """SQL true when `holder`'s liveness lock is held by no session: a shared try, so
    takers asking at once never fail each other, and it is given back at COMMIT. False
    (held) is also what a live holder's own pooled connections see of it."""
    key = HOLDER_HASH.format(holder=holder_sql)
    return f"pg_try_advisory_xact_lock_shared({LIVENESS_KEY}, {key})"


class HolderLiveness:
    """Holds `holder`'s liveness lock on a connection of its own, and takes it again
    whenever the connection was lost, until `release`."""

    def __init__(self, database: PostgresDatabase, holder: str) -> None:
        self._database = database
        self._holder = holder
        self._conn: asyncpg.Connection | None = None
        self.said_busy = False

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def take(self) -> bool:
        """One try: connect and lock; True when this connection now holds the lock."""
        conn = await self._database.connect()
        try:
            won = await conn.fetchval(
                f"SELECT pg_try_advisory_lock({LIVENESS_KEY}, {HOLDER_HASH.format(holder='$1')})",
                self._holder,
            )
        except BaseException:
            conn.terminate()
            raise
        if not won:
            conn.terminate()
            if not self.said_busy:
                self.said_busy = True
                log.warning("liveness_lock_busy", holder=self._holder,
                            database=self._database.shown, reason=_BUSY)  # fmt: skip
            return False
        self._conn = conn
        log.info("liveness_lock_held", holder=self._holder, database=self._database.shown)
        return True

    async def try_take(self) -> None:
        """`take`, an unreachable server logged (the daemon goes on; its leases are
        taken at expiry meanwhile)."""
        try:
            async with asyncio.timeout(TRY_S):
                await self.take()
        except _UNAVAILABLE as exc:
            error = str(exc) or type(exc).__name__  # a TimeoutError says nothing itself
            log.warning("liveness_lock_unavailable", holder=self._holder,
                        database=self._database.shown, error=error)  # fmt: skip

    async def keep(self) -> None:
        """Hold the lock for ever: watch its session, take it again once it ended."""
        while True:
            if not self.held:
                await self.try_take()
            if self._conn is None:
                await asyncio.sleep(RETRY_S)
                continue
            with contextlib.suppress(*_UNAVAILABLE):  # a failed ping: the session is gone
                await until_session_ends(self._conn, PING_S)
            log.warning("liveness_lock_lost", holder=self._holder, database=self._database.shown)
            self.release()

    def release(self) -> None:
        """End the session: the lock goes with it (a shutdown, or a connection found dead)."""
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


@asynccontextmanager
async def holder_liveness(database: PostgresDatabase, holder: str) -> AsyncIterator[None]:
    """`holder`'s liveness lock held for the duration (tried once before entering, for at
    most TRY_S; if that failed, by the watch, later)."""
    liveness = HolderLiveness(database, holder)
    await liveness.try_take()
    task = asyncio.create_task(liveness.keep(), name="batchd-liveness")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        liveness.release()
