"""Money paid is money recorded, end to end: the daemon against the fake over loopback.

What the fake billed (every succeeded line of every batch, spec §5) is what the usage
ledger, `batchd status` (a real process) and its cost show, in the two fault scenarios
that leave billed lines no task holds: a create answered late, whose batch and its
resubmission both run (one batch's lines kept as duplicates), and a user's DELETE of the
tasks of a batch in flight (its lines kept unmatched; the batch still ours, no alarm).
On SQLite and on PostgreSQL (a schema per test).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from batchd.config import Config, DatabaseConfig
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.money.pricing import PriceTable, TokenCounts, price_usage
from batchd.service.daemon import run_daemon
from batchd.store import open_store
from tests.support.backends import Peek
from tests.support.ledger import billed_by_fake, recorded_in_ledger
from tests.support.params import request_params

pytestmark = pytest.mark.both_stores
TASKS = 4


async def enqueue(config: Config) -> list[str]:
    store = await open_store(config.database)
    try:
        ids = [f"m-{n}" for n in range(TASKS)]
        await store.enqueue(
            (cid, request_params(f"Money question {n}")) for n, cid in enumerate(ids)
        )
    finally:
        await store.close()
    return ids


def status(database: DatabaseConfig, tmp_path: Path, *args: str) -> str:
    """`batchd status` as a user runs it: a process of its own."""
    config = tmp_path / "status.toml"
    if database.url is None:
        config.write_text(f'[database]\npath = "{database.path}"\n')
    else:
        config.write_text(f'[database]\nurl = "{database.url}"\nschema = "{database.schema}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "batchd", "--config", str(config), "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "BATCHD_CONFIG": str(config)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def cost_of(billed: tuple[int, int, int, int, int], model: str, config: Config) -> float:
    """What the fake's bill costs at batch prices (every request of one model here)."""
    table = PriceTable(config.pricing.models)
    return price_usage([(model, TokenCounts(*billed))], table).cost_usd


async def test_a_late_create_and_its_resubmission_are_both_counted_once(
    daemon_config: Callable[..., Config],
    database_config: DatabaseConfig,
    peek: Peek,
    tmp_path: Path,
) -> None:
    # The first create is committed 3 s after its connection dropped: the 1 s grace has
    # passed, the intent was released and its requests sent again; the late batch is
    # found by the watch and read to the end. Both batches were billed in full.
    faults = FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=("late_create",),
        http_fault_endpoints=("create",),
        http_fault_limit=1,
        late_create_seconds=3.0,
    )
    async with FakeApiServer(FakeApiConfig(processing_seconds=1.0, faults=faults)) as fake:
        config = daemon_config(
            fake.base_url, max_requests=TASKS, reconcile_grace_s=1.0, duplicate_watch_s=8.0
        )
        await enqueue(config)
        code = await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 60)
        assert code == 0
        billed = billed_by_fake(fake.state)
        batches = len(fake.state.batches)

    assert batches == 2, "the fault made no duplicate batch: the test proves nothing"
    assert billed[0] == 2 * TASKS
    assert peek.query("SELECT count(*) FROM duplicate_results") == [(TASKS,)]
    assert recorded_in_ledger(peek) == billed
    [model] = {str(m) for (m,) in peek.query("SELECT model FROM usage_ledger")}

    usage: dict[str, Any] = orjson.loads(status(database_config, tmp_path, "--json"))["usage"]
    assert usage["requests"] == 2 * TASKS
    assert usage["cost_usd"] == pytest.approx(cost_of(billed, model, config), abs=1e-6)
    assert usage["kept_aside"]["requests"] == TASKS
    assert usage["kept_aside"]["cost_usd"] == pytest.approx(usage["cost_usd"] / 2, abs=1e-6)
    assert (usage["kept_aside"]["duplicate"]["requests"], usage["kept_aside"]["unmatched"]) == (
        TASKS,
        {"requests": 0, "cost_usd": 0.0},
    )
    text = status(database_config, tmp_path)
    assert f"of which {TASKS} result(s)" in text
    assert f"{TASKS} duplicate (" in text


async def test_deleting_the_tasks_of_a_batch_in_flight_keeps_it_ours_and_its_cost_counted(
    daemon_config: Callable[..., Config],
    database_config: DatabaseConfig,
    peek: Peek,
    tmp_path: Path,
) -> None:
    async with FakeApiServer(FakeApiConfig(processing_seconds=3.0)) as fake:
        config = daemon_config(fake.base_url, max_requests=TASKS)
        await enqueue(config)
        with capture_logs() as logs:
            daemon = asyncio.create_task(run_daemon(config, "k", exit_when_idle=True))
            while not peek.query("SELECT 1 FROM batches WHERE state = 'in_progress'"):
                assert not daemon.done(), daemon
                await asyncio.sleep(0.05)
            peek.execute("DELETE FROM tasks")  # the user's DELETE, batch in flight
            assert await asyncio.wait_for(daemon, 60) == 0
        billed = billed_by_fake(fake.state)

    assert billed[0] == TASKS
    assert peek.query("SELECT state, origin, foreign_lines FROM batches") == [
        ("completed", "partly_ours", 0)
    ]
    assert peek.query("SELECT count(*) FROM foreign_batches") == [(0,)]
    assert peek.query("SELECT count(*) FROM unmatched_results") == [(TASKS,)]
    assert "batch_foreign" not in [e["event"] for e in logs]
    assert "api_key_shared" not in [e["event"] for e in logs]
    assert recorded_in_ledger(peek) == billed
    out = status(database_config, tmp_path)
    assert "KEY APPEARS SHARED" not in out
    assert f"of which {TASKS} result(s)" in out
    assert f"0 duplicate ($0.0000, duplicate_results), {TASKS} unmatched" in out
