"""kill -9 at named points and at random moments, restart, and nothing is lost or paid twice.

Each scenario runs `batchd run` as a real process against the fake API (served by this
test's event loop, so it outlives every daemon), kills it again and again, lets a last
run finish, then checks the invariants of tests/support/crash_harness.py. Each runs on
both stores (a SQLite file; a PostgreSQL database, a schema of the test's own).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batchd.config import DatabaseConfig
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from tests.support.backends import Peek
from tests.support.crash_harness import (
    RunLog,
    assert_nothing_lost_or_duplicated,
    candidate_harvests,
    check_invariants,
    enqueue,
    run_daemon,
    write_config,
)

TASKS = 80  # 20 batches of 4, each written back in 2 chunks of 2 lines
RANDOM_KILL_TASKS = 240
pytestmark = pytest.mark.both_stores

# In order: each point is reachable from the state the previous kills leave behind
# (e.g. `reconcile_matched` needs the batch a `create_returned` kill left unrecorded).
# `store_commit:N` dies inside the N-th write transaction of the run, before COMMIT.
KILL_POINTS = (
    "chunk_built:1",
    "intent_recorded:1",  # the intent is committed, the create never sent
    "create_returned:1",  # the batch exists on the API, its id is not recorded
    "reconcile_matched:1",  # ...and the restart dies again while adopting it
    "batch_recorded:1",
    "poll_retrieved:2",
    "result_line_read:3",  # mid-stream, before the first chunk is written
    "results_chunk_written:1",  # after chunk 1 of a batch, before chunk 2
    "results_streamed:1",  # every line written, the batch not yet finished
    "batch_finished:1",
    "store_commit:3",
    "store_commit:8",
    "store_commit:15",
    "store_commit:24",
    "create_returned:2",
    "results_chunk_written:3",
)
# What a point needs of the run that meets it. How far each killed run got before its
# point is timing: each run submits, polls and collects at once (and a `store_commit:N`
# kill counts every write transaction, collection's included), so the earlier kills may
# have left nothing to submit or collect (CI met `create_returned:2` with nothing
# pending on PostgreSQL). So before each point the queue is topped up, as users would
# insert, to a chunk more than the work on the way to the point: every point is then
# reached from the pending tasks alone, whatever the earlier runs did.
CHUNK = 4  # write_config's max_requests: a batch of CHUNK tasks has CHUNK result lines
CHUNKS_PER_BATCH = 2  # write_config's results chunk_size of 2 lines
# Write transactions a batch costs at least: its intent, then its recorded create.
COMMITS_PER_BATCH = 2


def batches_before(point: str) -> int:
    """Batches whose work meets `point` (`name:n`) at least n times."""
    name, nth = point.split(":")
    n = int(nth)
    per_batch = {
        "chunk_built": 1,
        "intent_recorded": 1,
        "create_returned": 1,
        "batch_recorded": 1,
        "poll_retrieved": 1,  # each created batch is retrieved at least once to see it end
        "result_line_read": CHUNK,
        "results_chunk_written": CHUNKS_PER_BATCH,
        "results_streamed": 1,
        "batch_finished": 1,
        "store_commit": COMMITS_PER_BATCH,
    }
    if name == "reconcile_matched":
        return 0  # needs the batch `create_returned` left unrecorded, not a pending task
    return -(-n // per_batch[name])


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=0.3, seed=7)) as server:
        yield server


async def test_kill_at_every_named_point_then_restart_loses_and_duplicates_nothing(
    fake: FakeApiServer, tmp_path: Path, database_config: DatabaseConfig, peek: Peek
) -> None:
    setup = write_config(tmp_path, fake.base_url, database_config)
    await enqueue(setup, TASKS)
    enqueued = TASKS
    log = RunLog()

    for point in KILL_POINTS:
        pending = peek.query("SELECT count(*) FROM tasks WHERE status = 'pending'")[0][0]
        if (batches := batches_before(point)) and pending < (needed := CHUNK * (batches + 1)):
            print(f"before {point}: {pending} pending, {needed} enqueued")
            await enqueue(setup, needed, first=enqueued)
            enqueued += needed
        run = await run_daemon(setup, log, crash_at=point)
        statuses = peek.query("SELECT status, count(*) FROM tasks GROUP BY status")
        assert run.killed, (point, run.returncode, statuses, run.stderr[-2000:])
        assert run.crash_point == point, run.stderr[-2000:]
    final = await run_daemon(setup, log)
    assert final.returncode == 0, final.stderr[-2000:]

    ledger = check_invariants(peek, fake)
    assert_nothing_lost_or_duplicated(ledger, enqueued)
    assert log.kills == len(KILL_POINTS)
    # The fake saw every task at least once and no task more often than recorded.
    assert ledger.submissions >= TASKS
    print(f"\nnamed kill points: {len(log.points)} kinds, {log.kills} kills; {ledger}")


async def test_kills_at_random_moments_with_faults_lose_and_duplicate_nothing(
    tmp_path: Path, database_config: DatabaseConfig, peek: Peek
) -> None:
    # Retryable per-request errors and lost create answers make the restarts meet
    # requeues and reconciliation too.
    faults = FaultConfig(
        error_rate=0.15,
        retryable_error_share=1.0,
        http_fault_rate=0.15,
        http_fault_kinds=("commit_drop", "500", "drop"),
        http_fault_endpoints=("create", "retrieve", "results"),
    )
    config = FakeApiConfig(port=0, processing_seconds=0.3, seed=11, faults=faults)
    rng = random.Random(20240611)
    async with FakeApiServer(config) as server:
        setup = write_config(tmp_path, server.base_url, database_config)
        await enqueue(setup, RANDOM_KILL_TASKS)
        log = RunLog()
        for _ in range(8):
            await run_daemon(setup, log, kill_after_s=rng.uniform(0.5, 1.6))
        server.faults.config = FaultConfig(error_rate=0.15, retryable_error_share=1.0)
        final = await run_daemon(setup, log, timeout_s=40)
        assert final.returncode == 0, final.stderr[-2000:]
        ledger = check_invariants(peek, server)
    assert_nothing_lost_or_duplicated(ledger, RANDOM_KILL_TASKS)
    assert log.kills >= 6  # most runs were still busy when killed
    print(f"\nrandom kills: {log.kills}; faults {dict(server.faults.injected)}; {ledger}")


# Inside the harvest's transitions (docs/design.md, "Harvesting candidate batches"), in the
# order a late batch meets them: found on the list, not yet recorded; its first range of
# lines applied, not committed; that range committed; a batch's finish (its settle of the
# intent) not committed.
HARVEST_KILL_POINTS = (
    "candidate_found:1",
    "harvest_range_applied:1",
    "harvest_chunk_written:1",
    "batch_completed:1",
)
HARVEST_TASKS = 4


async def test_kills_inside_the_harvest_of_a_late_batch_lose_nothing_and_account_for_every_payment(
    tmp_path: Path, database_config: DatabaseConfig, peek: Peek
) -> None:
    # The first create is committed and its answer dropped; the list shows batches only
    # 8 s after their creation, past the 5 s grace, so the intent is released and sent
    # again; the first batch is found late by the watch, and harvested.
    faults = FaultConfig(
        http_fault_rate=1.0,
        http_fault_kinds=("commit_drop",),
        http_fault_endpoints=("create",),
        http_fault_limit=1,
        list_lag_seconds=8.0,
    )
    config = FakeApiConfig(port=0, processing_seconds=8.0, seed=5, faults=faults)
    async with FakeApiServer(config) as server:
        setup = write_config(
            tmp_path, server.base_url, database_config, batching={"duplicate_watch_seconds": 30.0}
        )
        await enqueue(setup, HARVEST_TASKS)
        log = RunLog()
        for point in HARVEST_KILL_POINTS:
            run = await run_daemon(setup, log, crash_at=point, timeout_s=40)
            assert run.killed, (point, run.returncode, run.stderr[-2000:])
            assert run.crash_point == point, run.stderr[-2000:]
        final = await run_daemon(setup, log, timeout_s=60)
        assert final.returncode == 0, final.stderr[-2000:]
        ledger = check_invariants(peek, server)
        harvests = candidate_harvests(peek)

    assert ledger.tasks == HARVEST_TASKS
    assert ledger.not_final == []
    assert ledger.wrong_results == []
    assert ledger.unaccounted_submissions == {}  # attempts plus the recorded duplicate
    assert ledger.unsettled_batches == []
    assert ledger.unmatched_results == 0
    assert ledger.duplicate_batches == 1
    assert harvests == [("completed", "ours")]
    assert ledger.submissions == 2 * HARVEST_TASKS  # the late batch and the resubmission
    assert ledger.recorded == ledger.billed  # both batches paid, each line counted once
    print(f"\nharvest kill points: {log.kills} kills; {ledger}")
