"""The one-daemon lock file is shared like the database, whoever creates it and whatever
their umask.

`migrate` and `enqueue` take the lock while they create or migrate the database, so they
may be the ones to create `<database>.lock`: from a shell (umask 022) or as root, it came
out `0640`, and the service (another user of the database's group) could not open it and
exited 78. Real processes, real files; the cases with other users switch uids (root only:
under CI, which runs as root, they must not skip).
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

import pytest

from batchd.service.instancelock import daemon_lock, lock_path
from tests.support.params import request_params

DAEMON, GROUP, MEMBER = 41021, 41022, 41023
REQUEST = f'{{"custom_id": "c-1", "params": {request_params("hello")}}}\n'

# The CLI as another user (or as root), with a umask: groups, gid, uid, then main().
_AS_USER = """
import asyncio, os, sys
import batchd.cli.main
# The commands import the daemon on first use; this interpreter's packages are root's.
import batchd.cli.runprogress, batchd.service.daemon
asyncio.new_event_loop().close()
uid, groups, umask = int(sys.argv[1]), [int(g) for g in sys.argv[2].split(",")], sys.argv[3]
os.umask(int(umask, 8))
os.setgroups(groups); os.setgid(groups[0]); os.setuid(uid)
sys.exit(batchd.cli.main.main(sys.argv[4:]))
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="switching users needs root"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def batchd_as(
    uid: int, groups: list[int], umask: int, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _AS_USER, str(uid), ",".join(map(str, groups)), f"{umask:o}",
         *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["migrate", "enqueue"])
def test_migrate_and_enqueue_under_umask_022_leave_a_lock_file_the_group_can_open(
    tmp_path: Path, command: str
) -> None:
    database = tmp_path / "batchd.db"
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    requests = tmp_path / "requests.jsonl"
    requests.write_text(REQUEST)
    args = ["enqueue", str(requests)] if command == "enqueue" else ["migrate"]
    run = subprocess.run(
        [sys.executable, "-m", "batchd", "--config", str(config), *args],
        env={**os.environ, "ANTHROPIC_API_KEY": "k"},
        umask=0o022,  # a shell's, or sudo's
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    # Created with the database, before it existed: group read and write, whatever the
    # umask (the database itself is `0644 & ~umask`; docs/operations.md has it chmod 0660).
    assert mode(lock_path(database)) == 0o660


@pytest.mark.parametrize(
    ("database_mode", "lock_mode"),
    [(0o660, 0o660), (0o640, 0o640), (0o600, 0o600), (0o666, 0o660), (0o604, 0o600)],
    ids=lambda mode: f"{mode:04o}",
)
def test_a_lock_file_created_beside_a_database_takes_its_group_access_and_no_more(
    tmp_path: Path, database_mode: int, lock_mode: int
) -> None:
    database = tmp_path / "batchd.db"
    sqlite3.connect(database).close()
    database.chmod(database_mode)
    umask = os.umask(0o022)
    try:
        with daemon_lock(database):
            pass
    finally:
        os.umask(umask)
    # The group's bits of the database, never another user's: who may use the database
    # may run its daemon, nobody else.
    assert mode(lock_path(database)) == lock_mode


def test_a_lock_file_that_exists_is_left_as_it_is(tmp_path: Path) -> None:
    database = tmp_path / "batchd.db"
    sqlite3.connect(database).close()
    database.chmod(0o660)
    lock_path(database).touch(mode=0o600)
    lock_path(database).chmod(0o600)  # an operator's choice: not ours to widen
    with daemon_lock(database):
        pass
    assert mode(lock_path(database)) == 0o600


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """/var/lib/batchd as the docs set it up: the daemon's, group batchd, 2770."""
    if os.geteuid() != 0:
        pytest.fail("these tests switch users: CI runs as root")
    # Not under pytest's temp root: it is 0700, and these users must get through.
    base = Path(tempfile.mkdtemp(prefix="batchd-lock-"))
    base.chmod(0o755)
    directory = base / "batchd"
    directory.mkdir()
    os.chown(directory, DAEMON, GROUP)
    directory.chmod(0o2770)
    yield directory
    shutil.rmtree(base)


@needs_root
@pytest.mark.parametrize(
    ("creator", "groups"), [(MEMBER, [MEMBER, GROUP]), (0, [0])], ids=["member", "root"]
)
def test_the_service_runs_after_an_enqueue_under_umask_022_created_its_database_and_lock(
    state_dir: Path, fake_api_process: str, creator: int, groups: list[int]
) -> None:
    database = state_dir / "batchd.db"
    config = state_dir.parent / "batchd.toml"
    config.write_text(
        f'[database]\npath = "{database}"\n[batching]\nlinger_seconds = 0.05\n'
        "[polling]\ninterval_seconds = 0.1\n"
    )
    config.chmod(0o644)
    requests = state_dir.parent / "requests.jsonl"
    requests.write_text(REQUEST)
    requests.chmod(0o644)
    env = {**os.environ, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": fake_api_process}
    # A user of the database (or root), from a shell: umask 022, creates database and lock.
    enqueued = batchd_as(creator, groups, 0o022, env, "--config", str(config), "enqueue",
                         str(requests))  # fmt: skip
    assert enqueued.returncode == 0, enqueued.stderr
    lock = lock_path(database)
    assert (lock.stat().st_uid, lock.stat().st_gid) == (creator, GROUP)  # setgid directory
    database.chmod(0o660)  # what docs/operations.md has the operator do after creating it

    # The service: its own user, in the group, UMask=0007 as the unit sets it.
    run = batchd_as(DAEMON, [DAEMON, GROUP], 0o007, env, "--config", str(config), "run",
                    "--exit-when-idle")  # fmt: skip
    # It was 78: "cannot create the lock file ...: Permission denied".
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(database) as db:
        tasks = db.execute("SELECT custom_id, status FROM tasks").fetchall()
    db.close()
    assert tasks == [("c-1", "succeeded")]


@needs_root
def test_a_lock_file_created_outside_a_setgid_directory_takes_the_databases_group(
    state_dir: Path,
) -> None:
    state_dir.chmod(0o770)  # no setgid: new files get their creator's group
    database = state_dir / "batchd.db"
    sqlite3.connect(database).close()
    os.chown(database, DAEMON, GROUP)
    database.chmod(0o660)
    config = state_dir.parent / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    config.chmod(0o644)
    env = {**os.environ, "ANTHROPIC_API_KEY": "k"}
    # `migrate` takes the lock only to migrate: this database has no schema yet.
    migrated = batchd_as(MEMBER, [MEMBER, GROUP], 0o022, env, "--config", str(config), "migrate")
    assert migrated.returncode == 0, migrated.stderr
    lock = lock_path(database)
    assert (lock.stat().st_uid, lock.stat().st_gid, mode(lock)) == (MEMBER, GROUP, 0o660)
