"""Connections to the PostgreSQL server: a small fixed pool, and single connections for
what must never go back to a pool (LISTEN, the leader's advisory lock, migrations).

Every connection starts with batchd's settings (search_path for `[database] schema`,
TCP keepalives), and every failure to connect becomes a `PostgresError` naming the masked
DSN and what to do, `retryable` or not (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from batchd.store.dsn import mask_dsn
from batchd.store.postgres.errors import (
    PostgresError,
    PostgresRefusedError,
    PostgresUnavailableError,
)

# The systemd credential (LoadCredential=database-password:...) read when the URL holds
# no password; PGPASSWORD and PGPASSFILE (~/.pgpass) are read by asyncpg itself.
PASSWORD_CREDENTIAL = "database-password"  # noqa: S105 - a file name, not a password
# Four: the submitter's claim and record, a poll, and a write-back lane at once; more only
# holds server memory (each backend is a process). LISTEN and the leader lock have their own.
DEFAULT_POOL_SIZE = 4
CONNECT_TIMEOUT_S = 10.0
# How soon the server notices a client that vanished (host died, cable cut) and ends its
# session, releasing its locks (the leader's advisory lock among them), so that another
# daemon takes over within ~10 s: keepalive probes after 5 s idle, every 2 s, 2 missed
# (~9 s); data left unacknowledged for 9 s ends it too. A process that dies is noticed at
# once (its kernel closes the socket). Ignored on Unix sockets.
_SESSION_SETTINGS = {
    "application_name": "batchd",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "2",
    "tcp_user_timeout": "9000",
}
# SQLSTATE classes where waiting helps: connection exceptions, insufficient resources
# (too many connections, disk full), operator intervention (shutdown, starting up).
_RETRYABLE_CLASSES = ("08", "53", "57")
_REFUSED_HINTS = {
    "28P01": "check the password (in the URL, PGPASSFILE, or the credential "
    f"{PASSWORD_CREDENTIAL})",
    "28000": "the server does not accept this user from this host: check pg_hba.conf and "
    "that the role exists",
    "3D000": "create the database (createdb) or correct the URL",
    "42501": "grant this role the privileges docs/postgresql.md lists",
    "3F000": "create the schema or correct [database] schema",
    # Data PostgreSQL cannot hold (a NUL; SQLite stores it): retrying sends it again.
    "22P05": "the JSON holds the escape \\u0000, which jsonb cannot store: remove it "
    "(docs/postgresql.md, Per-column differences)",
    "22021": "the text holds a NUL character, which PostgreSQL cannot store: remove it "
    "(docs/postgresql.md, Per-column differences)",
}


# A connection of its own, or one borrowed from the pool (a proxy with the same methods).
Conn = asyncpg.Connection | PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """Where batchd's tables are: a server and database (the DSN) and a schema."""

    dsn: str
    schema: str | None = None  # None: the role's search_path decides (normally public)
    # Every session read-only (`default_transaction_read_only`): a read-only store's
    # connections cannot write even if a write path forgot to refuse first.
    read_only: bool = False

    @property
    def shown(self) -> str:
        """The DSN as logs and messages show it: no password."""
        return mask_dsn(self.dsn)


def quote_ident(name: str) -> str:
    """`name` as a PostgreSQL identifier, whatever characters it holds."""
    return '"' + name.replace('"', '""') + '"'


def session_settings(target: PostgresTarget) -> dict[str, str]:
    """The settings every batchd session starts with (sent in the startup packet, so
    asyncpg's RESET ALL on a pooled connection's release keeps them)."""
    settings = dict(_SESSION_SETTINGS)
    if "application_name" in parse_qs(urlsplit(target.dsn).query):
        # The URL's own name wins (several daemons told apart in pg_stat_activity).
        del settings["application_name"]
    if target.schema is not None:
        settings["search_path"] = quote_ident(target.schema)
    if target.read_only:
        settings["default_transaction_read_only"] = "on"
    return settings


def credential_password(target: PostgresTarget, env: Mapping[str, str]) -> str | None:
    """The systemd credential's password, if the URL holds none and one was given."""
    if urlsplit(target.dsn).password is not None:
        return None
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / PASSWORD_CREDENTIAL
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PostgresRefusedError(
            f"{target.shown}: cannot read the credential {path}: {exc.strerror}"
        ) from None


async def connect(
    target: PostgresTarget, env: Mapping[str, str] | None = None
) -> asyncpg.Connection:
    """One connection of its own (LISTEN, the leader lock, migrations); caller closes it."""
    env = os.environ if env is None else env
    password = credential_password(target, env)
    with postgres_errors(target, "connect to", password):
        return await asyncpg.connect(
            target.dsn,
            password=password,
            timeout=CONNECT_TIMEOUT_S,
            server_settings=session_settings(target),
        )


