"""Issue 14 item 5, the CLI for operators: the real `python -m batchd` process on a
database the store filled (batches, tasks by status, cancel --all / --status, the
acknowledgement of a suspected duplicate, results -o without overwriting), on both stores."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from batchd.api.wire import MessageBatch
from batchd.config import DatabaseConfig
from batchd.domain import TaskStatus
from batchd.service.exits import EXIT_USAGE
from batchd.store import Store
from batchd.store.postgres import actions as postgres_actions
from batchd.store.sqlite import actions
from tests.support.backends import Peek
from tests.support.cli import batchd
from tests.support.store import add_tasks, api_batch, claim, outcome

pytestmark = pytest.mark.both_stores


def environment(tmp_path: Path, database: DatabaseConfig) -> dict[str, str]:
    """A config naming the test's store: its SQLite file or its PostgreSQL schema."""
    config = tmp_path / "batchd.toml"
    if database.url is None:
        config.write_text(f'[database]\npath = "{database.path}"\n')
    else:
        config.write_text(f'[database]\nurl = "{database.url}"\nschema = "{database.schema}"\n')
    return {**os.environ, "BATCHD_CONFIG": str(config), "ANTHROPIC_API_KEY": "sk-test"}


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def created(api_id: str, *, minutes_ago: float, processing: int) -> MessageBatch:
    batch = api_batch(api_id, processing=processing)
    moment = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    batch["created_at"] = moment.isoformat()
    batch["expires_at"] = (moment + timedelta(hours=24)).isoformat()
    return batch


async def fill(store: Store) -> None:
    """Two batches in progress (one 23 h old, near expiry), one rejected, tasks of every
    kind: pending, submitted, errored. The store stays open: the CLI's processes use the
    database beside it."""
    await add_tasks(store, "old-1", "old-2", "new-1", "rej-1", "err-1", "err-2", "err-3")
    old = await claim(store, "old-1", "old-2")
    assert await store.mark_created(old, created("msgbatch_old", minutes_ago=23 * 60, processing=2))
    new = await claim(store, "new-1")
    assert await store.mark_created(new, created("msgbatch_new", minutes_ago=5, processing=1))
    await store.release_intent(await claim(store, "rej-1"), "refused: 400")
    errored = await claim(store, "err-1", "err-2", "err-3")
    assert await store.mark_created(errored, api_batch("msgbatch_err", "ended"))
    report = await store.write_results(
        errored,
        [outcome(c, "errored", error=f"bad request {c}") for c in ("err-1", "err-2", "err-3")],
        3,
    )
    assert report.written == 3
    await add_tasks(store, "later-1", "later-2")


async def test_batches_lists_local_batches_newest_first_with_counts_age_and_expiry(
    tmp_path: Path, store: Store, database_config: DatabaseConfig
) -> None:
    await fill(store)
    env = environment(tmp_path, database_config)

    listed = orjson.loads(ok(batchd("batches", "--json", env=env)))["batches"]
    assert [b["batch_id"] for b in listed] == ["msgbatch_err", None, "msgbatch_new", "msgbatch_old"]
    by_id = {b["batch_id"]: b for b in listed}
    old = by_id["msgbatch_old"]
    assert (old["state"], old["requests"], old["request_counts"]["processing"]) == (
        "in_progress",
        2,
        2,
    )
    assert 23 * 3600 - 60 < old["age_s"] < 23 * 3600 + 60
    assert 3600 - 60 < old["expires_in_s"] < 3600 + 60
    assert by_id[None]["state"] == "rejected"
    assert by_id[None]["expires_in_s"] is None

    # The same builder as the status document (and so the web view's /api/status).
    status = orjson.loads(ok(batchd("status", "--json", env=env)))
    in_flight = {b["batch_id"]: b for b in status["batches_in_flight"]}
    assert set(in_flight["msgbatch_old"]) == set(old)
    assert in_flight["msgbatch_old"]["expires_in_s"] == pytest.approx(old["expires_in_s"], abs=30)

    text = ok(batchd("batches", "--state", "in_progress", "--limit", "1", env=env))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["BATCH", "LOCAL", "STATE"]
    assert len(lines) == 2
    assert lines[1].split()[0] == "msgbatch_new"
    assert "processing 1" in lines[1]
    assert "23h" in ok(batchd("batches", env=env))  # the old batch's age


async def test_tasks_lists_one_status_oldest_first_up_to_the_limit(
    tmp_path: Path, store: Store, database_config: DatabaseConfig
) -> None:
    await fill(store)
    env = environment(tmp_path, database_config)
    listed = orjson.loads(
        ok(batchd("tasks", "--status", "errored", "--limit", "2", "--json", env=env))
    )
    assert listed["status"] == "errored"
    assert [(t["custom_id"], t["batch_id"], t["error"]) for t in listed["tasks"]] == [
        ("err-1", "msgbatch_err", "bad request err-1"),
        ("err-2", "msgbatch_err", "bad request err-2"),
    ]
    assert listed["tasks"][0]["result"] == {"type": "errored"}
    text = ok(batchd("tasks", "--status", "pending", env=env)).splitlines()
    assert [line.split()[0] for line in text[1:]] == ["rej-1", "later-1", "later-2"]
    assert ok(batchd("tasks", "--status", "expired", env=env)).strip() == "no expired tasks"
    assert batchd("tasks", env=env).returncode == EXIT_USAGE  # --status is required


