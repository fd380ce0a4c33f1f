"""A throwaway PostgreSQL cluster of the test session's own, for the tests that restart
their server (tests/test_postgres_outage.py, the restart test of
tests/test_postgres_connection.py).

Restarting the machine's shared cluster broke every other test using it at that moment:
the other xdist worker's, and any other suite running on the machine. This cluster is made
with `initdb` in a temporary directory (never listed by `pg_lsclusters`, so nothing else
finds it), listens on 127.0.0.1 on a free port and a socket directory of its own, and is
stopped and deleted at the end of the session. It needs PostgreSQL's server binaries
(`pg_config --bindir`, or Debian's /usr/lib/postgresql/VER/bin) even when
BATCHD_TEST_POSTGRES_DSN names an external server; without them its tests skip, or FAIL
under CI like every other PostgreSQL test. As root, the binaries run as user `postgres`
(initdb refuses root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.postgres import (
    LOCAL_PASSWORD,
    LOCAL_ROLE,
    PostgresServer,
    answers,
    create_database,
    drop_database,
    run_sync,
)

_PG_CTL_WAIT_S = 60
_START_TRIES = 3  # a free port found by bind(0) may be taken before the server binds it


@dataclass(frozen=True, slots=True)
class PrivateCluster:
    """A cluster only this test session uses; `restart_command` restarts it."""

    server: PostgresServer
    data_dir: Path
    pg_ctl: Path
    as_owner: tuple[str, ...]  # the prefix that runs a binary as the cluster's owner

    def pg_ctl_command(self, action: str) -> list[str]:
        return [
            *self.as_owner,
            str(self.pg_ctl),
            *("-D", str(self.data_dir), "-w", "-t", str(_PG_CTL_WAIT_S), "-m", "fast"),
            *("-l", str(self.data_dir.parent / "server.log"), action),
        ]

    @property
    def restart_command(self) -> list[str]:
        """Stops the server (fast: sessions are ended) and starts it again, waiting for it."""
        return self.pg_ctl_command("restart")


def _bindir() -> Path | None:
    if shutil.which("pg_config"):
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=False
        )
        candidate = Path(found.stdout.strip())
        if found.returncode == 0 and (candidate / "initdb").exists():
            return candidate
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return debian[-1].parent if debian else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")


def start_private_cluster(root: Path) -> PrivateCluster:
    """initdb into `root`, start the server, and return it (raises RuntimeError)."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb): install postgresql")
    as_owner: tuple[str, ...] = ()
    if os.geteuid() == 0:
        as_owner = ("runuser", "-u", "postgres", "--")
        shutil.chown(root, "postgres")
    data_dir, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if as_owner:
        shutil.chown(sockets, "postgres")
    password_file = root / "password"
    password_file.write_text(LOCAL_PASSWORD + "\n")
    if as_owner:
        shutil.chown(password_file, "postgres")
    _run(
        [
            *as_owner,
            str(bindir / "initdb"),
            *("-D", str(data_dir), "-U", LOCAL_ROLE, "--pwfile", str(password_file)),
            # Password checked on TCP as on the shared cluster; --no-sync: thrown away after.
            *("--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync", "-E", "UTF8"),
        ]
    )
    cluster: PrivateCluster | None = None
    for _ in range(_START_TRIES):
        port = _free_port()
        with (data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sockets}'\n"
            )
        dsn = f"postgresql://{LOCAL_ROLE}:{LOCAL_PASSWORD}@127.0.0.1:{port}/postgres"
        cluster = PrivateCluster(PostgresServer(dsn), data_dir, bindir / "pg_ctl", as_owner)
        try:
            _run(cluster.pg_ctl_command("start"))
        except RuntimeError:
            continue  # the port was taken meanwhile: the last setting of the file wins
        why = run_sync(lambda dsn=dsn: answers(dsn))
        if why is None:
            return cluster
        stop_private_cluster(cluster)
    log = root / "server.log"
    raise RuntimeError(
        "the private cluster did not start: " + (log.read_text()[-2000:] if log.exists() else "")
    )


def stop_private_cluster(cluster: PrivateCluster) -> None:
    subprocess.run(cluster.pg_ctl_command("stop"), capture_output=True, check=False)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster for this session alone (module docstring): a test may restart it
    (`private_postgres.restart_command`); deleted at the end of the session."""
    root = Path(tempfile.mkdtemp(prefix="batchd-test-pg-"))
    try:
        try:
            cluster = start_private_cluster(root)
        except (RuntimeError, OSError) as exc:
            if os.environ.get("CI"):
                pytest.fail(
                    f"PostgreSQL tests need a private cluster (CI is set): {exc}", pytrace=False
                )
            pytest.skip(f"no private PostgreSQL cluster: {exc}")
        try:
            yield cluster
        finally:
            stop_private_cluster(cluster)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_postgres_dsn(private_postgres: PrivateCluster) -> Iterator[str]:
    """A database on the private cluster (as `postgres_dsn` is on the shared server)."""
    name = create_database(private_postgres.server)
    try:
        yield private_postgres.server.dsn_for(name)
    finally:
        drop_database(private_postgres.server, name)
