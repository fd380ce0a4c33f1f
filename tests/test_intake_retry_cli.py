"""Review 7 finding 10: `batchd retry CUSTOM_ID...` says which ids it did not requeue (no
such task, or a status it was not asked to retry) and exits 1, as `status` and `cancel`
do; the real `python -m batchd` process on a database the store filled, on both stores."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.cli import batchd, database_env
from tests.support.store import add_tasks, api_batch, claim, outcome

pytestmark = pytest.mark.both_stores


def said(result: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    return result.stdout.decode(), result.stderr.decode()


async def test_retry_reports_unknown_and_skipped_ids_and_exits_1(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await add_tasks(store, "err-1", "ok-1", "wait-1")
    local_id = await claim(store, "err-1", "ok-1")
    assert await store.mark_created(local_id, api_batch("msgbatch_1", "ended"))
    report = await store.write_results(
        local_id, [outcome("err-1", "errored", error="bad request"), outcome("ok-1")], 2
    )
    assert report.written == 2
    env = database_env(tmp_path, database_config)

    mixed = batchd("retry", "err-1", "ok-1", "wait-1", "nosuch", env=env)
    out, err = said(mixed)
    assert mixed.returncode == 1, err
    assert out.strip() == "requeued 1 task(s)"
    assert "ok-1: succeeded, not retried (--status succeeded retries it)" in err
    assert "wait-1: pending, not retried (only finished tasks are retried)" in err
    assert "nosuch: no such task" in err
    assert "err-1" not in err
    assert peek.task("err-1")["status"] == "pending"
    assert peek.task("ok-1")["status"] == "succeeded"

    alone = batchd("retry", "nosuch", env=env)
    out, err = said(alone)
    assert alone.returncode == 1
    assert out.strip() == "requeued 0 task(s)"
    assert err.strip() == "nosuch: no such task"

    asked = batchd("retry", "--status", "succeeded", "ok-1", env=env)
    out, err = said(asked)
    assert asked.returncode == 0, err
    assert out.strip() == "requeued 1 task(s)"
    assert err == ""
    assert peek.task("ok-1")["status"] == "pending"

    # Without ids nothing is named, so nothing can be skipped: exit 0 even with nothing.
    everything = batchd("retry", env=env)
    assert everything.returncode == 0
    assert said(everything) == ("requeued 0 task(s)\n", "")
