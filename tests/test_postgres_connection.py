"""Connections to a real PostgreSQL server: settings, a fixed pool, and clear errors that
name the masked DSN, say what to do, and whether retrying can help."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from batchd.store import StoreError
from batchd.store.postgres.connection import (
    PASSWORD_CREDENTIAL,
    PostgresTarget,
    acquired,
    connect,
    create_pool,
    postgres_errors,
)
from batchd.store.postgres.errors import PostgresRefusedError, PostgresUnavailableError
from batchd.store.postgres.migrations import migrate
from tests.support.pgcluster import PrivateCluster

pytestmark = pytest.mark.postgres


def with_netloc(dsn: str, *, password: str | None = None, port: int | None = None) -> str:
    parts = urlsplit(dsn)
    user = parts.username or ""
    secret = parts.password if password is None else password
    host = parts.hostname or ""
    netloc = f"{user}:{secret}@{host}:{parts.port if port is None else port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_pool_has_its_fixed_size_and_batchds_settings(
    postgres_dsn: str, postgres_schema: str
) -> None:
    target = PostgresTarget(postgres_dsn, postgres_schema)
    conn = await connect(target)
    await migrate(conn, target)
    await conn.close()
    pool = await create_pool(target, size=3)
    try:
        assert (pool.get_min_size(), pool.get_max_size(), pool.get_size()) == (3, 3, 3)
        async with pool.acquire() as pooled:
            settings = await pooled.fetchrow(
                "SELECT current_schema(), current_setting('application_name'),"
                " current_setting('tcp_user_timeout')"
            )
            assert tuple(settings) == (postgres_schema, "batchd", "9000")
            await pooled.execute("SET search_path = public")  # a body that changes it...
        async with pool.acquire() as pooled:  # ...does not leak into the next borrower
            assert await pooled.fetchval("SELECT count(*) FROM tasks") == 0
    finally:
        await pool.close()


async def test_a_wrong_password_is_refused_masked_and_not_retryable(postgres_dsn: str) -> None:
    target = PostgresTarget(with_netloc(postgres_dsn, password="wrong-Secret"))
    with pytest.raises(PostgresRefusedError) as raised:
        await connect(target, env={})
    message = str(raised.value)
    assert "password authentication failed" in message
    assert "check the password" in message
    assert target.shown in message
    assert ":***@" in message
    assert "wrong-Secret" not in message
    assert not raised.value.retryable
    with pytest.raises(PostgresRefusedError):
        await create_pool(target, size=2, env={})


async def test_a_database_that_does_not_exist_says_create_it(postgres_dsn: str) -> None:
    target = PostgresTarget(with_database(postgres_dsn, "no_such_batchd_db"))
    with pytest.raises(PostgresRefusedError, match="does not exist: create the database") as raised:
        await connect(target, env={})
    assert not raised.value.retryable
    assert urlsplit(postgres_dsn).password not in str(raised.value)


async def test_an_unreachable_server_is_retryable_and_masked(postgres_dsn: str) -> None:
    target = PostgresTarget(with_netloc(postgres_dsn, password="Secret1", port=closed_port()))
    with pytest.raises(PostgresUnavailableError, match="is the server running") as raised:
        await connect(target, env={})
    assert raised.value.retryable
    assert isinstance(raised.value, StoreError)
    assert "Secret1" not in str(raised.value)
    assert target.shown in str(raised.value)


async def test_an_unknown_host_says_so() -> None:
    target = PostgresTarget("postgresql://u:Secret1@no-such-host.invalid:5432/db")
    with pytest.raises(PostgresUnavailableError, match="host name does not resolve") as raised:
        await connect(target, env={})
    assert "Secret1" not in str(raised.value)


async def test_the_password_can_come_from_a_systemd_credential(
    postgres_dsn: str, tmp_path: Path
) -> None:
    parts = urlsplit(postgres_dsn)
    password = parts.password
    assert password
    bare = urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))
    (tmp_path / PASSWORD_CREDENTIAL).write_text(password + "\n")
    conn = await connect(PostgresTarget(bare), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    # Without it the server asks for a password we do not have.
    with pytest.raises(PostgresRefusedError):
        await connect(PostgresTarget(bare), env={"PGPASSFILE": str(tmp_path / "none")})


async def test_our_own_sql_mistakes_are_not_dressed_as_server_trouble(postgres_dsn: str) -> None:
    target = PostgresTarget(postgres_dsn)
    conn = await connect(target)
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError), postgres_errors(target, "read"):
            await conn.execute("SELEC 1")
    finally:
        await conn.close()


# Noticed at once, the driver says ConnectionDoesNotExistError; noticed later, "connection
# is closed" (InterfaceError); sometimes an InternalClientError: all mean the same.
@pytest.mark.parametrize("noticed_after_s", [0.0, 0.1])
async def test_a_terminated_session_is_retryable(postgres_dsn: str, noticed_after_s: float) -> None:
    target = PostgresTarget(postgres_dsn)
    victim = await connect(target)
    killer = await connect(target)
    try:
        pid = victim.get_server_pid()
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.sleep(noticed_after_s)
        with (
            pytest.raises(PostgresUnavailableError, match="connection was lost") as raised,
            postgres_errors(target, "read", conn=victim),
        ):
            await victim.fetchval("SELECT 1")
        assert raised.value.retryable
    finally:
        await victim.close()
        await killer.close()


async def test_a_pool_rides_out_a_server_restart_with_retryable_errors_only(
    private_postgres: PrivateCluster, private_postgres_dsn: str
) -> None:
    # A cluster of this session's own: restarting the shared one broke every other test
    # using it at that moment (tests/support/pgcluster.py).
    target = PostgresTarget(private_postgres_dsn)
    pool = await create_pool(target, size=2)
    seen: list[PostgresUnavailableError] = []
    restart = await asyncio.create_subprocess_exec(
        *private_postgres.restart_command, stdout=asyncio.subprocess.DEVNULL
    )
    restarted = asyncio.ensure_future(restart.wait())
    try:
        answered_after_restart = False
        async with asyncio.timeout(60):
            while not answered_after_restart:
                done = restarted.done()
                try:
                    async with acquired(pool, target, "read") as conn:
                        assert await conn.fetchval("SELECT 1") == 1
                    answered_after_restart = done
                except PostgresUnavailableError as exc:  # anything else fails the test
                    seen.append(exc)
                await asyncio.sleep(0.02)
    finally:
        await asyncio.wait_for(restarted, 60)  # never leave the server half restarted
        await pool.close()
    assert restarted.result() == 0
    assert seen, "the restart went unnoticed: the test proved nothing"
    assert all(exc.retryable for exc in seen)
    assert all(target.shown in str(exc) for exc in seen)
