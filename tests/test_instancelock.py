"""One daemon per database: a second `batchd run` is refused at once, and a create whose
intent another process released meanwhile is kept on record as a possible duplicate."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchd.api import BatchesClient
from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.service.instancelock import AlreadyRunningError, daemon_lock, lock_path
from batchd.store import Store
from tests.support.params import request_params
from tests.support.store import query
from tests.support.waiting import eventually


async def test_a_second_daemon_on_the_same_database_is_refused_while_the_first_runs(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    await store.enqueue([("a", request_params("a"))])
    await store.close()
    config = daemon_config(fake_api.base_url)
    started = asyncio.Event()

    async def hold(daemon: Daemon) -> None:
        started.set()

    first = asyncio.create_task(run_daemon(config, "k", on_started=hold))
    await asyncio.wait_for(started.wait(), 10)
    try:
        with pytest.raises(AlreadyRunningError, match=rf"pid {os.getpid()}.* {db_path}"):
            await run_daemon(config, "k", exit_when_idle=True)
    finally:
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    # Released with its holder: the next daemon runs.
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0
    assert query(db_path, "SELECT status FROM tasks") == [("succeeded",)]


def test_batchd_run_says_which_process_holds_the_database(tmp_path: Path) -> None:
    database = tmp_path / "batchd.db"
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    with daemon_lock(database):
        run = subprocess.run(
            [sys.executable, "-m", "batchd", "--config", str(config), "run"],
            env={
                **os.environ,
                "ANTHROPIC_API_KEY": "k",
                "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert run.returncode == 75, run.stderr  # EX_TEMPFAIL: the other one may end
    assert f"another batchd (pid {os.getpid()}) is already running on {database}" in run.stderr
    assert str(lock_path(database)) in run.stderr


async def test_a_batch_created_after_its_intent_was_released_is_recorded_as_a_duplicate(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await store.enqueue([("a", request_params("a"))])
    await store.close()
    create = BatchesClient.create
    creates: list[int] = []

    async def released_meanwhile(client: BatchesClient, body: Any) -> Any:
        creates.append(1)
        if len(creates) == 1:  # what another process reconciling it would do mid-upload
            with sqlite3.connect(db_path) as db:
                db.execute("UPDATE batches SET state = 'rejected' WHERE state = 'creating'")
                db.execute("UPDATE tasks SET status = 'pending', batch_id = NULL")
            db.close()
        return await create(client, body)

    monkeypatch.setattr(BatchesClient, "create", released_meanwhile)
    config = daemon_config(fake_api.base_url)
    daemon = asyncio.create_task(run_daemon(config, "k"))
    try:
        await eventually(
            lambda: query(db_path, "SELECT count(*) FROM duplicate_batches"),
            "the duplicate batch recorded",
            30,
            until=lambda rows: rows != [(0,)],
        )
    finally:
        daemon.cancel()
        with pytest.raises(asyncio.CancelledError):
            await daemon
    [(api_batch_id, note)] = query(db_path, "SELECT api_batch_id, note FROM duplicate_batches")
    assert api_batch_id.startswith("msgbatch_")
    assert "after its intent was released" in note


async def test_a_refused_second_daemon_has_not_touched_the_database(
    tmp_path: Path, daemon_config: Callable[..., Config], fake_api: FakeApiServer
) -> None:
    database = tmp_path / "fresh.db"
    config = replace(
        daemon_config(fake_api.base_url), database=replace(Config().database, path=database)
    )
    with daemon_lock(database), pytest.raises(AlreadyRunningError):
        await run_daemon(config, "k", exit_when_idle=True)
    # Refused before opening: no file created, no schema migrated under the holder.
    assert not database.exists()


# -- one lock per database file, however the path to it is spelled ------------------------------


def assert_refused(database: Path) -> None:
    """A daemon on `database`, spelled this way, would be refused now."""
    with pytest.raises(AlreadyRunningError), daemon_lock(database):
        pytest.fail(f"a second daemon took the lock through {database}")


def test_a_database_reached_through_a_symlink_is_refused_while_its_target_is_locked(
    tmp_path: Path,
) -> None:
    real = tmp_path / "data" / "batchd.db"
    real.parent.mkdir()
    real.touch()
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    link = elsewhere / "other-name.db"
    link.symlink_to(real)
    with daemon_lock(real):
        assert_refused(link)
    with daemon_lock(link):
        assert_refused(real)
    # One lock file, beside the real database (where SQLite puts its -wal and -shm too).
    assert lock_path(link) == lock_path(real) == real.parent.resolve() / "batchd.db.lock"
    assert not (elsewhere / "other-name.db.lock").exists()


def test_a_relative_symlink_to_a_database_not_yet_created_shares_its_lock(
    tmp_path: Path,
) -> None:
    real = tmp_path / "batchd.db"  # not created yet: the lock is taken before the open
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "batchd.db"
    link.symlink_to(Path("..") / "batchd.db")
    with daemon_lock(link):
        assert_refused(real)


@pytest.mark.parametrize(
    ("cwd", "spelling"),
    [
        ("db", "batchd.db"),
        ("db", "./batchd.db"),
        ("elsewhere", "../db/batchd.db"),
        ("elsewhere", "../db/sub/../batchd.db"),
        ("db-link", "batchd.db"),  # a symlinked working directory
    ],
)
def test_relative_paths_from_another_directory_share_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cwd: str, spelling: str
) -> None:
    database = tmp_path / "db" / "batchd.db"
    (tmp_path / "db" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "db-link").symlink_to(tmp_path / "db")
    monkeypatch.chdir(tmp_path / cwd)
    with daemon_lock(database):
        assert_refused(Path(spelling))
    with daemon_lock(Path(spelling)):
        assert_refused(database)
