"""The wake-up on insert: LISTEN on a connection of its own for `tasks_notify_insert`.

Migration 001's trigger notifies channel `batchd_tasks` once per INSERT statement, at
COMMIT, with the schema as payload. A notification sent while the listener is
disconnected is lost, so after every (re)connect the listener wakes the submitter once
anyway (it re-checks the queue); the daemon's poll tick stays the fallback.
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
from batchd.store.postgres.database import PostgresDatabase

log = structlog.get_logger("batchd.store.postgres.listen")
CHANNEL = "batchd_tasks"
# A ping on the otherwise silent connection: a server that vanished without closing it
# (host down) is noticed within PING_S + the ping's own timeout.
PING_S = 5.0
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 15.0


@asynccontextmanager
async def listening(database: PostgresDatabase, wake: Callable[[], None]) -> AsyncIterator[None]:
    """While the context lasts, `wake()` soon after users commit new tasks in our schema."""
    task = asyncio.create_task(_listen_forever(database, wake), name="batchd-listen")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _listen_forever(database: PostgresDatabase, wake: Callable[[], None]) -> None:
    backoff = _BACKOFF_FIRST_S
    while True:
        try:
            await _listen_once(database, wake)
            backoff = _BACKOFF_FIRST_S  # it listened; lost the connection later
        except (StoreError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("listen_unavailable", database=database.shown, error=str(exc),
                        retry_in_s=backoff)  # fmt: skip
        except TimeoutError:
            log.warning("listen_unavailable", database=database.shown, error="ping timed out",
                        retry_in_s=backoff)  # fmt: skip
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _BACKOFF_MAX_S)


async def _listen_once(database: PostgresDatabase, wake: Callable[[], None]) -> None:
    """LISTEN until the connection is lost (returns) or cannot be made (raises)."""
    conn = await database.connect()
    try:
        schema = await conn.fetchval("SELECT current_schema()")

        def on_notify(_c: Conn, _pid: int, _channel: str, payload: object) -> None:
            if payload == schema:  # another installation's tables: not ours to submit
                wake()

        await conn.add_listener(CHANNEL, on_notify)
        log.info("listening_for_tasks", database=database.shown, channel=CHANNEL)
        wake()  # whatever was inserted while we were not listening
        # A failed ping raises: `_listen_forever` says why and connects again.
        await until_session_ends(conn, PING_S)
        log.warning("listen_connection_lost", database=database.shown)
    finally:
        conn.terminate()
