"""The scrape-time metrics and the status document's new parts, against a real database.

One batch is taken through its life (pending, in flight near its 24 h expiry, ended,
results stored) and at each step /metrics' database gauges and the status document are
compared with what the database says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.api.wire import MessageBatch, ProcessingStatus
from batchd.config import Config
from batchd.domain import Outcome, TaskStatus, Usage
from batchd.service.gauges import register_database_gauges
from batchd.service.metrics import Registry, batchd_registry
from batchd.service.status import status_snapshot
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.params import request_params

MODEL = "claude-haiku-4-5-20251001"


class Clock:
    """Starts at the real time (the tasks' created_at is SQLite's own clock); moved by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(db_path: Path, clock: Clock) -> AsyncIterator[Store]:
    opened = await SqliteStore.open(db_path, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


def api_batch(
    api_id: str, status: ProcessingStatus, created_at: datetime, **counts: int
) -> MessageBatch:
    ended = status == "ended"
    return {
        "id": api_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": counts.get("processing", 0),
            "succeeded": counts.get("succeeded", 0),
            "errored": counts.get("errored", 0),
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": created_at.isoformat() if ended else None,
        "created_at": created_at.isoformat(),
        "expires_at": (created_at + timedelta(hours=24)).isoformat(),
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"https://api.example/v1/messages/batches/{api_id}/results"
        if ended
        else None,
    }


def succeeded(custom_id: str, input_tokens: int, output_tokens: int) -> Outcome:
    return Outcome(
        custom_id,
        "succeeded",
        '{"type": "succeeded"}',
        None,
        retryable=False,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        model=MODEL,
    )


def samples(text: str) -> dict[str, float]:
    """Unlabelled samples (and labelled ones as name{value}) of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(sample.labels.values())
            found[f"{sample.name}{{{label}}}" if label else sample.name] = sample.value
    return found


async def scrape(target: tuple[Registry, Clock], now: datetime) -> dict[str, float]:
    registry, gauge_clock = target
    gauge_clock.now = now
    await registry.refresh()
    return samples(registry.render())


async def test_database_gauges_follow_a_batch_through_its_life(store: Store, clock: Clock) -> None:
    start = clock.now
    config = replace(Config(), budget=replace(Config().budget, max_spend_usd=5.0, period="total"))
    await store.enqueue((cid, request_params(cid)) for cid in ("a", "b", "c", "d", "e"))
    registry, gauge_clock, paused = batchd_registry(), Clock(), [False]
    register_database_gauges(registry, store, config, gauge_clock, budget_paused=lambda: paused[0])
    target = (registry, gauge_clock)

    # Nothing in flight: ages read 0, no expiry sample, nothing spent yet.
    seen = await scrape(target, start + timedelta(seconds=600))
    assert 597 <= seen["batchd_oldest_pending_task_age_seconds"] <= 605
    assert seen["batchd_oldest_in_flight_batch_age_seconds"] == 0
    assert "batchd_next_batch_expiry_seconds" not in seen
    assert seen["batchd_budget_period_spent_usd"] == 0
    assert seen["batchd_budget_max_spend_usd"] == 5
    assert seen["batchd_budget_paused"] == 0
    assert seen["batchd_tasks{pending}"] == 5

    # a, b, c go out in a batch the API created 23 hours before the scrape.
    ids = [t.id async for t in store.iter_pending() if t.custom_id in {"a", "b", "c"}]
    local_id = await store.record_intent(ids, 1000)
    assert local_id is not None
    scrape_at = start + timedelta(seconds=600)
    created = scrape_at - timedelta(hours=23)
    assert await store.mark_created(local_id, api_batch("msgbatch_w", "in_progress", created))
    seen = await scrape(target, scrape_at)
    assert seen["batchd_batches_in_flight"] == 1
    assert seen["batchd_oldest_in_flight_batch_age_seconds"] == pytest.approx(23 * 3600)
    assert seen["batchd_next_batch_expiry_seconds"] == pytest.approx(3600)
    assert 597 <= seen["batchd_oldest_pending_task_age_seconds"] <= 605  # d and e still wait
    snapshot = await status_snapshot(store, config, now=scrape_at)
    [flying] = snapshot["batches_in_flight"]
    assert (flying["age_s"], flying["expires_in_s"]) == (23 * 3600, 3600)

    # It ends: two succeeded, one errored; results stored; the batch is completed.
    await store.update_batch(
        local_id, api_batch("msgbatch_w", "ended", created, succeeded=2, errored=1)
    )
    errored = Outcome("c", "errored", '{"type": "errored"}', "errored: overloaded", False)
    await store.write_results(
        local_id, [succeeded("a", 1000, 200), succeeded("b", 3000, 400), errored], 3
    )
    await store.finish_batch(local_id, "no result line")
    paused[0] = True
    seen = await scrape(target, scrape_at)
    assert seen["batchd_batches_in_flight"] == 0
    assert "batchd_next_batch_expiry_seconds" not in seen
    assert seen["batchd_oldest_in_flight_batch_age_seconds"] == 0
    assert seen["batchd_budget_paused"] == 1
    assert (seen["batchd_tasks{succeeded}"], seen["batchd_tasks{errored}"]) == (2, 1)
    assert seen["batchd_tokens_total{input}"] == 4000
    snapshot = await status_snapshot(store, config, now=clock.now)
    assert seen["batchd_budget_period_spent_usd"] > 0
    assert round(seen["batchd_budget_period_spent_usd"], 6) == snapshot["budget"]["spent_usd"]

    # The status document: throughput counts the batch in the minute it was stored.
    throughput = snapshot["throughput"]
    assert (sum(throughput["succeeded"]), sum(throughput["failed"])) == (2, 1)
    assert (throughput["succeeded"][-1], throughput["failed"][-1]) == (2, 1)
    assert len(throughput["succeeded"]) == 60
    [error] = snapshot["latest_errors"]
    assert error["custom_id"] == "c"
    assert error["status"] == "errored"
    assert error["error"] == "errored: overloaded"
    assert error["batch_id"] == "msgbatch_w"

    # An hour and a minute later the batch has left the chart's window.
    later = await status_snapshot(store, config, now=clock.now + timedelta(minutes=61))
    assert sum(later["throughput"]["succeeded"]) == sum(later["throughput"]["failed"]) == 0


async def test_latest_errors_are_the_most_recently_finished_failures_first(
    store: Store, clock: Clock
) -> None:
    names = [f"t{i}" for i in range(8)]
    await store.enqueue((cid, request_params(cid)) for cid in names)
    pending = {t.custom_id: t.id async for t in store.iter_pending()}
    # Invalid one by one, a second apart, in an order unlike their ids.
    for offset, cid in enumerate(["t5", "t1", "t7", "t3"]):
        clock.now += timedelta(seconds=1)
        await store.mark_invalid([(pending[cid], f"bad {cid} at {offset}")])
    rows = await store.latest_failed_tasks(3)
    assert [row.custom_id for row in rows] == ["t3", "t7", "t1"]
    assert all(row.status is TaskStatus.INVALID for row in rows)
    assert rows[0].error == "bad t3 at 3"
    assert rows[0].result_json is None  # the list never carries result bodies
    assert await store.latest_failed_tasks(10) == await store.latest_failed_tasks(4)


async def test_oldest_pending_is_none_when_nothing_waits(store: Store) -> None:
    assert await store.oldest_pending_created_at() is None
    await store.enqueue([("x", request_params("x"))])
    created = await store.oldest_pending_created_at()
    assert created is not None
    assert abs((datetime.now(UTC) - created).total_seconds()) < 30
