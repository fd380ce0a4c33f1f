"""The PostgreSQL test fixtures: a test that needs a server fails under CI when there is
none, and skips elsewhere with the reason shown (run as pytest runs them, in a child)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support.postgres import ENV_DSN, ServerUnavailable, find_server, run_sync

ROOT = Path(__file__).parent.parent
NEEDS_SERVER = """
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres


def test_needs_a_database(postgres_dsn):
    assert postgres_dsn
    Path("database_used").write_text(postgres_dsn.rsplit("/", 1)[1])  # in the child's cwd
"""


def unreachable_dsn() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://u:Secret1@127.0.0.1:{port}/db"


def run_pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.support.postgres"]\n')
    (tmp_path / "test_needs_server.py").write_text(NEEDS_SERVER)
    child_env = {k: v for k, v in os.environ.items() if k not in {"CI", ENV_DSN}}
    child_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def test_without_a_server_a_postgres_test_skips_saying_why(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, **{ENV_DSN: unreachable_dsn()})
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout
    assert "no PostgreSQL server" in done.stdout
    assert "does not answer" in done.stdout
    assert "Secret1" not in done.stdout + done.stderr


def test_under_ci_without_a_server_a_postgres_test_fails(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, CI="true", **{ENV_DSN: unreachable_dsn()})
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout
    assert "skipped" not in done.stdout
    assert "PostgreSQL tests need a server (CI is set)" in done.stdout
    assert "Secret1" not in done.stdout + done.stderr


@pytest.mark.postgres
def test_with_a_server_the_test_runs_on_a_database_dropped_afterwards(
    tmp_path: Path, postgres_dsn: str
) -> None:
    # The server this session found, given to the child explicitly.
    admin = postgres_dsn.rsplit("/", 1)[0] + "/postgres"
    done = run_pytest(tmp_path, CI="true", **{ENV_DSN: admin})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    # The child's own database, by name: other sessions on the server (the other xdist
    # worker, another suite) create and drop theirs meanwhile, so the whole list may change.
    used = (tmp_path / "database_used").read_text()
    assert used.startswith("batchd_test_")
    assert used != postgres_dsn.rsplit("/", 1)[1]  # a database of the child's session
    assert used not in batchd_test_databases(admin)


def batchd_test_databases(admin_dsn: str) -> set[str]:
    async def names() -> set[str]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'batchd_test_%'"
            )
            return {row[0] for row in rows}
        finally:
            await conn.close()

    found = run_sync(names)
    assert isinstance(found, set)
    return found


def test_find_server_names_the_masked_dsn_it_could_not_reach() -> None:
    with pytest.raises(ServerUnavailable, match=rf"{ENV_DSN}=postgresql://u:\*\*\*@") as raised:
        find_server({ENV_DSN: unreachable_dsn()})
    assert "Secret1" not in str(raised.value)
