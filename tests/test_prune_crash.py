"""`batchd prune` killed (SIGKILL) mid-way, as a user's process dies: exported tasks may stay
undeleted, deleted ones are never unexported, the counts by status stay exact, and the
next prune finishes the work; on both stores."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.crashpoints import ENV_VAR
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.cli import batchd
from tests.support.store import add_tasks

pytestmark = pytest.mark.both_stores

OLD = "2026-01-01T00:00:00.000Z"


def prune_env(tmp_path: Path, database: DatabaseConfig, crash_at: str = "") -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    if database.url is None:
        config.write_text(f'[database]\npath = "{database.path}"\n')
    else:
        config.write_text(f'[database]\nurl = "{database.url}"\nschema = "{database.schema}"\n')
    env = {**os.environ, "BATCHD_CONFIG": str(config)}
    env.pop(ENV_VAR, None)
    return {**env, ENV_VAR: crash_at} if crash_at else env


def counts_exact(peek: Peek) -> None:
    kept = dict(peek.query("SELECT status, tasks FROM task_counts WHERE tasks <> 0"))
    counted = dict(peek.query("SELECT status, count(*) FROM tasks GROUP BY status"))
    assert kept == counted


async def old_tasks(store: Store, peek: Peek) -> set[str]:
    names = {f"old{n:02d}" for n in range(20)}
    await add_tasks(store, *sorted(names), "waiting")
    peek.execute(
        "UPDATE tasks SET status = 'succeeded', result = '{}',"
        f" completed_at = '{OLD}' WHERE custom_id <> 'waiting'"
    )
    counts_exact(peek)
    return names


def exported(path: Path) -> list[str]:
    return [orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("point", ["prune_exported", "prune_deleted"])
async def test_a_prune_killed_before_its_commit_leaves_every_task_and_exact_counts(
    store: Store, peek: Peek, database_config: DatabaseConfig, tmp_path: Path, point: str
) -> None:
    names = await old_tasks(store, peek)
    first = tmp_path / "first.jsonl"
    killed = batchd(
        "prune", "--older-than", "1d", "--export", str(first),
        env=prune_env(tmp_path, database_config, f"{point}:1"),
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr.decode()
    assert f"crash point reached: {point}:1" in killed.stderr.decode()
    # Written and synced before the delete: the file holds them, the database still too.
    assert sorted(exported(first)) == sorted(names)
    left = {row[0] for row in peek.query("SELECT custom_id FROM tasks")}
    assert left == names | {"waiting"}
    counts_exact(peek)
    again = tmp_path / "again.jsonl"
    done = batchd(
        "prune",
        "--older-than",
        "1d",
        "--export",
        str(again),
        env=prune_env(tmp_path, database_config),
    )
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(exported(again)) == sorted(names)  # exported again, then deleted
    assert peek.query("SELECT custom_id FROM tasks") == [("waiting",)]
    counts_exact(peek)


async def test_a_prune_without_export_killed_in_its_delete_leaves_exact_counts(
    store: Store, peek: Peek, database_config: DatabaseConfig, tmp_path: Path
) -> None:
    names = await old_tasks(store, peek)
    killed = batchd(
        "prune", "--older-than", "1d", env=prune_env(tmp_path, database_config, "prune_deleted:1")
    )
    assert killed.returncode == -9, killed.stderr.decode()
    left = {row[0] for row in peek.query("SELECT custom_id FROM tasks")}
    assert left == names | {"waiting"}  # the transaction never committed
    counts_exact(peek)
    # Users' deletes are still counted (SQLite: the trigger is the one the migration made).
    peek.execute("DELETE FROM tasks WHERE custom_id = 'old00'")
    counts_exact(peek)
    done = batchd("prune", "--older-than", "1d", env=prune_env(tmp_path, database_config))
    assert done.returncode == 0, done.stderr.decode()
    assert "pruned 19 finished task(s)" in done.stdout.decode()
    assert peek.query("SELECT custom_id FROM tasks") == [("waiting",)]
    counts_exact(peek)
