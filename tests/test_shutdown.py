"""SIGTERM and SIGINT on a real `batchd run` process: exit 0 promptly, leave in-flight
batches for the restart, which finishes them; a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from tests.support.crash_harness import (
    BATCHD,
    DaemonSetup,
    RunLog,
    assert_nothing_lost_or_duplicated,
    check_invariants,
    enqueue,
    run_daemon,
    write_config,
)
from tests.support.waiting import eventually

TASKS = 12
SYSTEMD_STOP_TIMEOUT_S = 45.0  # TimeoutStopSec in systemd/batchd.service


def in_progress(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        return int(
            db.execute("SELECT count(*) FROM batches WHERE state = 'in_progress'").fetchone()[0]
        )


async def start(setup: DaemonSetup) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *BATCHD,
        "--config",
        str(setup.config_path),
        "run",
        env=setup.env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def until_in_flight(setup: DaemonSetup, batches: int) -> None:
    deadline = time.monotonic() + 20
    while in_progress(setup.db_path) < batches:
        assert time.monotonic() < deadline, "no batch in flight"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_exits_0_promptly_and_a_restart_finishes_the_batches_in_flight(
    signum: signal.Signals, tmp_path: Path
) -> None:
    async with FakeApiServer(FakeApiConfig(processing_seconds=60.0, seed=3)) as fake:
        setup = write_config(tmp_path, fake.base_url)
        await enqueue(setup, TASKS)
        process = await start(setup)
        await until_in_flight(setup, TASKS // 4)  # every task in a batch of 4
        # The API is failing meanwhile: the loops sit in retry backoff when asked to stop.
        fake.faults.go_down(fake.clock(), 3600)
        await asyncio.sleep(0.3)
        sent = time.monotonic()
        process.send_signal(signum)
        returncode = await asyncio.wait_for(process.wait(), SYSTEMD_STOP_TIMEOUT_S)
        stop_s = time.monotonic() - sent
        print(f"\n{signum.name}: exit {returncode} after {stop_s:.2f} s")
        assert returncode == 0
        assert stop_s < 10  # well within systemd's 45 s
        assert in_progress(setup.db_path) == TASKS // 4  # left for the restart, not lost

        fake.faults.down_until = None
        fake.clock.advance(120)  # the batches end while no daemon runs
        log = RunLog()
        run = await run_daemon(setup, log)
        assert run.returncode == 0, run.stderr[-2000:]
        ledger = check_invariants(setup.db_path, fake)
    assert_nothing_lost_or_duplicated(ledger, TASKS)
    assert ledger.submissions == TASKS


async def test_a_second_signal_during_a_slow_shutdown_exits_at_once(tmp_path: Path) -> None:
    slow_polls = FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=("slow",),
        http_fault_endpoints=("retrieve",),
        slow_seconds=30.0,
    )
    async with FakeApiServer(FakeApiConfig(processing_seconds=60.0)) as fake:
        setup = write_config(tmp_path, fake.base_url, api={"request_timeout_seconds": 60.0})
        await enqueue(setup, 4)
        process = await start(setup)
        await until_in_flight(setup, 1)
        fake.faults.config = slow_polls
        # The poller is waiting on a 30 s retrieve (a loaded machine may take a while to
        # send one; a SIGTERM before it would find nothing to drain).
        await eventually(lambda: fake.faults.injected["slow"], "a slow retrieve under way", 20)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert process.returncode is None  # still draining the step in hand
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 10)
        stop_s = time.monotonic() - sent
    print(f"\nsecond SIGTERM: exit {returncode} after {stop_s:.2f} s")
    assert returncode == 1
    assert stop_s < 3
    assert in_progress(setup.db_path) == 1
