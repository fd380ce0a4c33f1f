"""Collecting and polling shared by several daemons on one PostgreSQL database, at the
store: one holder per ended batch while its lease lives, a lapsed lease taken over, and a
lapsed holder's finish refused (it must not requeue as missing what the new holder
writes); a poll claimed by one daemon is skipped by the others for an interval.

Two holders on one store stand for two daemons: the lease is in the row, not in a
connection; two daemons also race through two stores (`test_a_batch_is_taken_by_one`)."""

from __future__ import annotations

import asyncio
import time
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
from batchd.store.postgres.writeback import PostgresWriteBackLane
from tests.support.backends import Peek
from tests.support.collector import ApiStub, line, serving
from tests.support.store import add_tasks, api_batch, claim, outcome, submitted_batch

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store_backend", ["postgresql"],
                                                             indirect=True)]  # fmt: skip
SHORT_S = 1.0


async def test_a_batch_under_a_live_lease_is_nobody_elses(store: Store) -> None:
    local_id = await submitted_batch(store, "msgbatch_a", "a1")
    assert await store.take_ended_batch("daemon-1", 30.0) is not None
    assert await store.take_ended_batch("daemon-2", 30.0) is None
    assert await store.take_ended_batch("daemon-1", 30.0) is not None  # its own: held on
    assert await store.take_ended_batch("daemon-2", 30.0) is None
    assert not await store.renew_collection(local_id, "daemon-2", 30.0)
    await store.give_back_collection(local_id, "daemon-2")  # not its lease: left alone
    assert await store.take_ended_batch("daemon-2", 30.0) is None
    await store.give_back_collection(local_id, "daemon-1")
    taken = await store.take_ended_batch("daemon-2", 30.0)
    assert taken is not None
    assert taken.taken_over_from is None


async def test_a_lapsed_lease_is_taken_over_and_the_old_holder_can_neither_renew_nor_finish(
    store: Store, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_b", "b1", "b2")
    assert await store.take_ended_batch("daemon-1", SHORT_S) is not None
    await asyncio.sleep(SHORT_S + 0.2)  # daemon-1 stopped renewing (killed, cut off)
    taken = await store.take_ended_batch("daemon-2", 30.0)
    assert taken is not None
    assert (taken.batch.local_id, taken.taken_over_from) == (local_id, "daemon-1")
    assert not await store.renew_collection(local_id, "daemon-1", 30.0)
    # daemon-2 is writing; daemon-1 wrote what it had (guarded: harmless) and tries to
    # finish: refused, so b2 (whose line daemon-2 is about to write) is not requeued.
    await store.write_results(local_id, [outcome("b1")], max_attempts=3)
    refused = await store.finish_batch(local_id, "no line", matched_lines=1, holder="daemon-1")
    assert refused.lease_lapsed
    assert refused.missing_requeued == ()
    assert peek.query("SELECT state, collector FROM batches WHERE id = ?", local_id) == [
        ("ended", "daemon-2")
    ]
    assert peek.task("b2")["status"] == TaskStatus.SUBMITTED
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]
    await store.write_results(local_id, [outcome("b2")], max_attempts=3)
    done = await store.finish_batch(local_id, "no line", matched_lines=2, holder="daemon-2")
    assert (done.lease_lapsed, done.missing_requeued) == (False, ())
    assert peek.query("SELECT status FROM tasks ORDER BY custom_id") == [
        ("succeeded",),
        ("succeeded",),
    ]


async def test_a_lapsed_lease_nobody_took_still_refuses_the_finish(
    store: Store, peek: Peek
) -> None:
    local_id = await submitted_batch(store, "msgbatch_c", "c1")
    assert await store.take_ended_batch("daemon-1", SHORT_S) is not None
    await asyncio.sleep(SHORT_S + 0.2)
    report = await store.finish_batch(local_id, "no line", holder="daemon-1")
    assert report.lease_lapsed
    assert peek.task("c1")["status"] == TaskStatus.SUBMITTED
    # Renewed before anyone took it: held again, and the finish goes through.
    assert await store.renew_collection(local_id, "daemon-1", 30.0)
    assert not (await store.finish_batch(local_id, "no line", holder="daemon-1")).lease_lapsed
    assert peek.query("SELECT state FROM batches WHERE id = ?", local_id) == [("completed",)]


