"""The wake-up on insert (PostgreSQL): LISTEN on a connection of its own, woken by the
insert trigger's NOTIFY, re-LISTENing (and waking once) after its connection is killed;
and the daemon's INSERT-to-create latency with it."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import asyncpg
import pytest

from batchd.config import Config, DatabaseConfig
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.params import request_params
from tests.support.waiting import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store_backend", ["postgresql"],
                                                             indirect=True)]  # fmt: skip


async def _woken(event: asyncio.Event, within_s: float) -> float:
    started = time.monotonic()
    await asyncio.wait_for(event.wait(), within_s)
    event.clear()
    return time.monotonic() - started


async def _listeners(dsn: str) -> set[int]:
    """Backends of batchd in this database whose last statement was a LISTEN."""
    admin = await asyncpg.connect(dsn)
    try:
        rows = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'batchd' AND query LIKE 'LISTEN%'"
        )
    finally:
        await admin.close()
    return {row[0] for row in rows}


async def test_an_insert_by_a_user_wakes_the_listener_and_a_killed_connection_relistens(
    store: Store, peek: Peek, database_config: DatabaseConfig
) -> None:
    woken = asyncio.Event()
    assert database_config.url is not None
    before = await _listeners(database_config.url)
    async with store.listen_for_tasks(woken.set):
        await _woken(woken, 10)  # once at connect: whatever came while it was not listening
        await asyncio.to_thread(
            peek.execute, "INSERT INTO tasks (custom_id, params) VALUES ('u1', '{}')"
        )
        assert await _woken(woken, 5) < 5
        # A notification of another installation (another schema's payload) is not ours.
        await asyncio.to_thread(peek.execute, "SELECT pg_notify('batchd_tasks', 'elsewhere')")
        await asyncio.sleep(0.3)
        assert not woken.is_set()
        # The server ends the listening session: it reconnects, LISTENs and wakes again.
        ours = await _listeners(database_config.url) - before
        assert len(ours) == 1, ours
        admin = await asyncpg.connect(database_config.url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", ours.pop())
        finally:
            await admin.close()
        await _woken(woken, 10)
        await asyncio.to_thread(
            peek.execute, "INSERT INTO tasks (custom_id, params) VALUES ('u2', '{}')"
        )
        await _woken(woken, 5)


async def test_the_daemon_creates_a_batch_for_a_users_insert_at_once_not_at_the_tick(
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    peek: Peek,
    database_config: DatabaseConfig,
) -> None:
    config = daemon_config(fake_api.base_url)  # linger 0.05 s; the idle tick is 1 s
    started: list[Daemon] = []

    async def keep(daemon: Daemon) -> None:
        started.append(daemon)

    assert database_config.url is not None
    url = database_config.url
    before = await _listeners(url)
    running = asyncio.create_task(run_daemon(config, "test-key", on_started=keep))
    try:
        # Started, listening (a slow start would count in the first latencies), idle.
        await eventually(
            lambda: _listeners(url), "the daemon listening", 30, until=lambda now: now - before
        )
        for n in range(5):
            await asyncio.to_thread(
                peek.execute,
                "INSERT INTO tasks (custom_id, params) VALUES (?, ?)",
                f"late-{n}",
                request_params(f"question {n}"),
            )
            await asyncio.sleep(0.6 + 0.13 * n)  # at different phases of the tick
        # Every insert submitted before the stop (a stop ends the submitting).
        await eventually(
            lambda: peek.query(
                "SELECT count(*) FROM tasks AS t JOIN batches AS b ON b.id = t.batch_id"
                " WHERE b.submitted_at IS NOT NULL"
            ),
            "every task in a created batch",
            30,
            until=lambda rows: rows == [(5,)],
        )
    finally:
        started[0].stop()
    assert await running == 0
    rows = peek.query(
        "SELECT extract(epoch FROM b.submitted_at - t.created_at)::float8 FROM tasks AS t"
        " JOIN batches AS b ON b.id = t.batch_id ORDER BY t.id"
    )
    latencies = [row[0] for row in rows]
    assert len(latencies) == 5
    print(f"\nINSERT to create (s): {[round(s, 3) for s in latencies]}, "
          f"median {statistics.median(latencies):.3f}")  # fmt: skip
    # Without the wake-up each would wait for the 1 s tick: 0.5 s on average.
    assert statistics.median(latencies) < 0.4
