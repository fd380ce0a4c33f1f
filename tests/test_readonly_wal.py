"""Read-only opens in WAL mode, with real files owned by real (numeric) users.

A group member runs `batchd status` against the service's database. What SQLite needs
(batchd/store/sqlite/readonly.py): the -wal and -shm files, readable while the daemon has
the database open, or creatable (and then writable by the database's owner) when nobody
has it open. Each case runs the real CLI process as another uid (needs root to switch:
under CI, which runs as root, it must not skip).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from batchd.store.sqlite import SqliteStore
from tests.support.store import add_tasks

DAEMON, GROUP, MEMBER = 41001, 41002, 41003

# Elsewhere the module is skipped; under CI each test fails on its own (the fixture below):
# a failure raised here, at import, would be a collection error, which stops the whole run.
if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("switching users needs root", allow_module_level=True)


@pytest.fixture(autouse=True)
def _root_under_ci() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests switch users: needs root, as CI runs", pytrace=False)


# The CLI as another user: its groups, then its uid, then batchd's own main().
_AS_USER = """
import asyncio, os, sys
import batchd.cli.main
asyncio.new_event_loop().close()
uid, groups = int(sys.argv[1]), [int(g) for g in sys.argv[2].split(",")]
os.setgroups(groups); os.setgid(groups[0]); os.setuid(uid)
sys.exit(batchd.cli.main.main(sys.argv[3:]))
"""


def as_user(
    uid: int, groups: list[int], config: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _AS_USER, str(uid), ",".join(map(str, groups)),
         "--config", str(config), *args],
        env={**os.environ, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """/var/lib/batchd as the docs set it up: the daemon's, group batchd, 2770."""
    # Not under pytest's temp root: it is 0700, and these users must get through.
    base = Path(tempfile.mkdtemp(prefix="batchd-wal-"))
    base.chmod(0o755)
    directory = base / "batchd"
    directory.mkdir()
    os.chown(directory, DAEMON, GROUP)
    directory.chmod(0o2770)
    yield directory
    shutil.rmtree(base)


async def make_database(directory: Path, mode: int) -> tuple[Path, Path]:
    database = directory / "batchd.db"
    store = await SqliteStore.open(database)
    try:
        await add_tasks(store, "a", "b")
    finally:
        await store.close()
    for path in directory.iterdir():
        os.chown(path, DAEMON, GROUP)
    database.chmod(mode)
    config = directory.parent / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    config.chmod(0o644)
    return database, config


def pending(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    return int(orjson.loads(result.stdout)["tasks"]["pending"])


def owners(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.name: (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
        for p in directory.iterdir()
        if p.name.endswith(("-wal", "-shm"))
    }


async def test_while_the_daemon_has_it_open_a_member_reads_the_daemons_read_only_wal(
    state_dir: Path,
) -> None:
    database, config = await make_database(state_dir, 0o640)
    daemon = sqlite3.connect(database)  # as root: SQLite gives -wal/-shm to the owner
    try:
        daemon.execute("PRAGMA wal_autocheckpoint = 0")
        daemon.execute("INSERT INTO tasks (custom_id, params) VALUES ('c', '{}')")
        daemon.commit()  # in the -wal only
        for name in ("batchd.db-wal", "batchd.db-shm"):
            (state_dir / name).chmod(0o640)  # the group may read them, not write
        assert set(owners(state_dir).values()) == {(DAEMON, GROUP, 0o640)}
        assert pending(as_user(MEMBER, [GROUP], config, "status", "--json")) == 3
    finally:
        daemon.close()


async def test_with_nobody_on_it_a_member_creates_wal_files_the_daemon_can_still_write(
    state_dir: Path,
) -> None:
    _, config = await make_database(state_dir, 0o660)
    assert owners(state_dir) == {}  # the last close removed them
    assert pending(as_user(MEMBER, [GROUP], config, "status", "--json")) == 2
    # Left behind by the reader: the member's, the directory's group (setgid), 0660.
    assert set(owners(state_dir).values()) == {(MEMBER, GROUP, 0o660)}
    requests = state_dir.parent / "more.jsonl"
    requests.write_text('{"custom_id": "c", "params": {"model": "m", "max_tokens": 1}}\n')
    requests.chmod(0o644)
    enqueued = as_user(DAEMON, [GROUP], config, "enqueue", str(requests))
    assert enqueued.returncode == 0, enqueued.stderr


async def test_a_database_its_group_cannot_write_is_not_read_when_that_would_lock_out_its_owner(
    state_dir: Path,
) -> None:
    _, config = await make_database(state_dir, 0o640)
    refused = as_user(MEMBER, [GROUP], config, "status")
    assert refused.returncode == 78, refused.stderr
    assert "without locking its owner out" in refused.stderr
    assert "chmod 0660" in refused.stderr
    assert owners(state_dir) == {}  # nothing created
    started = as_user(DAEMON, [GROUP], config, "migrate")
    assert started.returncode == 0, started.stderr


async def test_a_directory_the_group_cannot_write_is_said_when_nobody_has_it_open(
    state_dir: Path,
) -> None:
    _, config = await make_database(state_dir, 0o660)
    state_dir.chmod(0o2750)
    refused = as_user(MEMBER, [GROUP], config, "status")
    assert refused.returncode == 78, refused.stderr
    assert "attempt to write a readonly database" in refused.stderr
    assert "its directory must be writable by your group" in refused.stderr


async def test_wal_files_the_member_cannot_read_are_said(state_dir: Path) -> None:
    database, config = await make_database(state_dir, 0o640)
    daemon = sqlite3.connect(database)
    try:
        daemon.execute("SELECT count(*) FROM tasks").fetchall()
        for name in ("batchd.db-wal", "batchd.db-shm"):
            (state_dir / name).chmod(0o600)
        refused = as_user(MEMBER, [GROUP], config, "status")
    finally:
        daemon.close()
    assert refused.returncode == 78, refused.stderr
    assert "unable to open database file" in refused.stderr
    assert "-wal and -shm files" in refused.stderr