async def test_a_batch_is_taken_by_one_of_two_daemons_racing_for_it(
    store: Store, database_config: DatabaseConfig
) -> None:
    for n in range(6):
        await submitted_batch(store, f"msgbatch_r{n}", f"r{n}")
    other = await open_store(replace(database_config))
    try:

        async def take_all(into: Store, holder: str) -> list[int]:
            taken: list[int] = []  # skipped as a collector skips what it is collecting
            while found := await into.take_ended_batch(holder, 30.0, taken):
                taken.append(found.batch.local_id)
            return taken

        first, second = await asyncio.gather(
            take_all(store, "daemon-1"), take_all(other, "daemon-2")
        )
    finally:
        await other.close()
    assert sorted(first + second) == sorted(set(first + second))  # nobody's twice
    assert len(first + second) == 6


async def test_a_claimed_poll_is_skipped_by_every_daemon_until_its_interval_passed(
    store: Store,
) -> None:
    await add_tasks(store, "p1", "p2")
    ids = []
    for n in (1, 2):
        local_id = await claim(store, f"p{n}")
        assert await store.mark_created(local_id, api_batch(f"msgbatch_p{n}"))
        ids.append(local_id)
    first = await store.batches_due_for_poll(SHORT_S)
    assert [batch.local_id for batch in first] == ids
    assert await store.batches_due_for_poll(SHORT_S) == []  # another daemon's next cycle
    await asyncio.sleep(SHORT_S + 0.1)
    assert [batch.local_id for batch in await store.batches_due_for_poll(SHORT_S)] == ids


async def test_a_collector_frozen_past_its_lease_stops_and_requeues_nothing(
    store: Store, peek: Peek, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = ("f1", "f2", "f3")
    local_id = await submitted_batch(store, "msgbatch_f", *ids)
    api = ApiStub()
    stage = PostgresWriteBackLane.stage_results
    took_over: list[TakenBatch] = []

    async def frozen_then_taken_over(
        lane: PostgresWriteBackLane, batch_id: int, outcomes: Any
    ) -> Any:
        # The whole process frozen (SIGSTOP, swap) past the lease, and another daemon takes
        # the batch meanwhile. A renewal sent just before the freeze may reach a loaded
        # server late and extend the lease (harmless: nobody had taken it), so freeze again
        # until the take succeeds.
        for _ in range(10):
            if took_over:
                break
            time.sleep(SHORT_S + 0.3)
            if found := await store.take_ended_batch("daemon-2", 30.0):
                took_over.append(found)
        return await stage(lane, batch_id, outcomes)

    async def results(request: web.Request) -> web.Response:
        return web.Response(body=b"\n".join(line(cid) for cid in ids) + b"\n")

    monkeypatch.setattr(PostgresWriteBackLane, "stage_results", frozen_then_taken_over)
    async with serving(api, results), aiohttp.ClientSession() as session:
        peek.execute(
            "UPDATE batches SET results_url = ? WHERE id = ?", api.url("msgbatch_f"), local_id
        )
        client = BatchesClient(session, base_url=api.base_url, api_key="k", policy=RetryPolicy(0))
        settings = CollectorSettings(ResultsConfig(chunk_size=1, lease_s=SHORT_S), 3)
        collector = Collector(store, client, settings, clock=lambda: datetime.now(UTC))
        with capture_logs() as logs:
            assert await collector.collect_all() == 0  # not finished by the frozen one
    [taken] = took_over
    assert taken.taken_over_from == collector.holder
    assert "collection_lease_lost" in [entry["event"] for entry in logs]
    assert peek.query("SELECT state, collector FROM batches WHERE id = ?", local_id) == [
        ("ended", "daemon-2")
    ]
    # What it wrote before it knew was guarded (harmless); nothing was requeued as missing.
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]
    assert peek.query("SELECT count(*) FROM tasks WHERE status = 'pending'") == [(0,)]
