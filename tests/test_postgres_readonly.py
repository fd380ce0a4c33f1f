"""Reads never write on PostgreSQL (issue 14 on issue 13's store): a read-only open never
creates the schema, never migrates, refuses every write before touching the server, and
its sessions cannot write even by a path that forgot to refuse; the operator reads and
writes behave as on SQLite (tests/test_operator_cli.py runs the CLI on both)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import asyncpg
import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.domain import BatchState, TaskStatus
from batchd.service.exits import EXIT_CONFIG
from batchd.store import DatabaseMissingError, Store, StoreError, open_store
from batchd.store.postgres.migrations import shipped_migrations
from tests.support.backends import PostgresPeek
from tests.support.cli import batchd
from tests.support.store import add_tasks, api_batch, claim

pytestmark = pytest.mark.postgres

NEWEST = shipped_migrations()[-1].version
PREVIOUS = shipped_migrations()[-2].version  # numbers may skip (reserved for other work)
# `status` joins these once the PostgreSQL harvest (branch pgharvest) gives it the
# candidate batches it lists; until then it fails on PostgreSQL for that reason alone.
READS = (("results",), ("batches",), ("batches", "--json"), ("tasks", "--status", "pending"))


def schema_exists(postgres_peek: PostgresPeek) -> bool:
    found = postgres_peek.query(
        "SELECT count(*) FROM pg_namespace WHERE nspname = ?", postgres_peek.schema
    )
    return bool(found[0][0])


def environment(tmp_path: Path, postgres_database: DatabaseConfig) -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    config.write_text(
        f'[database]\nurl = "{postgres_database.url}"\nschema = "{postgres_database.schema}"\n'
    )
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "sk-test",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # nothing listens: no read calls it
    }


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


async def filled(postgres_database: DatabaseConfig) -> None:
    store = await open_store(postgres_database)
    try:
        await add_tasks(store, "a", "b", "c")
        local_id = await claim(store, "b")
        assert await store.mark_created(local_id, api_batch("msgbatch_1"))
    finally:
        await store.close()


async def test_a_read_only_open_of_a_missing_schema_is_refused_and_creates_nothing(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek, tmp_path: Path
) -> None:
    with pytest.raises(DatabaseMissingError, match="read-only commands never create one"):
        await open_store(postgres_database, read_only=True)
    assert not schema_exists(postgres_peek)
    env = environment(tmp_path, postgres_database)
    for command in (*READS, ("cancel", "a"), ("retry",)):
        result = batchd(*command, env=env)
        assert result.returncode == EXIT_CONFIG, (command, result.stderr)
    assert not schema_exists(postgres_peek)


async def test_a_read_only_store_reads_and_refuses_every_write_before_the_server(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    await filled(postgres_database)
    store = await open_store(postgres_database, read_only=True)
    try:
        assert (await store.schema_versions()) == (NEWEST, NEWEST)
        counts = await store.status_counts()
        assert (counts[TaskStatus.PENDING], counts[TaskStatus.SUBMITTED]) == (2, 1)
        assert await store.has_tasks(TaskStatus.SUBMITTED)
        assert [t.custom_id for t in await store.tasks_in_status(TaskStatus.PENDING, 5)] == [
            "a",
            "c",
        ]
        [batch] = await store.recent_batches(5, [BatchState.IN_PROGRESS])
        assert batch.api_batch_id == "msgbatch_1"
        for write in (
            store.enqueue([("d", "{}")]),
            store.request_cancel(["a"]),
            store.cancel_waiting([TaskStatus.PENDING]),
            store.acknowledge_duplicates(["msgbatch_x"], "seen"),
            store.retry_tasks([TaskStatus.ERRORED]),
            store.migrate(),
            store.accounts.reclaim_space(),
            store.accounts.delete_tasks([1], store.database.now()),  # type: ignore[attr-defined]
        ):
            with pytest.raises(StoreError, match="opened read-only"):
                await write
        # A path that forgot to refuse still cannot write: every session is read-only.
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await store.database.read("UPDATE tasks SET error = 'x'")  # type: ignore[attr-defined]
    finally:
        await store.close()
    assert postgres_peek.query("SELECT custom_id, status, error FROM tasks ORDER BY id") == [
        ("a", "pending", None),
        ("b", "submitted", None),
        ("c", "pending", None),
    ]


async def test_a_read_only_open_never_migrates_an_older_schema(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek, tmp_path: Path
) -> None:
    await filled(postgres_database)
    # As if the newest migration were not applied yet: only its record is taken away
    # (its columns stay, so the reads still find what they need).
    postgres_peek.execute("DELETE FROM schema_migrations WHERE version = ?", NEWEST)
    store = await open_store(postgres_database, read_only=True)
    try:
        assert (await store.schema_versions()) == (PREVIOUS, NEWEST)
    finally:
        await store.close()
    result = batchd(
        "tasks", "--status", "pending", "--json", env=environment(tmp_path, postgres_database)
    )
    assert [t["custom_id"] for t in orjson.loads(ok(result))["tasks"]] == ["a", "c"]
    assert b"schema_version_differs" in result.stderr
    assert postgres_peek.query("SELECT max(version) FROM schema_migrations") == [(PREVIOUS,)]
    # A writing command other than run/migrate/enqueue refuses the older schema.
    refused = batchd("cancel", "a", env=environment(tmp_path, postgres_database))
    assert refused.returncode == EXIT_CONFIG
    assert b"run `batchd migrate` first" in refused.stderr


async def test_reads_of_the_cli_on_postgresql_leave_every_row_as_it_was(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek, tmp_path: Path
) -> None:
    await filled(postgres_database)
    before = postgres_peek.query("SELECT * FROM tasks ORDER BY id") + postgres_peek.query(
        "SELECT * FROM batches ORDER BY id"
    )
    env = environment(tmp_path, postgres_database)
    for command in READS:
        ok(batchd(*command, env=env))
    after = postgres_peek.query("SELECT * FROM tasks ORDER BY id") + postgres_peek.query(
        "SELECT * FROM batches ORDER BY id"
    )
    assert after == before


async def test_acknowledging_on_postgresql_keeps_the_record_and_reports_each_id(
    postgres_database: DatabaseConfig, postgres_peek: PostgresPeek
) -> None:
    store: Store = await open_store(postgres_database)
    try:
        await add_tasks(store, "a")
        local_id = await claim(store, "a")
        assert await store.mark_created(local_id, api_batch("msgbatch_1"))
        postgres_peek.execute(
            "INSERT INTO duplicate_batches (api_batch_id, local_id, detected_at, note)"
            " VALUES ('msgbatch_dup', ?, now(), 'same request count')",
            local_id,
        )
        assert [d.api_batch_id for d in await store.duplicate_batches()] == ["msgbatch_dup"]
        report = await store.acknowledge_duplicates(["msgbatch_dup", "msgbatch_nope"], "ok")
        assert (report.acknowledged, report.already, report.unknown) == (
            ("msgbatch_dup",),
            (),
            ("msgbatch_nope",),
        )
        again = await store.acknowledge_duplicates(["msgbatch_dup"], "twice")
        assert again.already == ("msgbatch_dup",)
        assert await store.duplicate_batches() == []
        assert "msgbatch_dup" in await store.known_api_batch_ids()
    finally:
        await store.close()
    assert postgres_peek.query("SELECT acknowledged_note FROM duplicate_batches") == [("ok",)]
