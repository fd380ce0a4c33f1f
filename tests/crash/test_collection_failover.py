"""Failover "in seconds" of a collection (issue 13): a daemon killed with -9 in the middle
of a batch's write-back, restarted at once as systemd would (a new process, a new instance
name), completes that batch within seconds even with the default 60 s lease: the killed
holder's liveness lock went with its session, so its lease is free. A holder that is alive
but frozen (SIGSTOP: its sessions, and its liveness lock, stay) keeps its lease until it
lapses, as before.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.config import DatabaseConfig
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.store.postgres.liveness import LIVENESS_KEY
from tests.support.backends import Peek
from tests.support.crash_harness import (
    assert_nothing_lost_or_duplicated,
    check_invariants,
    enqueue,
    instance_of,
    log_events,
    logged,
    start_daemon,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)]  # fmt: skip
# The shipped lease: a restart that waited for it would take a minute.
DEFAULT_LEASE_S = 60.0
# Kill to completed by the restarted daemon: its start (an interpreter, the schema check,
# the key check) and one batch's download and apply. Measured ~2 s on a quiet machine.
FAILOVER_S = 10.0
FROZEN_LEASE_S = 6.0
# The renewal runs every third of the lease: a holder frozen just after one leaves at
# least two thirds of it to run (less a little for the log's and the test's own delays).
LEAST_TAKEOVER_S = FROZEN_LEASE_S * 2 / 3 - 0.5


async def _kill_all(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


def _held_by(peek: Peek, instance: str) -> list[int]:
    rows = peek.query(
        "SELECT id FROM batches WHERE state = 'ended' AND collector = ?"
        " AND collect_lease_until > now() ORDER BY id",
        instance,
    )
    return [local_id for (local_id,) in rows]


async def test_a_daemon_restarted_after_a_kill_mid_collection_completes_its_batch_in_seconds(
    fake_api: FakeApiServer, tmp_path: Path, database_config: DatabaseConfig, peek: Peek
) -> None:
    tasks = 40
    setup = write_config(tmp_path, fake_api.base_url, database_config,
                         results={"lease_seconds": DEFAULT_LEASE_S})  # fmt: skip
    await enqueue(setup, tasks)
    processes = [
        await start_daemon(setup, 0, crash_at="results_chunk_written:1", exit_when_idle=False)
    ]
    try:
        assert await asyncio.wait_for(processes[0].wait(), 60) == -signal.SIGKILL
        died = time.monotonic()
        victim = instance_of(setup, 0)
        held = _held_by(peek, victim)
        assert held  # killed holding a 60 s lease, between two applied ranges of its batch
        processes.append(await start_daemon(setup, 1))  # systemd's Restart=, at once

        def completed() -> bool:
            rows = peek.query(
                "SELECT count(*) FROM batches WHERE state = 'completed' AND id = ANY(?)", held
            )
            return bool(rows[0][0] == len(held))

        while not completed():
            assert time.monotonic() - died < DEFAULT_LEASE_S + 30, "never completed"
            await asyncio.sleep(0.05)
        failover_s = time.monotonic() - died
        print(f"\nkill -9 mid-collection to the batch completed by the restarted daemon: "
              f"{failover_s:.2f} s (lease {DEFAULT_LEASE_S:.0f} s)")  # fmt: skip
        assert failover_s <= FAILOVER_S, failover_s
        assert await asyncio.wait_for(processes[1].wait(), 90) == 0
    finally:
        await _kill_all(processes)
    takeovers = {
        entry["local_id"]: entry for entry in log_events(setup, 1, "collection_taken_over")
    }
    for local_id in held:
        assert takeovers[local_id]["previous_holder"] == victim
        assert takeovers[local_id]["reason"] == "holder_gone"
        assert peek.query("SELECT collector FROM batches WHERE id = ?", local_id) == [
            (instance_of(setup, 1),)
        ]
    ledger = check_invariants(peek, fake_api)
    assert_nothing_lost_or_duplicated(ledger, tasks)


@pytest.fixture
async def slow_results() -> AsyncIterator[FakeApiServer]:
    """The first results download answers after 20 s (its holder sits in it, renewing);
    every other call at once."""
    faults = FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=("slow",),
        http_fault_endpoints=("results",),
        slow_seconds=20.0,
        http_fault_limit=1,
    )
    config = FakeApiConfig(port=0, processing_seconds=0.3, seed=5, faults=faults)
    async with FakeApiServer(config) as server:
        yield server


async def test_a_frozen_holder_whose_lock_is_held_keeps_its_lease_until_it_lapses(
    slow_results: FakeApiServer, tmp_path: Path, database_config: DatabaseConfig, peek: Peek
) -> None:
    tasks = 8
    setup = write_config(tmp_path, slow_results.base_url, database_config,
                         results={"lease_seconds": FROZEN_LEASE_S})  # fmt: skip
    await enqueue(setup, tasks)
    processes = [await start_daemon(setup, 0, exit_when_idle=False)]
    try:
        await logged(setup, 0, "daemon_started", 30)
        holder = instance_of(setup, 0)
        started = time.monotonic()
        # Until it holds a batch and sits in its slow download (the fake answers it in
        # 20 s): frozen there, it is certain not to have finished the batch.
        while not (held := _held_by(peek, holder)) or not slow_results.faults.injected["slow"]:
            assert time.monotonic() - started < 30, "daemon 0 never downloaded a batch"
            await asyncio.sleep(0.02)
        os.kill(processes[0].pid, signal.SIGSTOP)  # alive, but neither renews nor writes
        frozen = time.monotonic()
        # Its sessions stay open (the kernel keeps the sockets): its lock is still held.
        assert peek.query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = ?::bigint::oid AND objid = (hashtext(coalesce(current_schema(),"
            " '') || ' ' || ?)::bigint & 4294967295)::oid",
            LIVENESS_KEY,
            holder,
        ) == [(1,)]
        processes.append(await start_daemon(setup, 1))
        await logged(setup, 1, "collection_taken_over", FROZEN_LEASE_S + 30)
        taken_over_s = time.monotonic() - frozen
        print(f"\nholder frozen (SIGSTOP) with its lock held: taken over {taken_over_s:.2f} s "
              f"later (lease {FROZEN_LEASE_S:.0f} s)")  # fmt: skip
        os.kill(processes[0].pid, signal.SIGCONT)  # it finds its batch taken, and stops it
        assert await asyncio.wait_for(processes[1].wait(), 90) == 0
    finally:
        await _kill_all(processes)
    [takeover] = [
        entry
        for entry in log_events(setup, 1, "collection_taken_over")
        if entry["local_id"] == held[0]
    ]
    assert (takeover["previous_holder"], takeover["reason"]) == (holder, "lease_lapsed")
    # Not before the lease lapsed (the holder lived), nor long after it.
    assert LEAST_TAKEOVER_S <= taken_over_s <= FROZEN_LEASE_S + 10, taken_over_s
    ledger = check_invariants(peek, slow_results)
    assert_nothing_lost_or_duplicated(ledger, tasks)
