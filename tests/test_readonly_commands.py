"""Issue 14 item 2, reads never write: the real `python -m batchd` process. `status`,
`results`, `estimate`, `batches` and `tasks` never create, migrate or write the database;
only `run`, `migrate` and `enqueue` create or migrate, and never under a running daemon."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest

from batchd.service.exits import EXIT_CONFIG, EXIT_TEMPFAIL
from batchd.service.instancelock import daemon_lock
from batchd.store import StoreError
from batchd.store.sqlite import SqliteStore
from batchd.store.sqlite.migrations import shipped_migrations
from tests.support.cli import batchd
from tests.support.schema import UNDO_FROM_ACKNOWLEDGED
from tests.support.store import add_tasks, query

READS = (
    ("status",),
    ("status", "--json"),
    ("results",),
    ("estimate",),
    ("batches",),
    ("tasks", "--status", "pending"),
)
DEAD_API = "http://127.0.0.1:9"  # nothing listens: none of these calls the API
NEWEST = shipped_migrations()[-1].version
# The migration whose columns `status` needs (acknowledged duplicates).
ACKNOWLEDGED = next(m.version for m in shipped_migrations() if m.name == "duplicate_acknowledged")


def environment(tmp_path: Path, database: Path) -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "sk-test",
        "ANTHROPIC_BASE_URL": DEAD_API,
    }


def errors(result: subprocess.CompletedProcess[bytes]) -> list[dict[str, object]]:
    lines = [orjson.loads(line) for line in result.stderr.splitlines() if line.startswith(b"{")]
    return [line for line in lines if line["level"] == "error"]


def warnings(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    lines = [orjson.loads(line) for line in result.stderr.splitlines() if line.startswith(b"{")]
    return [str(line["event"]) for line in lines if line["level"] == "warning"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def make_database(path: Path, *custom_ids: str) -> None:
    store = await SqliteStore.open(path)
    try:
        await add_tasks(store, *custom_ids)
    finally:
        await store.close()  # the last close checkpoints: everything is in the main file


def make_older(path: Path) -> int:
    """The database as a batchd before the acknowledgement column left it (and every
    later migration: 009's collection lease columns); returns its version."""
    with sqlite3.connect(path) as db:
        for statement in UNDO_FROM_ACKNOWLEDGED:
            db.execute(statement)
        db.execute("DELETE FROM schema_migrations WHERE version >= ?", (ACKNOWLEDGED,))
        version = int(db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])
    db.close()
    return version


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_a_read_on_a_mistyped_path_is_an_error_naming_it_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    database = tmp_path / "batchd-typo.db"
    result = batchd(*command, env=environment(tmp_path, database))
    assert result.returncode == EXIT_CONFIG, result.stderr
    [failure] = errors(result)
    assert failure["event"] == "database_missing"
    assert f"no database at {database}" in result.stderr.decode()
    assert not result.stdout  # no "tasks: 0" for a database that does not exist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchd.toml"]


def test_a_file_without_a_batchd_schema_is_refused_and_left_empty(tmp_path: Path) -> None:
    database = tmp_path / "empty.db"
    database.touch()
    result = batchd("status", env=environment(tmp_path, database))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "holds no batchd database" in result.stderr.decode()
    assert database.stat().st_size == 0


async def test_reads_leave_the_database_file_byte_for_byte_as_it_was(tmp_path: Path) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a", "b")
    before = digest(database)
    env = environment(tmp_path, database)
    for command in READS:
        result = batchd(*command, env=env)
        assert result.returncode == 0, (command, result.stderr)
    assert digest(database) == before
    assert query(database, "SELECT count(*) FROM tasks") == [(2,)]


