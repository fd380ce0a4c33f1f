"""Usage and cost as `batchd status` reports them, from real result write-backs; the
missing-result check and unmatched lines, end to end through the collector."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from batchd.cli.commands import render_status, status_snapshot
from batchd.config import CollectorSettings, ResultsConfig
from batchd.domain import Outcome, TaskStatus, Usage
from batchd.pipeline.collector import Collector
from batchd.serving import AppServer
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.store import START, FakeClock, api_batch, claim, query, submitted_batch

pytestmark = pytest.mark.fake_clock  # the store runs on `clock`, at START

HAIKU = "claude-haiku-4-5-20251001"


def succeeded(custom_id: str, usage: Usage, model: str = HAIKU) -> Outcome:
    return Outcome(custom_id, "succeeded", '{"type": "succeeded"}', None, False, usage, model)


async def test_status_reports_tokens_cost_and_saving_computed_by_hand(
    store: Store, db_path: Path
) -> None:
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b", "c", "d")
    errored = Outcome("c", "errored", '{"type": "errored"}', "errored: x", False)
    report = await store.write_results(
        local_id,
        [
            succeeded("a", Usage(1000, 2000, 400, 10_000)),
            succeeded("b", Usage(3000, 0, 0, 0)),
            errored,  # not billed (spec §5)
            succeeded("d", Usage(10, 20, 0, 0), model="claude-mystery-1"),
        ],
        3,
    )
    assert report.written == 4

    usage = (await status_snapshot(store))["usage"]

    # haiku ($1 in, $5 out, $1.25 cache write, $0.10 cache read per million tokens):
    # 4000 x 1 + 2000 x 5 + 400 x 1.25 + 10000 x 0.1 = 4000 + 10000 + 500 + 1000
    # = 15500 / 1e6 = $0.0155 standard; half at batch prices.
    assert usage["standard_cost_usd"] == pytest.approx(0.0155)
    assert usage["cost_usd"] == pytest.approx(0.00775)
    assert usage["saving_usd"] == pytest.approx(0.00775)
    # Tokens include the unpriced model's; its cost is not guessed.
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (3, 4010, 2020)
    assert (usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (400, 10_000)
    assert usage["unpriced_models"] == ["claude-mystery-1"]
    mystery = next(m for m in usage["models"] if m["model"] == "claude-mystery-1")
    assert (mystery["cost_usd"], mystery["input_tokens"]) == (None, 10)
    text = render_status(await status_snapshot(store))
    assert "; $0.0155 at standard API prices; saved $0.0077" in text  # 0.00775: 4 places
    assert "UNPRICED: claude-mystery-1: 1 result(s), 10 input, 20 output tokens" in text


async def test_spending_survives_deleted_and_retried_tasks(store: Store, db_path: Path) -> None:
    local_id = await submitted_batch(store, "msgbatch_1", "a", "b")
    await store.write_results(
        local_id, [succeeded("a", Usage(100, 10)), succeeded("b", Usage(100, 10))], 3
    )
    with sqlite3.connect(db_path) as conn:  # a user cleaning up their table by hand
        conn.execute("DELETE FROM tasks WHERE custom_id = 'b'")
    conn.close()
    # A succeeded task retried and answered again was paid for twice.
    assert await store.retry_tasks([TaskStatus.SUCCEEDED], ["a"]) == 1
    assert query(db_path, "SELECT requests, input_tokens FROM usage_ledger") == [(2, 200)]
    second = await claim(store, "a")
    assert await store.mark_created(second, api_batch("msgbatch_2", "ended"))
    await store.write_results(second, [succeeded("a", Usage(100, 10))], 3)
    assert query(
        db_path, "SELECT day, model, requests, input_tokens, output_tokens FROM usage_ledger"
    ) == [(f"{START:%Y-%m-%d}", HAIKU, 3, 300, 30)]


async def test_the_ledger_is_backfilled_from_results_of_an_older_schema(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    try:
        local_id = await submitted_batch(store, "msgbatch_1", "a")
        await store.write_results(local_id, [succeeded("a", Usage(7, 3))], 3)
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:  # back to schema v2
        conn.execute("DROP TRIGGER tasks_usage_ledger")
        conn.execute("DROP TABLE usage_ledger")
        conn.execute("DROP TABLE missing_results")
        # v5 altered missing_results, dropped here with it (v4's column on batches stays).
        conn.execute("DELETE FROM schema_migrations WHERE version IN (3, 5)")
    conn.close()
    upgraded = await SqliteStore.open(db_path)
    try:
        usage = (await status_snapshot(upgraded))["usage"]
    finally:
        await upgraded.close()
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (1, 7, 3)


async def test_a_batch_near_archival_with_results_not_stored_is_flagged(
    store: Store, clock: FakeClock
) -> None:
    await submitted_batch(store, "msgbatch_old", "a")  # ended, results not written
    created = START.replace(microsecond=500000) + timedelta(seconds=1)  # api_batch()'s
    assert (await status_snapshot(store, now=created + timedelta(days=26)))["retention"] == []
    snapshot = await status_snapshot(store, now=created + timedelta(days=27, hours=12))
    [warning] = snapshot["retention"]
    assert (warning["batch_id"], warning["age_days"], warning["archived_in_days"]) == (
        "msgbatch_old",
        27.5,
        1.5,
    )
    assert "RESULTS NEAR ARCHIVAL: msgbatch_old (ended) was created 27.5 days ago" in (
        render_status(snapshot)
    )


# -- the missing-result check, through the collector and a results server -------------------


@dataclass
class ResultsRig:
    """A batch ended on the API whose results a loopback server answers, and a collector."""

    store: Store
    db_path: Path
    clock: FakeClock
    base_url: str
    bodies: dict[str, bytes]  # the JSONL each results URL answers

    async def batch(self, jsonl: bytes, *custom_ids: str) -> None:
        """Batch msgbatch_1 of `custom_ids`, ended, whose results stream is `jsonl`."""
        local_id = await submitted_batch(self.store, "msgbatch_1", *custom_ids)
        self.bodies["msgbatch_1"] = jsonl
        url = f"{self.base_url}/results/msgbatch_1"
        with sqlite3.connect(self.db_path) as conn:
            conn.execute("UPDATE batches SET results_url = ? WHERE id = ?", (url, local_id))
        conn.close()

    async def collect(self) -> int:
        """One collector pass; how many batches it finished."""
        async with aiohttp.ClientSession() as session:
            client = BatchesClient(
                session, base_url=self.base_url, api_key="k", policy=RetryPolicy(0)
            )
            settings = CollectorSettings(ResultsConfig(), 3)
            collector = Collector(self.store, client, settings, clock=self.clock)
            return await collector.collect_all()


@pytest.fixture
async def results(store: Store, db_path: Path, clock: FakeClock) -> AsyncIterator[ResultsRig]:
    """A loopback server answering each results URL with the JSONL a test gives `batch`."""
    bodies: dict[str, bytes] = {}

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.match_info["name"]])

    app = web.Application()
    app.router.add_get("/results/{name}", answer)
    served = AppServer(app, "127.0.0.1", 0, shutdown_timeout_s=1.0)
    port = await served.start()
    try:
        yield ResultsRig(store, db_path, clock, f"http://127.0.0.1:{port}", bodies)
    finally:
        await served.stop()


def line(custom_id: str) -> bytes:
    message = {"model": HAIKU, "content": [], "usage": {"input_tokens": 5, "output_tokens": 2}}
    result = {"type": "succeeded", "message": message}
    return orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"


async def test_a_whole_stream_without_some_requests_requeues_and_reports_them(
    store: Store, db_path: Path, results: ResultsRig
) -> None:
    # As many lines as requests, but "a" twice and "zz" (no such task) instead of c and d.
    await results.batch(line("a") + line("b") + line("a") + line("zz"), "a", "b", "c", "d")

    with capture_logs() as logs:
        assert await results.collect() == 1

    statuses = dict(query(db_path, "SELECT custom_id, status FROM tasks"))
    assert statuses == {"a": "succeeded", "b": "succeeded", "c": "pending", "d": "pending"}
    missing = [e for e in logs if e["event"] == "results_missing"]
    assert [(e["count"], e["first"]) for e in missing] == [(2, "c")]
    assert [e["first"] for e in logs if e["event"] == "results_unmatched"] == ["zz"]
    assert query(db_path, "SELECT custom_id FROM unmatched_results") == [("zz",)]
    assert query(db_path, "SELECT api_batch_id, custom_id FROM missing_results") == [
        ("msgbatch_1", "c"),
        ("msgbatch_1", "d"),
    ]
    snapshot = await status_snapshot(store)
    assert snapshot["results"] == {"unmatched": 1, "missing_requeued": 2, "archived_requeued": 0}
    text = render_status(snapshot)
    assert "UNMATCHED RESULTS: 1 result line(s)" in text
    assert "MISSING RESULTS: 2 request(s) had no line in a whole results stream" in text


async def test_a_short_stream_is_downloaded_again_never_requeued(
    store: Store, db_path: Path, results: ResultsRig
) -> None:
    await results.batch(line("a") + line("b"), "a", "b", "c")  # one line short: a cut-off

    assert await results.collect() == 0

    assert dict(query(db_path, "SELECT custom_id, status FROM tasks"))["c"] == "submitted"
    assert query(db_path, "SELECT state, download_attempts FROM batches") == [("ended", 1)]
    assert (await status_snapshot(store))["results"] == {
        "unmatched": 0,
        "missing_requeued": 0,
        "archived_requeued": 0,
    }