async def create_pool(
    target: PostgresTarget, size: int = DEFAULT_POOL_SIZE, env: Mapping[str, str] | None = None
) -> asyncpg.Pool:
    """A pool of exactly `size` connections, all opened now: a bad DSN fails here, at start,
    rather than at the first query. Caller closes it."""
    env = os.environ if env is None else env
    password = credential_password(target, env)
    with postgres_errors(target, "connect to", password):
        pool = await asyncpg.create_pool(
            target.dsn,
            password=password,
            min_size=size,
            max_size=size,
            timeout=CONNECT_TIMEOUT_S,
            server_settings=session_settings(target),
        )
    assert pool is not None  # asyncpg types the awaited pool as optional
    return pool


@asynccontextmanager
async def acquired(
    pool: asyncpg.Pool, target: PostgresTarget, action: str
) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection, with errors translated around the acquire as well as the body:
    after a server restart the pool reconnects inside `acquire`, which then fails with the
    server's "starting up" or a refused connection until the server is back."""
    with postgres_errors(target, action):
        conn = await pool.acquire()
    try:
        with postgres_errors(target, action, conn=conn):
            yield conn
    finally:
        # Releasing resets the session; on a connection the server ended (a restart) that
        # fails with a protocol error: the connection's, so the outage's, not a bug of ours.
        with postgres_errors(target, action, conn=conn):
            await pool.release(conn)


@contextmanager
def postgres_errors(
    target: PostgresTarget,
    action: str,
    password: str | None = None,
    conn: Conn | None = None,
) -> Iterator[None]:
    """Errors from the server or the network become PostgresErrors naming the masked DSN
    and a remedy; our own mistakes (bad SQL, misuse of a connection) pass through. Give
    `conn`, the connection the body uses, so that a driver error that only means "the
    connection is gone" (the server restarted) is told from a misuse of it."""
    try:
        yield
    except PostgresError:
        raise
    except (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
        OSError,
        TimeoutError,
    ) as exc:
        lost = conn is not None and _is_lost(conn)
        mapped = translate(exc, target, action, password, connection_lost=lost)
        if mapped is exc:
            raise
        raise mapped from exc


def _is_lost(conn: Conn) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        # A pooled connection's proxy, detached by the pool when the server ended the
        # session under it ("connection has been released back to the pool").
        return True


def translate(
    exc: BaseException,
    target: PostgresTarget,
    action: str,
    password: str | None = None,
    *,
    connection_lost: bool = False,
) -> BaseException:
    """The PostgresError for `exc`, or `exc` itself when it is a bug of ours."""
    where = f"cannot {action} PostgreSQL at {target.shown}"
    detail = _scrub(str(exc) or type(exc).__name__, target, password)
    if isinstance(exc, TimeoutError):
        return PostgresUnavailableError(
            f"{where}: no answer within {CONNECT_TIMEOUT_S:g} s (is the server up and the "
            "port open?)"
        )
    if isinstance(exc, socket.gaierror):
        return PostgresUnavailableError(
            f"{where}: the host name does not resolve ({detail}): check the URL's host"
        )
    if isinstance(exc, OSError):
        return PostgresUnavailableError(
            f"{where}: {detail} (is the server running and listening there?)"
        )
    # A session the server ended (restart, pg_terminate_backend) shows, depending on when
    # the driver notices, as ConnectionDoesNotExistError (08003, below), "connection is
    # closed" (InterfaceError), or an InternalClientError about the protocol's state.
    if connection_lost or (
        isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)
    ):
        return PostgresUnavailableError(f"{where}: the connection was lost ({detail})")
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return PostgresRefusedError(f"{where}: {detail}: correct the URL")
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state[:2] in _RETRYABLE_CLASSES:
            return PostgresUnavailableError(f"{where}: {detail} (SQLSTATE {state})")
        hint = _REFUSED_HINTS.get(state)
        if hint is not None or state[:2] == "28":
            return PostgresRefusedError(f"{where}: {detail}: {hint or 'check the credentials'}")
    return exc  # a bug of ours (bad SQL, a connection used twice): not the server's fault


def _scrub(text: str, target: PostgresTarget, password: str | None) -> str:
    """Defence in depth: no message of the driver may carry the password."""
    secrets = [password, urlsplit(target.dsn).password]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


async def until_session_ends(
    conn: asyncpg.Connection, ping_s: float, stop: asyncio.Event | None = None
) -> None:
    """Return once `conn`'s session ended (the server restarted or ended it), or `stop` is
    set. A ping every `ping_s` notices a server gone without closing the socket: a ping
    that fails raises asyncpg's error or OSError, one slower than `ping_s` TimeoutError.

    asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
    arrives as the awaited ping completes, and a watch that outlived its cancel held the
    daemon's shutdown for ever."""
    ended = asyncio.Event()
    conn.add_termination_listener(lambda _c: ended.set())
    events = [ended] if stop is None else [ended, stop]
    while not any(event.is_set() for event in events) and not conn.is_closed():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ping_s):
                await _first_of(events)
            return
        async with asyncio.timeout(ping_s):
            await conn.fetchval("SELECT 1")


async def _first_of(events: list[asyncio.Event]) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
