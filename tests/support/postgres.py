"""A PostgreSQL server for the tests, and a fresh database on it per test session.

Where the server comes from, in order:
1. `BATCHD_TEST_POSTGRES_DSN` (a postgresql:// URL whose role may CREATE DATABASE), as is.
2. The machine's own cluster (Debian's `postgresql` package: `pg_lsclusters`). Run as
   root, the fixture starts the cluster if it is down (`pg_ctlcluster VER NAME start`) and
   creates a login role `batchd_test` with a password through `runuser -u postgres --
   psql` (local sockets use peer auth), then connects over TCP on 127.0.0.1.

No server: with `CI` set the tests using these fixtures FAIL (CI must never pass by
skipping them); elsewhere they skip, the reason printed by `-ra`. Tests that use these
fixtures carry the `postgres` marker (`pytest -m postgres` runs only them).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from batchd.store.dsn import mask_dsn
from batchd.store.postgres.connection import quote_ident

ENV_DSN = "BATCHD_TEST_POSTGRES_DSN"
# A throwaway role on the local cluster, reachable on loopback only (Debian's pg_hba).
LOCAL_ROLE = "batchd_test"
LOCAL_PASSWORD = "batchd-test-pw"  # a local test role's, not a secret
_START_WAIT_S = 30.0


class ServerUnavailable(Exception):
    """No PostgreSQL server for the tests; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class PostgresServer:
    """A server the tests may create databases on."""

    admin_dsn: str  # connects to a maintenance database as a role with CREATEDB

    def dsn_for(self, database: str) -> str:
        """The admin DSN pointed at another database of the same server."""
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path=f"/{database}"))


def run_sync(make: Callable[[], Awaitable[object]]) -> object:
    """Run a coroutine from a sync fixture, on a loop of its own in a thread of its own:
    asyncio.run in this thread would replace (then clear) the test's current event loop."""

    async def main() -> object:
        return await make()

    with ThreadPoolExecutor(1, thread_name_prefix="postgres-fixture") as pool:
        return pool.submit(asyncio.run, main()).result()


async def answers(dsn: str) -> str | None:
    """None if `dsn` accepts a connection, else why not."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def _local_clusters() -> list[tuple[str, str, int, str]]:
    """(version, name, port, status) of Debian's clusters on this machine."""
    found = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    )
    clusters = []
    for line in found.stdout.splitlines():
        version, name, port, status, *_ = line.split()
        clusters.append((version, name, int(port), status))
    return clusters


def _as_postgres(port: int, sql: str) -> None:
    subprocess.run(
        [
            *("runuser", "-u", "postgres", "--", "psql", "-p", str(port), "-X", "-q"),
            *("-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql),
        ],
        capture_output=True,
        text=True,
        check=True,
    )


def _start_local_cluster() -> str:
    """The admin DSN of the machine's cluster, started and given a test role if need be.
    One process at a time: pytest-xdist's workers (and other suites on this machine) set up
    at once, and two concurrent ALTER ROLE of one role fail ("tuple concurrently updated")."""
    if os.geteuid() != 0:  # only root starts the cluster and sets the role up
        return _start_local_cluster_locked()
    lock_path = Path(tempfile.gettempdir()) / "batchd-test-postgres-setup.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start_local_cluster_locked()


def _start_local_cluster_locked() -> str:
    if shutil.which("pg_lsclusters") is None:
        raise ServerUnavailable(
            f"no PostgreSQL server: set {ENV_DSN}, or install Debian's postgresql package "
            "(.ci/run does)"
        )
    clusters = _local_clusters()
    if not clusters:
        raise ServerUnavailable("pg_lsclusters lists no cluster: create one (pg_createcluster)")
    version, name, port, status = clusters[0]
    is_root = os.geteuid() == 0
    if status != "online":
        if not is_root:
            raise ServerUnavailable(
                f"cluster {version} {name} is {status}: start it as root "
                f"(pg_ctlcluster {version} {name} start) or set {ENV_DSN}"
            )
        subprocess.run(
            ["pg_ctlcluster", version, name, "start"], capture_output=True, text=True, check=False
        )
    dsn = f"postgresql://{LOCAL_ROLE}:{LOCAL_PASSWORD}@127.0.0.1:{port}/postgres"
    if is_root:
        _wait_for_socket(port)
        # Idempotent: the role's password is set each time, so a changed one heals.
        _as_postgres(
            port,
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LOCAL_ROLE}')"
            f" THEN CREATE ROLE {LOCAL_ROLE} LOGIN CREATEDB; END IF; END $$;"
            # CREATEROLE: tests of privileges make roles of their own (`make_role`).
            f" ALTER ROLE {LOCAL_ROLE} LOGIN CREATEDB CREATEROLE PASSWORD '{LOCAL_PASSWORD}';",
        )
    return dsn


def _wait_for_socket(port: int) -> None:
    deadline = time.monotonic() + _START_WAIT_S
    while True:
        ready = subprocess.run(["pg_isready", "-q", "-p", str(port)], check=False)
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise ServerUnavailable(f"the local cluster on port {port} did not start in time")
        time.sleep(0.2)