async def test_cancel_all_cancels_pending_and_flags_submitted(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await fill(store)
    said = ok(batchd("cancel", "--all", env=environment(tmp_path, database_config)))
    assert "canceled 3 pending task(s)" in said
    assert "flagged 3 submitted task(s)" in said
    assert peek.query(
        "SELECT status, cancel_requested, count(*) FROM tasks GROUP BY 1, 2 ORDER BY 1, 2"
    ) == [
        ("canceled", 0, 3),
        ("errored", 0, 3),
        ("submitted", 1, 3),
    ]


async def test_cancel_by_status_leaves_the_other_status_alone(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await fill(store)
    env = environment(tmp_path, database_config)
    said = ok(batchd("cancel", "--status", "submitted", env=env))
    assert "canceled 0 pending" in said
    assert "flagged 3 submitted" in said
    assert peek.query("SELECT count(*) FROM tasks WHERE status = 'pending'") == [(3,)]
    for wrong in (
        ("cancel",),
        ("cancel", "a", "--all"),
        ("cancel", "--all", "--status", "pending"),
    ):
        refused = batchd(*wrong, env=env)
        assert refused.returncode == EXIT_USAGE, wrong
        assert b"CUSTOM_IDs, --all or --status (one of them)" in refused.stderr
    assert batchd("cancel", "--status", "errored", env=env).returncode == EXIT_USAGE


async def test_cancel_of_many_runs_in_short_transactions_and_only_to_the_tasks_at_its_start(
    store: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actions, "CANCEL_CHUNK", 3)
    monkeypatch.setattr(postgres_actions, "CANCEL_CHUNK", 3)
    await add_tasks(store, *(f"t-{n}" for n in range(10)))
    commits: list[int] = []
    transact = store.database.transact  # type: ignore[attr-defined]

    async def counted(body, *args, **kwargs):  # type: ignore[no-untyped-def]
        commits.append(1)
        if len(commits) == 2:  # a user's INSERT while the cancel runs
            peek.execute("INSERT INTO tasks (custom_id, params) VALUES ('late', '{}')")
        return await transact(body, *args, **kwargs)

    monkeypatch.setattr(store.database, "transact", counted)  # type: ignore[attr-defined]
    report = await store.cancel_waiting([TaskStatus.PENDING])
    assert (report.canceled, report.flagged) == (10, 0)
    assert len(commits) == 4  # 3 + 3 + 3 + 1
    assert peek.query("SELECT status FROM tasks WHERE custom_id = 'late'") == [("pending",)]


async def test_an_acknowledged_duplicate_stays_on_record_and_is_no_longer_alarmed(
    tmp_path: Path, store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    await add_tasks(store, "a")
    local_id = await claim(store, "a")
    if database_config.url is None:
        assert await store.mark_created(
            local_id, api_batch("msgbatch_1"), [api_batch("msgbatch_dup")]
        )
    else:  # until the PostgreSQL harvest (branch pgharvest) takes candidates as batches
        assert await store.mark_created(local_id, api_batch("msgbatch_1"))
        peek.execute(
            "INSERT INTO duplicate_batches (api_batch_id, local_id, detected_at, note)"
            " VALUES ('msgbatch_dup', ?, now(), 'same request count')",
            local_id,
        )
    env = environment(tmp_path, database_config)
    assert "POSSIBLE DUPLICATE BATCH msgbatch_dup" in ok(batchd("status", env=env))

    said = ok(batchd("acknowledge-duplicate", "msgbatch_dup", "--note", "paid, checked", env=env))
    assert "acknowledged msgbatch_dup" in said
    assert "POSSIBLE DUPLICATE" not in ok(batchd("status", env=env))
    assert orjson.loads(ok(batchd("status", "--json", env=env)))["duplicate_batches"] == []
    [(note, acknowledged_at)] = peek.query(
        "SELECT acknowledged_note, acknowledged_at FROM duplicate_batches"
        " WHERE api_batch_id = 'msgbatch_dup'",
    )
    assert note == "paid, checked"
    assert acknowledged_at is not None
    # Still known: reconcile must never adopt it.
    assert "msgbatch_dup" in await store.known_api_batch_ids()

    again = batchd("acknowledge-duplicate", "msgbatch_dup", "msgbatch_nope", env=env)
    assert again.returncode == 1
    assert b"msgbatch_dup: already acknowledged" in again.stdout
    assert b"msgbatch_nope is not a suspected duplicate batch" in again.stderr


async def test_results_to_an_existing_file_is_refused_without_force(
    tmp_path: Path, store: Store, database_config: DatabaseConfig
) -> None:
    await fill(store)
    env = environment(tmp_path, database_config)
    target = tmp_path / "results.jsonl"
    target.write_text("an earlier export\n")
    refused = batchd("results", "-o", str(target), env=env)
    assert refused.returncode == EXIT_USAGE
    assert f"{target} exists: --force overwrites it".encode() in refused.stderr
    assert target.read_text() == "an earlier export\n"
    ok(batchd("results", "-o", str(target), "--force", env=env))
    lines = [orjson.loads(line) for line in target.read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == ["err-1", "err-2", "err-3"]
    assert batchd("results", "--force", env=env).returncode == EXIT_USAGE  # needs -o
