"""Review 7 finding 4: a producer's enqueue racing another producer never drops a line:
every line given is either inserted or reported as a duplicate, and the counts add up.

On PostgreSQL (READ COMMITTED) a custom_id another producer commits while our insert runs
is only seen by the INSERT itself (ON CONFLICT waits for the other transaction, then does
nothing): what was inserted is what the INSERT returns. On SQLite the chunk's transaction
holds the write lock from its start (BEGIN IMMEDIATE), so no other producer can commit
in between; the same tests hold it to that."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store, open_store
from batchd.store.postgres.connection import quote_ident
from batchd.store.values import EnqueueReport
from tests.support.backends import Peek
from tests.support.cli import BATCHD
from tests.support.store import PARAMS

pytestmark = pytest.mark.both_stores


@asynccontextmanager
async def uncommitted_insert(database: DatabaseConfig, custom_id: str) -> AsyncIterator[int | None]:
    """Another producer's INSERT of `custom_id`, in a transaction still open for the body
    of the block and committed at its end; yields its server process id (PostgreSQL)."""
    if database.url is None:
        conn = sqlite3.connect(database.path, timeout=5, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO tasks (custom_id, params) VALUES (?, ?)", (custom_id, PARAMS))
            yield None
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    assert database.schema is not None
    pg = await asyncpg.connect(
        database.url, server_settings={"search_path": quote_ident(database.schema)}
    )
    try:
        async with pg.transaction():
            await pg.execute(
                "INSERT INTO tasks (custom_id, params) VALUES ($1, $2::jsonb)", custom_id, PARAMS
            )
            yield pg.get_server_pid()
    finally:
        await pg.close()


async def blocked_on_a_lock(database: DatabaseConfig, holder: int | None) -> None:
    """Until a session of the store waits for the other producer's session `holder`
    (PostgreSQL); on SQLite the store's BEGIN IMMEDIATE waits in its busy handler: give
    it time to get there."""
    if database.url is None:
        await asyncio.sleep(0.5)
        return
    pg = await asyncpg.connect(database.url)
    try:
        for _ in range(200):
            waiting = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
                " AND query LIKE '%INSERT INTO tasks%'",
                holder,
            )
            if waiting:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the store's INSERT never waited for the other producer's row")
    finally:
        await pg.close()


async def test_a_line_another_producer_commits_during_the_insert_is_reported_duplicate(
    store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    # The store's chunk must already be under way (PostgreSQL: past any read of what is
    # stored, inside its INSERT) when the other producer's row commits.
    given = [("mine-1", PARAMS), ("raced", PARAMS), ("mine-2", PARAMS)]
    async with uncommitted_insert(database_config, "raced") as holder:
        enqueue = asyncio.create_task(store.enqueue(given))
        await blocked_on_a_lock(database_config, holder)
        assert not enqueue.done()
    report = await asyncio.wait_for(enqueue, 30)
    assert report == EnqueueReport(inserted=2, duplicates=("raced",))
    assert peek.query("SELECT count(*) FROM tasks") == [(3,)]


async def open_second(database: DatabaseConfig) -> Store:
    """Another producer's store on the same database: connections of its own."""
    return await open_store(database)


async def test_two_producers_with_overlapping_custom_ids_account_for_every_line(
    store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    # Both producers walk the same shared ids in the same order, chunk for chunk, so
    # their chunks' transactions overlap on the same custom_ids again and again; each has
    # ids of its own besides, and repeats one of its own lines.
    shared = [f"shared-{n:05d}" for n in range(20_000)]
    lines: dict[str, list[tuple[str, str]]] = {}
    for name in ("a", "b"):
        given = lines[name] = []
        for n, custom_id in enumerate(shared):
            given.append((custom_id, PARAMS))
            if n % 4 == 0:
                given.append((f"{name}-{n:05d}", PARAMS))
        given.append((f"{name}-00000", PARAMS))
    other = await open_second(database_config)
    try:
        for _ in range(2):  # a race lost once is lost again: two rounds, fresh ids each
            reports = await asyncio.gather(store.enqueue(lines["a"]), other.enqueue(lines["b"]))
            inserted_by: list[set[str]] = []
            for (name, given), report in zip(lines.items(), reports, strict=True):
                assert report.inserted + len(report.duplicates) == len(given), name
                ids = [cid for cid, _ in given]
                # Duplicates are reported in the order given, one per line not inserted.
                kept = list(ids)
                for duplicate in report.duplicates:
                    kept.remove(duplicate)
                assert len(set(kept)) == len(kept) == report.inserted, name
                inserted_by.append(set(kept))
            assert not inserted_by[0] & inserted_by[1]
            everything = {cid for given in lines.values() for cid, _ in given}
            assert inserted_by[0] | inserted_by[1] == everything
            # Next round: the same shape on new ids (none of these may be stored yet).
            lines = {
                name: [(f"r2-{cid}", params) for cid, params in given]
                for name, given in lines.items()
            }
    finally:
        await other.close()
    stored = peek.query("SELECT count(*) FROM tasks")[0][0]
    assert stored == 2 * (20_000 + 2 * 5_000)


def test_two_enqueue_processes_on_one_file_report_every_line(
    tmp_path: Path, database_config: DatabaseConfig, peek: Peek, store: Store
) -> None:
    """The same file fed by two `batchd enqueue` at once: between them every line is
    inserted once, and each process reports the rest as duplicates."""
    del store  # migrated by the fixture, so neither process migrates under the other
    config = tmp_path / "batchd.toml"
    if database_config.url is None:
        config.write_text(f'[database]\npath = "{database_config.path}"\n')
    else:
        config.write_text(
            f'[database]\nurl = "{database_config.url}"\nschema = "{database_config.schema}"\n'
        )
    env = {**os.environ, "BATCHD_CONFIG": str(config)}
    source = tmp_path / "tasks.jsonl"
    count = 30_000
    source.write_text(
        "".join(f'{{"custom_id": "t-{n:05d}", "params": {PARAMS}}}\n' for n in range(count))
    )
    processes = [
        subprocess.Popen(
            [*BATCHD, "enqueue", str(source)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    said = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        said.append(out.decode())
    inserted = [int(text.split("enqueued ")[1].split(" ")[0]) for text in said]
    duplicates = [
        int(text.split("; ")[1].split(" ")[0]) if "duplicate" in text else 0 for text in said
    ]
    assert sum(inserted) == count
    for ins, dup in zip(inserted, duplicates, strict=True):
        assert ins + dup == count, said
    assert peek.query("SELECT count(*) FROM tasks") == [(count,)]
