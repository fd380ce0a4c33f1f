"""A collection lease whose holder is known dead is free at once (issue 13, failover "in
seconds"); one whose holder may be alive only at its expiry, as before.

Each daemon holds a liveness lock (store/postgres/liveness.py) for its whole life; a lease
taken or renewed while its holder held that lock (`collector_lock_held`) is taken over as
soon as the lock is free. Here a holder "dies" as its session does: its store closed, or
its liveness session ended by the server (pg_terminate_backend) while the rest of the
holder lives on: the cut-off holder, whose renewal and finish must then fail harmlessly.
The whole processes, killed with -9, are tests/crash/test_collection_failover.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from batchd.config import CollectorSettings, DatabaseConfig, ResultsConfig
from batchd.domain import TaskStatus
from batchd.pipeline.collector import Collector
from batchd.store import Store, TakenBatch, open_store
from batchd.store.errors import StoreError
from batchd.store.postgres.leader import FENCE_KEY, LEADER_KEY
from batchd.store.postgres.liveness import LIVENESS_KEY, HolderLiveness
from batchd.store.postgres.migrations import LOCK_NAMESPACE
from batchd.store.postgres.writeback import PostgresWriteBackLane
from tests.support.backends import Peek
from tests.support.collector import ApiStub, line, serving
from tests.support.store import outcome, submitted_batch

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store_backend", ["postgresql"],
                                                             indirect=True)]  # fmt: skip
LONG_S = 60.0  # a lease no test waits out
SHORT_S = 1.5


@pytest.fixture
async def other(database_config: DatabaseConfig) -> AsyncIterator[Store]:
    """A second daemon's store on the same database (its own pool and liveness session)."""
    opened = await open_store(replace(database_config))
    try:
        yield opened
    finally:
        await opened.close()


