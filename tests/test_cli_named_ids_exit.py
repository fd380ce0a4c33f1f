"""One exit-code rule for the commands given CUSTOM_IDs (`status`, `cancel`, `retry`), for
scripts: 1 if an id is unknown or none of those named could be acted on, 0 otherwise; the
ids not acted on are named either way. Without ids (`cancel --all`, `retry`): 0. Real
`python -m batchd` processes on a database the store filled, on both stores."""

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


def said(result: subprocess.CompletedProcess[bytes]) -> tuple[int, str, str]:
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def fill(store: Store) -> None:
    """ok-1, ok-2 succeeded; err-1, err-2 errored; wait-1, wait-2 pending; fly-1 in flight."""
    await add_tasks(store, "ok-1", "ok-2", "err-1", "err-2", "wait-1", "wait-2", "fly-1")
    ended = await claim(store, "ok-1", "ok-2", "err-1", "err-2")
    assert await store.mark_created(ended, api_batch("msgbatch_1", "ended"))
    lines = [outcome("ok-1"), outcome("ok-2")]
    lines += [outcome(cid, "errored", error="bad request") for cid in ("err-1", "err-2")]
    assert (await store.write_results(ended, lines, 2)).written == 4
    flying = await claim(store, "fly-1")
    assert await store.mark_created(flying, api_batch("msgbatch_2"))


async def test_status_exits_1_only_for_an_unknown_id(
    tmp_path: Path, store: Store, database_config: DatabaseConfig
) -> None:
    await fill(store)
    env = database_env(tmp_path, database_config)
    assert said(batchd("status", "ok-1", "wait-1", env=env))[0] == 0
    code, out, err = said(batchd("status", "ok-1", "nosuch", env=env))
    assert (code, err) == (1, "nosuch: no such task\n")
    assert "ok-1" in out  # the known one still shown


async def test_cancel_exits_1_when_nothing_named_could_be_canceled(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await fill(store)
    env = database_env(tmp_path, database_config)

    code, out, _ = said(batchd("cancel", "ok-1", "err-1", env=env))
    assert code == 1  # all already final: nothing asked for was done
    assert "already finished: ok-1, err-1" in out

    code, out, _ = said(batchd("cancel", "ok-1", "wait-1", env=env))
    assert code == 0  # one canceled; the final one is named, no failure
    assert "canceled 1 pending task(s)" in out
    assert "already finished: ok-1" in out
    assert peek.task("wait-1")["status"] == "canceled"

    code, out, _ = said(batchd("cancel", "fly-1", env=env))
    assert code == 0  # flagged: its batch is canceled once every task in it is
    assert "flagged 1 submitted task(s)" in out

    code, out, _ = said(batchd("cancel", "wait-2", "nosuch", env=env))
    assert code == 1  # an unknown id, though wait-2 was canceled
    assert "unknown custom_id: nosuch" in out
    assert peek.task("wait-2")["status"] == "canceled"

    # Without ids nothing is named: 0, even with nothing left to cancel.
    assert said(batchd("cancel", "--status", "pending", env=env))[0] == 0


async def test_retry_exits_1_when_nothing_named_could_be_retried(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await fill(store)
    env = database_env(tmp_path, database_config)

    code, out, err = said(batchd("retry", "ok-1", "wait-1", env=env))
    assert code == 1  # neither is a failed task: nothing asked for was done
    assert out == "requeued 0 task(s)\n"
    assert "ok-1: succeeded, not retried (--status succeeded retries it)" in err

    code, out, err = said(batchd("retry", "err-1", "ok-1", env=env))
    assert code == 0  # err-1 requeued; ok-1 is named, no failure
    assert out == "requeued 1 task(s)\n"
    assert err == "ok-1: succeeded, not retried (--status succeeded retries it)\n"
    assert peek.task("err-1")["status"] == "pending"

    code, out, err = said(batchd("retry", "err-2", "nosuch", env=env))
    assert code == 1  # an unknown id, though err-2 was requeued
    assert (out, err) == ("requeued 1 task(s)\n", "nosuch: no such task\n")
    assert peek.task("err-2")["status"] == "pending"

    # Without ids every failed task is asked for: none left is no failure.
    assert said(batchd("retry", env=env)) == (0, "requeued 0 task(s)\n", "")
