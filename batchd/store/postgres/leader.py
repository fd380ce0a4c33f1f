"""One daemon leads on a PostgreSQL database; any others stand by and take over.

The leader holds a session advisory lock on a connection of its own, never pooled (a
session lock on a pooled connection would go to whoever borrows it next). The lock ends
with the session: a leader killed with -9 is replaced at the standby's next try (every
second); a leader whose host vanished, once the server's keepalives end its session
(~9 s, connection.py). A leader that loses its lock connection stops at once.

Fencing: a cut-off leader does not know it. Every claim (`record_intent`) takes a shared
transaction-level advisory lock and checks, in its own transaction, that the leader lock
is still held by this daemon's lock session; a new leader takes that lock exclusively
once, right after winning, before it reads any `creating` batch. So an old leader's claim
either committed before the take-over (and the new leader reconciles its batch) or
fails; it can never commit after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import structlog

from batchd.store.errors import StoreError
from batchd.store.postgres.connection import Conn, until_session_ends
from batchd.store.postgres.database import Lease, PostgresDatabase
from batchd.store.postgres.migrations import LOCK_NAMESPACE

log = structlog.get_logger("batchd.store.postgres.leader")
LEADER_KEY = LOCK_NAMESPACE + 1
FENCE_KEY = LOCK_NAMESPACE + 2
TRY_EVERY_S = 1.0
PING_S = 2.0
_SCHEMA_HASH = "hashtext(coalesce(current_schema(), ''))"


async def check_fence(conn: Conn, lease: Lease) -> bool:
    """In a claim's transaction: still the leader? (Holds the fence shared till COMMIT.)"""
    await conn.execute(f"SELECT pg_advisory_xact_lock_shared($1, {_SCHEMA_HASH})", FENCE_KEY)
    held = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND pid = $1 AND classid = $2::bigint::oid AND objid = $3::bigint::oid)",
        lease.pid,
        lease.classid,
        lease.objid,
    )
    return bool(held)


class PostgresLeadership:
    """Leads, or tries to, for as long as the context of `leadership` lasts: a lost lock
    (the server restarted, the session was ended) is tried for again, and meanwhile
    `leading` is False and every claim of this daemon fails its fence."""

    def __init__(
        self, database: PostgresDatabase, stop: asyncio.Event, on_standby: Callable[[str], None]
    ) -> None:
        self._database = database
        self._stop = stop
        self._on_standby = on_standby
        self._leading = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    async def acquired(self) -> bool:
        """Wait until this daemon leads (True) or is stopped (False)."""
        stopping = asyncio.ensure_future(self._stop.wait())
        leading = asyncio.ensure_future(self._leading.wait())
        await asyncio.wait((stopping, leading), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        leading.cancel()
        return self.leading and not self._stop.is_set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = await _win(self._database, self._stop, self._on_standby)
            except StoreError as exc:  # refused (a password changed under us): say so, retry
                # A message that says what to fix, not a traceback: as daemon.py's refusals.
                log.error("leader_lock_refused", database=self._database.shown, error=str(exc))  # noqa: TRY400
                await _sleep(self._stop, 10 * TRY_EVERY_S)
                continue
            if conn is None:
                return
            self._conn = conn
            self._leading.set()
            try:
                await _watch(conn, self._stop)
            finally:
                # The lease stays as it was: its session is gone, so every claim's fence
                # fails until the lock is won again (a new lease).
                self._leading.clear()
                conn.terminate()
                self._conn = None

    def release(self) -> None:
        if self._conn is not None:
            self._conn.terminate()  # the lock goes with the session: a standby takes over


@asynccontextmanager
async def leadership(
    database: PostgresDatabase, stop: asyncio.Event, on_standby: Callable[[str], None]
) -> AsyncIterator[PostgresLeadership]:
    """Try to lead for the duration (see PostgresLeadership)."""
    lead = PostgresLeadership(database, stop, on_standby)
    task = asyncio.create_task(lead.run(), name="batchd-leadership")
    try:
        yield lead
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lead.release()
        database.lease = None


async def _win(
    database: PostgresDatabase, stop: asyncio.Event, on_standby: Callable[[str], None]
) -> asyncpg.Connection | None:
    waiting_said = False
    while not stop.is_set():
        try:
            conn = await database.connect()
        except StoreError as exc:
            if not exc.retryable:
                raise
            log.warning("leader_lock_unavailable", database=database.shown, error=str(exc))
            await _sleep(stop, TRY_EVERY_S)
            continue
        try:
            won = await conn.fetchval(
                f"SELECT pg_try_advisory_lock($1, {_SCHEMA_HASH})", LEADER_KEY
            )
            if won:
                row = await conn.fetchrow(
                    "SELECT pg_backend_pid(), classid::bigint, objid::bigint FROM pg_locks"
                    " WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                    " AND classid = $1::bigint::oid",
                    LEADER_KEY,
                )
                assert row is not None
                # Wait for an old leader's claims in flight, then none of its can commit.
                async with conn.transaction():
                    await conn.execute(f"SELECT pg_advisory_xact_lock($1, {_SCHEMA_HASH})",
                                       FENCE_KEY)  # fmt: skip
                database.lease = Lease(row[0], row[1], row[2])
                log.info("leadership_acquired", database=database.shown, backend_pid=row[0])
                return conn
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("leader_lock_unavailable", database=database.shown, error=str(exc))
        conn.terminate()
        if not waiting_said:
            waiting_said = True
            log.info("standby", database=database.shown,
                     reason="another daemon leads on this database")  # fmt: skip
            on_standby("standby: another daemon leads on this database")
        await _sleep(stop, TRY_EVERY_S)
    return None


async def _watch(conn: asyncpg.Connection, stop: asyncio.Event) -> None:
    """Return once the lock's session ends (the server restarted, or ended it), or the
    daemon stops (not only a cancellation ends it: connection.py)."""
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                             TimeoutError):  # fmt: skip
        await until_session_ends(conn, PING_S, stop)
    if not stop.is_set():
        log.warning("leadership_lost", reason="the leader lock's session ended; trying again")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