async def test_an_older_schema_is_read_where_it_can_be_refused_where_not_and_never_migrated(
    tmp_path: Path,
) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a", "b")
    version = make_older(database)
    before = digest(database)
    env = environment(tmp_path, database)

    listing = batchd("tasks", "--status", "pending", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert [t["custom_id"] for t in orjson.loads(listing.stdout)["tasks"]] == ["a", "b"]
    assert warnings(listing) == ["schema_version_differs"]

    # status leaves acknowledged duplicates out: it needs the column that version lacks.
    status = batchd("status", env=env)
    assert status.returncode == EXIT_CONFIG, status.stderr
    [failure] = errors(status)
    assert failure["event"] == "schema_too_old"
    assert f"schema version {version}, older than this batchd's ({NEWEST})" in str(failure["error"])
    assert "batchd migrate" in str(failure["error"])

    assert digest(database) == before  # never migrated, never written
    assert query(database, "SELECT max(version) FROM schema_migrations") == [(version,)]
    assert batchd("migrate", env=env).returncode == 0
    assert batchd("status", env=env).returncode == 0


async def test_a_newer_schema_is_read_where_it_can_be_with_a_warning(tmp_path: Path) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a")
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    db.close()
    before = digest(database)
    result = batchd("status", "--json", env=environment(tmp_path, database))
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["tasks"]["pending"] == 1
    assert warnings(result) == ["schema_version_differs"]
    assert digest(database) == before


async def test_a_read_only_store_refuses_every_write_before_touching_the_database(
    tmp_path: Path,
) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a")
    store = await SqliteStore.open(database, read_only=True)
    try:
        for write in (
            store.enqueue([("b", "{}")]),
            store.request_cancel(["a"]),
            store.migrate(),
            store.accounts.reclaim_space(),
        ):
            with pytest.raises(StoreError, match="opened read-only"):
                await write
    finally:
        await store.close()
    assert query(database, "SELECT custom_id, status FROM tasks") == [("a", "pending")]


async def test_writing_commands_other_than_enqueue_never_create_the_database(
    tmp_path: Path,
) -> None:
    database = tmp_path / "batchd.db"
    env = environment(tmp_path, database)
    for command in (("cancel", "a"), ("retry",), ("prune", "--older-than", "1d")):
        result = batchd(*command, env=env)
        assert result.returncode == EXIT_CONFIG, result.stderr
        assert "only `batchd run`, `migrate` and `enqueue` create one" in result.stderr.decode()
    assert not database.exists()


async def test_migrating_is_refused_while_another_versions_daemon_holds_the_lock(
    tmp_path: Path,
) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a")
    version = make_older(database)  # the schema the running (older) daemon knows
    env = environment(tmp_path, database)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"custom_id": "b", "params": {"model": "m", "max_tokens": 1}}\n')

    with daemon_lock(database):  # the running daemon's lock (this test's pid)
        for command in (("migrate",), ("enqueue", str(requests))):
            refused = batchd(*command, env=env)
            assert refused.returncode == EXIT_TEMPFAIL, refused.stderr
            [failure] = errors(refused)
            assert failure["event"] == "migration_refused"
            message = str(failure["error"])
            assert f"pid {os.getpid()}" in message
            assert f"from version {version} to {NEWEST}" in message
        assert query(database, "SELECT max(version) FROM schema_migrations") == [(version,)]
        assert query(database, "SELECT custom_id FROM tasks") == [("a",)]

    enqueued = batchd("enqueue", str(requests), env=env)  # the daemon stopped: it migrates
    assert enqueued.returncode == 0, enqueued.stderr
    assert query(database, "SELECT max(version) FROM schema_migrations") == [(NEWEST,)]
    assert query(database, "SELECT custom_id FROM tasks ORDER BY id") == [("a",), ("b",)]


async def test_enqueue_under_a_running_daemon_of_the_same_version_is_not_refused(
    tmp_path: Path,
) -> None:
    database = tmp_path / "batchd.db"
    await make_database(database, "a")
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"custom_id": "b", "params": {"model": "m", "max_tokens": 1}}\n')
    with daemon_lock(database):
        result = batchd("enqueue", str(requests), env=environment(tmp_path, database))
    assert result.returncode == 0, result.stderr
    assert query(database, "SELECT count(*) FROM tasks") == [(2,)]