def find_server(env: dict[str, str] | None = None) -> PostgresServer:
    """The server the tests use (module docstring), or ServerUnavailable saying why."""
    env = dict(os.environ) if env is None else env
    if env.get(ENV_DSN):
        dsn = env[ENV_DSN]
        where = f"{ENV_DSN}={mask_dsn(dsn)}"
    else:
        try:
            dsn = _start_local_cluster()
        except subprocess.CalledProcessError as exc:
            raise ServerUnavailable(
                f"setting up the local cluster failed: {exc.cmd[0]}: {exc.stderr.strip()}"
            ) from None
        where = f"the local cluster ({mask_dsn(dsn)})"
    why = run_sync(lambda: answers(dsn))
    if why is not None:
        raise ServerUnavailable(f"{where} does not answer: {why}")
    return PostgresServer(dsn)


async def _admin(server: PostgresServer, sql: str) -> None:
    # A test that restarts the local server may end while it is still starting up.
    for _ in range(int(_START_WAIT_S / 0.2)):
        try:
            conn = await asyncpg.connect(server.admin_dsn, timeout=10)
            break
        except (asyncpg.CannotConnectNowError, ConnectionRefusedError):
            await asyncio.sleep(0.2)
    else:
        conn = await asyncpg.connect(server.admin_dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(server: PostgresServer, prefix: str = "batchd_test") -> str:
    """A new empty database (owned by the admin role); returns its name."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    run_sync(lambda: _admin(server, f"CREATE DATABASE {quote_ident(name)}"))
    return name


def drop_database(server: PostgresServer, name: str) -> None:
    """Drop it, whatever is still connected. A plain DROP first: it stops an autovacuum
    worker on the database itself, where FORCE refuses a non-superuser ("must be a member
    of the role whose process is being terminated": the worker has no role, PostgreSQL
    15); then FORCE, for a connection a failed test left open (PostgreSQL 13+)."""
    plain = f"DROP DATABASE IF EXISTS {quote_ident(name)}"
    for sql in [plain, f"{plain} WITH (FORCE)"] * 10:
        try:
            run_sync(partial(_admin, server, sql))
        except (asyncpg.ObjectInUseError, asyncpg.InsufficientPrivilegeError):
            time.sleep(0.1)
        else:
            return
    run_sync(lambda: _admin(server, f"{plain} WITH (FORCE)"))


# -- fixtures (registered through tests/conftest.py's pytest_plugins) ----------------------


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The server, or a failure (CI set) / skip (elsewhere) saying why there is none."""
    try:
        return find_server()
    except ServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests need a server (CI is set): {exc}", pytrace=False)
        pytest.skip(f"no PostgreSQL server: {exc}")


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN to a database created for this test session, dropped at its end."""
    name = create_database(postgres_server)
    try:
        yield postgres_server.dsn_for(name)
    finally:
        drop_database(postgres_server, name)


@pytest.fixture
def postgres_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema name of this test's own in the session's database (not created: batchd
    creates it), dropped with everything in it at the end of the test."""
    name = f"t_{secrets.token_hex(6)}"
    yield name
    run_sync(lambda: _drop_schema(postgres_dsn, name))


async def _drop_schema(dsn: str, name: str) -> None:
    await _on(dsn, f"DROP SCHEMA IF EXISTS {quote_ident(name)} CASCADE")


@pytest.fixture
def fresh_postgres_database(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    """Makes whole new databases for this test (their DSNs), dropped at its end; for what
    a schema cannot isolate (the default `public` schema, database-wide state)."""
    made: list[str] = []

    def make() -> str:
        made.append(create_database(postgres_server))
        return postgres_server.dsn_for(made[-1])

    yield make
    for name in made:
        drop_database(postgres_server, name)


@pytest.fixture
def make_role(postgres_dsn: str) -> Iterator[Callable[[], tuple[str, str]]]:
    """Makes login roles with no privileges for this test: (role, its DSN to the session's
    database). Dropped at the end with everything they own. Skips if the server's test role
    may not create roles (a BATCHD_TEST_POSTGRES_DSN without CREATEROLE)."""
    made: list[str] = []

    def make() -> tuple[str, str]:
        role = f"batchd_test_r{secrets.token_hex(4)}"
        password = secrets.token_hex(8)
        try:
            # Membership lets the test role DROP OWNED BY it at the end (PostgreSQL 15).
            run_sync(
                lambda: _on(
                    postgres_dsn,
                    f"CREATE ROLE {role} LOGIN PASSWORD '{password}'; GRANT {role} TO current_user",
                )
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            pytest.skip(f"the test role may not create roles: {exc}")
        made.append(role)
        parts = urlsplit(postgres_dsn)
        netloc = f"{role}:{password}@{parts.hostname}:{parts.port or 5432}"
        return role, urlunsplit(parts._replace(netloc=netloc))

    yield make
    for role in made:
        run_sync(lambda role=role: _on(postgres_dsn, f"DROP OWNED BY {role}; DROP ROLE {role}"))


async def _on(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def local_cluster() -> tuple[str, str]:
    """(version, name) of the machine's cluster the tests use (root only, and not with a
    server of BATCHD_TEST_POSTGRES_DSN's). A test that restarts a server should use
    `private_postgres` (tests/support/pgcluster.py) instead: restarting this shared one
    breaks every other test using it at that moment, other xdist workers' included."""
    if os.environ.get(ENV_DSN) or os.geteuid() != 0:
        reason = f"restarts the local cluster: needs root and no {ENV_DSN}"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    version, name, *_ = _local_clusters()[0]
    return version, name