def liveness_pids(peek: Peek, holder: str) -> list[int]:
    """Backends holding `holder`'s liveness lock in this test's schema (other tests' daemons
    may hold theirs on the same server meanwhile)."""
    rows = peek.query(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND mode = 'ExclusiveLock' AND classid = ?::bigint::oid AND objid = (hashtext("
        "coalesce(current_schema(), '') || ' ' || ?)::bigint & 4294967295)::oid AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY pid",
        LIVENESS_KEY,
        holder,
    )
    return [pid for (pid,) in rows]


class LivenessCut:
    """A network cut between one daemon's liveness session and the server, once `active`:
    its session is ended (as the server does once keepalives fail) and no new one can be
    made; the rest of the daemon (its pool) still reaches the server."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, peek: Peek) -> None:
        self.active = False
        self._peek = peek
        take = HolderLiveness.take

        async def cut_take(liveness: HolderLiveness) -> bool:
            if self.active:
                raise StoreError("the liveness connection is cut off (test)")
            return await take(liveness)

        monkeypatch.setattr(HolderLiveness, "take", cut_take)

    async def cut(self, holder: str) -> None:
        self.active = True
        for pid in liveness_pids(self._peek, holder):
            self._peek.query("SELECT pg_terminate_backend(?)", pid)
        await until(lambda: not liveness_pids(self._peek, holder))


async def until_async(condition: Callable[[], Awaitable[bool]], within_s: float = 15.0) -> float:
    """Seconds until `await condition()` holds (fails after `within_s`)."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within_s, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until(condition: Callable[[], bool], within_s: float = 15.0) -> float:
    """Seconds until `condition()` holds (fails after `within_s`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within_s, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def flagged(peek: Peek, local_id: int) -> list[tuple[Any, ...]]:
    return peek.query("SELECT collector, collector_lock_held FROM batches WHERE id = ?", local_id)


async def test_a_lease_whose_holder_lives_is_taken_only_at_its_expiry(
    store: Store, other: Store, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_a", "a1")
    async with other.collector_liveness("daemon-1"):
        assert await other.take_ended_batch("daemon-1", SHORT_S) is not None
        assert flagged(peek, local_id) == [("daemon-1", 1)]  # held its lock as it took
        assert await store.take_ended_batch("daemon-2", LONG_S) is None  # alive: its lease
        await asyncio.sleep(SHORT_S + 0.2)  # alive, but it stopped renewing (frozen)
        taken = await store.take_ended_batch("daemon-2", LONG_S)
    assert taken is not None
    assert (taken.batch.local_id, taken.taken_over_from, taken.holder_gone) == (
        local_id,
        "daemon-1",
        False,
    )


async def test_a_lease_whose_holder_died_is_taken_at_once_and_the_dead_cannot_finish(
    store: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_b", "b1", "b2")
    dying = await open_store(replace(database_config))
    try:
        async with dying.collector_liveness("daemon-1"):
            assert await dying.take_ended_batch("daemon-1", LONG_S) is not None
            assert await store.take_ended_batch("daemon-2", LONG_S) is None
    finally:
        await dying.close()  # every session of daemon-1 ends: as a kill -9 ends them
    # The server ends the session a moment after the socket closes: taken then, not
    # after the 60 s lease.
    found: list[TakenBatch] = []

    async def taken_by_daemon_2() -> bool:
        if (taken := await store.take_ended_batch("daemon-2", LONG_S)) is not None:
            found.append(taken)
        return bool(found)

    assert await until_async(taken_by_daemon_2, within_s=5.0) < 5.0
    [taken] = found
    assert (taken.batch.local_id, taken.taken_over_from, taken.holder_gone) == (
        local_id,
        "daemon-1",
        True,
    )
    # The new holder has no liveness lock here (a store alone): its lease is expiry-only.
    assert flagged(peek, local_id) == [("daemon-2", 0)]
    # daemon-1's leftovers (had its process lived on) are refused.
    assert not await store.renew_collection(local_id, "daemon-1", LONG_S)
    report = await store.finish_batch(local_id, "no line", matched_lines=0, holder="daemon-1")
    assert report.lease_lapsed
    assert peek.task("b1")["status"] == TaskStatus.SUBMITTED
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]


async def test_a_lease_taken_without_the_lock_is_taken_only_at_its_expiry(
    store: Store, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_c", "c1")
    # No liveness lock (its connection failed at start, or a caller of the store alone):
    # nothing proves it dead, whatever the state of the lock its name would key.
    assert await store.take_ended_batch("daemon-1", SHORT_S) is not None
    assert flagged(peek, local_id) == [("daemon-1", 0)]
    assert await store.take_ended_batch("daemon-2", LONG_S) is None
    await asyncio.sleep(SHORT_S + 0.2)
    taken = await store.take_ended_batch("daemon-2", LONG_S)
    assert taken is not None
    assert (taken.taken_over_from, taken.holder_gone) == ("daemon-1", False)


async def test_the_renewal_follows_the_holders_lock(store: Store, other: Store, peek: Peek) -> None:
    local_id = await submitted_batch(store, "msgbatch_d", "d1")
    assert await other.take_ended_batch("daemon-1", LONG_S) is not None
    assert flagged(peek, local_id) == [("daemon-1", 0)]
    async with other.collector_liveness("daemon-1"):
        assert await other.renew_collection(local_id, "daemon-1", LONG_S)
        assert flagged(peek, local_id) == [("daemon-1", 1)]  # won its lock since: flagged
        assert await store.take_ended_batch("daemon-2", LONG_S) is None
    # The lock given up with the holder still renewing (its process lives): the next
    # renewal drops the flag, and from then on only the expiry frees the lease.
    await until(lambda: not liveness_pids(peek, "daemon-1"))
    assert await other.renew_collection(local_id, "daemon-1", LONG_S)
    assert flagged(peek, local_id) == [("daemon-1", 0)]
    assert await store.take_ended_batch("daemon-2", LONG_S) is None


async def test_a_holder_cut_off_from_its_lock_loses_the_batch_and_requeues_nothing(
    store: Store, other: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The liveness session ends on the server while the holder's pool still writes: the
    lease is taken over at once, and the old holder's writes are the cut-off holder's."""
    local_id = await submitted_batch(store, "msgbatch_e", "e1", "e2")
    link = LivenessCut(monkeypatch, peek)
    with capture_logs() as logs:
        async with other.collector_liveness("daemon-1"):
            assert await other.take_ended_batch("daemon-1", LONG_S) is not None
            [pid] = liveness_pids(peek, "daemon-1")
            await link.cut("daemon-1")
            taken = await store.take_ended_batch("daemon-2", LONG_S)
            assert taken is not None
            assert (taken.taken_over_from, taken.holder_gone) == ("daemon-1", True)
            # daemon-1 lives on: it wrote a line (guarded: its own task, once) and renews.
            await other.write_results(local_id, [outcome("e1")], max_attempts=3)
            assert not await other.renew_collection(local_id, "daemon-1", LONG_S)
            refused = await other.finish_batch(
                local_id, "no line", matched_lines=1, holder="daemon-1"
            )
            assert refused.lease_lapsed
            assert refused.missing_requeued == ()
            # The link back: its lock is taken again, on a new session.
            link.active = False
            await until(lambda: liveness_pids(peek, "daemon-1") not in ([], [pid]))
    events = [entry["event"] for entry in logs]
    assert "liveness_lock_lost" in events
    assert "liveness_lock_unavailable" in events
    assert peek.task("e2")["status"] == TaskStatus.SUBMITTED  # daemon-2's to write
    await store.write_results(local_id, [outcome("e1"), outcome("e2")], max_attempts=3)
    done = await store.finish_batch(local_id, "no line", matched_lines=2, holder="daemon-2")
    assert (done.lease_lapsed, done.missing_requeued) == (False, ())
    assert peek.query("SELECT status, attempts FROM tasks ORDER BY custom_id") == [
        ("succeeded", 1),
        ("succeeded", 1),
    ]


async def test_two_daemons_racing_for_a_dead_holders_batches_take_each_once(
    store: Store, other: Store, database_config: DatabaseConfig, peek: Peek
) -> None:
    ids = [await submitted_batch(store, f"msgbatch_r{n}", f"r{n}") for n in range(6)]
    dying = await open_store(replace(database_config))
    try:
        async with dying.collector_liveness("daemon-0"):
            held: list[int] = []  # skipped as a collector skips what it is collecting
            for _ in ids:
                found = await dying.take_ended_batch("daemon-0", LONG_S, held)
                assert found is not None
                held.append(found.batch.local_id)
    finally:
        await dying.close()
    await until(lambda: not liveness_pids(peek, "daemon-0"))

    async def take_all(into: Store, holder: str) -> list[TakenBatch]:
        taken: list[TakenBatch] = []
        while found := await into.take_ended_batch(
            holder, LONG_S, [t.batch.local_id for t in taken]
        ):
            taken.append(found)
        return taken

    # Both alive for the whole race (one that ended its liveness first would be dead, and
    # its batches rightly taken over by the other).
    async with store.collector_liveness("daemon-1"), other.collector_liveness("daemon-2"):
        first, second = await asyncio.gather(
            take_all(store, "daemon-1"), take_all(other, "daemon-2")
        )
    taken_ids = [found.batch.local_id for found in first + second]
    assert sorted(taken_ids) == ids  # every batch, each by one daemon
    assert {(found.taken_over_from, found.holder_gone) for found in first + second} == {
        ("daemon-0", True)
    }


async def test_the_liveness_locks_are_a_key_space_of_their_own(
    store: Store, other: Store, peek: Peek
) -> None:
    assert len({LOCK_NAMESPACE, LEADER_KEY, FENCE_KEY, LIVENESS_KEY}) == 4
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        lead = await stack.enter_async_context(store.leadership(stop, lambda _text: None))
        await stack.enter_async_context(store.collector_liveness("daemon-1"))
        await stack.enter_async_context(other.collector_liveness("daemon-2"))
        assert await asyncio.wait_for(lead.acquired(), 10)
        # Two daemons alive and one leading: three locks, none standing for another.
        held = peek.query(
            "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND mode = 'ExclusiveLock' AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND objid::bigint IN ("
            "   hashtext(coalesce(current_schema(), ''))::bigint & 4294967295,"
            "   hashtext(coalesce(current_schema(), '') || ' daemon-1')::bigint & 4294967295,"
            "   hashtext(coalesce(current_schema(), '') || ' daemon-2')::bigint & 4294967295)"
        )
        assert sorted(classid for classid, _objid in held) == [
            LEADER_KEY,
            LIVENESS_KEY,
            LIVENESS_KEY,
        ]
        assert len({objid for _classid, objid in held}) == 3
        assert liveness_pids(peek, "daemon-1") != liveness_pids(peek, "daemon-2")
        assert lead.leading
        stop.set()


async def test_a_liveness_lock_that_another_session_holds_is_not_taken(
    store: Store, other: Store, peek: Peek
) -> None:
    """One name, two daemons (or two names whose hashes collide): the second does not
    steal the first's lock; it keeps trying, and its leases wait for their expiry."""
    local_id = await submitted_batch(store, "msgbatch_g", "g1")
    async with store.collector_liveness("daemon-1"):
        [pid] = liveness_pids(peek, "daemon-1")
        with capture_logs() as logs:
            async with other.collector_liveness("daemon-1"):
                assert liveness_pids(peek, "daemon-1") == [pid]
                assert await other.take_ended_batch("daemon-1", LONG_S) is not None
        assert "liveness_lock_busy" in [entry["event"] for entry in logs]
        # Flagged: the name's lock was held (by the first), and still is: not free.
        assert flagged(peek, local_id) == [("daemon-1", 1)]
        assert await store.take_ended_batch("daemon-2", LONG_S) is None


async def test_a_collector_cut_off_from_its_lock_stops_and_requeues_nothing(
    store: Store, other: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_postgres_collection_lease's frozen collector, cut off from its liveness lock
    instead: taken over at once (no wait for its lease), it stops at its next chunk."""
    ids = ("f1", "f2", "f3")
    local_id = await submitted_batch(store, "msgbatch_f", *ids)
    api = ApiStub()
    stage = PostgresWriteBackLane.stage_results
    link = LivenessCut(monkeypatch, peek)
    took_over: list[TakenBatch] = []

    async def cut_off_then_taken_over(
        lane: PostgresWriteBackLane, batch_id: int, outcomes: Any
    ) -> Any:
        if not took_over:
            await link.cut(collector.holder)
            found = await other.take_ended_batch("daemon-2", LONG_S)
            assert found is not None
            took_over.append(found)
            await asyncio.sleep(0.6)  # the old holder's renewal runs (every 0.4 s)
        return await stage(lane, batch_id, outcomes)

    async def results(request: web.Request) -> web.Response:
        return web.Response(body=b"\n".join(line(cid) for cid in ids) + b"\n")

    monkeypatch.setattr(PostgresWriteBackLane, "stage_results", cut_off_then_taken_over)
    async with serving(api, results), aiohttp.ClientSession() as session:
        peek.execute(
            "UPDATE batches SET results_url = ? WHERE id = ?", api.url("msgbatch_f"), local_id
        )
        client = BatchesClient(session, base_url=api.base_url, api_key="k", policy=RetryPolicy(0))
        settings = CollectorSettings(ResultsConfig(chunk_size=1, lease_s=1.2), 3)
        collector = Collector(store, client, settings, clock=lambda: datetime.now(UTC))
        with capture_logs() as logs:
            async with store.collector_liveness(collector.holder):
                assert await collector.collect_all() == 0  # not finished by the cut-off one
    [taken] = took_over
    assert (taken.taken_over_from, taken.holder_gone) == (collector.holder, True)
    assert "collection_lease_lost" in [entry["event"] for entry in logs]
    assert peek.query("SELECT state, collector FROM batches WHERE id = ?", local_id) == [
        ("ended", "daemon-2")
    ]
    # What it wrote before it knew was guarded (harmless); nothing was requeued as missing.
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]
    assert peek.query("SELECT count(*) FROM tasks WHERE status = 'pending'") == [(0,)]
