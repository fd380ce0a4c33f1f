"""The budget: its figures, the pause and its log lines, end to end against the fake API."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from batchd.budget import BudgetGate, budget_view, period_start
from batchd.commands import render_status, status_snapshot
from batchd.config import BudgetConfig, Config
from batchd.daemon import Daemon, run_daemon
from batchd.fakeapi.server import FakeApiServer
from batchd.pricing import PriceTable
from batchd.store import Store, StoreAccounts
from tests.conftest import request_params

NOW = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)
HAIKU = "claude-haiku-4-5"


def test_period_starts_are_utc_days() -> None:
    assert period_start("day", NOW) == "2026-11-24"
    assert period_start("month", NOW) == "2026-11-01"
    assert period_start("total", NOW) is None


def view(limit: float, **rows: object) -> object:
    return budget_view(
        BudgetConfig(limit, "month"),
        PriceTable(),
        now=NOW,
        period_usage=rows.get("spent", []),  # type: ignore[arg-type]
        in_flight=rows.get("in_flight", []),  # type: ignore[arg-type]
        next_batch=rows.get("next_batch", []),  # type: ignore[arg-type]
    )


def test_the_next_batch_is_held_back_once_it_could_pass_the_limit() -> None:
    # spent: 100k input x $1 + 20k output x $5 = $0.20 standard, $0.10 batch
    spent = [(HAIKU + "-20251001", 10, 100_000, 20_000, 0, 0)]
    # in flight: 40,000 bytes / 4 = 10k input ($0.01) + 10k max output ($0.05) = $0.06 -> $0.03
    in_flight = [(HAIKU, 10, 40_000, 10_000)]
    # next: 4,000 bytes / 4 = 1k input ($0.001) + 2k max output ($0.01) = $0.011 -> $0.0055
    next_batch = [(HAIKU, 5, 4_000, 2_000)]
    fits = view(0.1355, spent=spent, in_flight=in_flight, next_batch=next_batch)
    assert fits.spent_usd == pytest.approx(0.10)  # type: ignore[attr-defined]
    assert fits.in_flight_max_usd == pytest.approx(0.03)  # type: ignore[attr-defined]
    assert fits.next_batch_max_usd == pytest.approx(0.0055)  # type: ignore[attr-defined]
    assert fits.paused_reason is None  # type: ignore[attr-defined]  # exactly at the limit
    over = view(0.135, spent=spent, in_flight=in_flight, next_batch=next_batch)
    assert over.paused_reason == (  # type: ignore[attr-defined]
        "$0.1000 spent this month (UTC) + up to $0.0300 in flight + up to $0.0055 for the "
        "next batch would pass [budget] max_spend_usd $0.1350"
    )
    assert view(0.01, spent=spent).paused_reason is None  # type: ignore[attr-defined]


def test_work_that_cannot_be_priced_is_held_back() -> None:
    held = view(100.0, next_batch=[("claude-new-9", 1, 40, 10)])
    assert "no price for model claude-new-9" in held.paused_reason  # type: ignore[attr-defined,operator]
    # Params without a model are refused by the chunker, never sent: nothing to price.
    assert view(100.0, next_batch=[(None, 3, 40, 0)]).paused_reason is None  # type: ignore[attr-defined]


async def test_the_gate_logs_each_change_once(store: Store) -> None:
    await store.enqueue([("a", request_params("hello", max_tokens=1000))])
    config = Config()
    config = replace(config, budget=BudgetConfig(0.001, "total"))
    gate = BudgetGate.from_config(store, config, clock=lambda: NOW)
    assert gate is not None
    with capture_logs() as logs:
        first = await gate.pause_reason()
        second = await gate.pause_reason()
    # 1000 max output tokens x $5 / 1e6 / 2 = $0.0025 > $0.001
    assert first is not None
    assert first == second
    assert [e["event"] for e in logs] == ["submission_paused_budget"]
    assert logs[0]["next_batch_max_usd"] == 0.0025  # plus ~13 input tokens, rounded away
    assert BudgetGate.from_config(store, Config(), clock=lambda: NOW) is None


async def test_a_tiny_budget_pauses_submission_after_the_first_batch(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    texts = [f"Describe product number {n} in one line" for n in range(12)]
    await store.enqueue(
        (f"t-{n}", request_params(text, max_tokens=100)) for n, text in enumerate(texts)
    )
    sizes = [len(request_params(text, max_tokens=100).encode()) for text in texts[:4]]
    await store.close()
    # The first batch (4 tasks) at its upper bound: input = bytes / 4 at $1, output 4 x 100
    # at $5, per million tokens, halved. The budget fits one such batch, not two; nor, once
    # it is back, its real cost (some 20 output tokens each) plus the next one.
    first_batch_max = (sum(sizes) / 4 * 1.0 + 400 * 5.0) / 1e6 / 2
    assert 0.00105 < first_batch_max < 0.0011
    base = daemon_config(fake_api.base_url, max_requests=4)
    config = replace(base, budget=BudgetConfig(first_batch_max * 1.02, "day"))

    paused = asyncio.Event()
    daemons: list[Daemon] = []

    async def started(daemon: Daemon) -> None:
        daemons.append(daemon)

    with capture_logs() as logs:
        runner = asyncio.create_task(run_daemon(config, "test-key", on_started=started))
        for _ in range(200):  # the first batch comes back; the second never goes
            await asyncio.sleep(0.05)
            done = sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'succeeded'")
            if done == 4 and daemons[0].submitter.budget.paused_reason:  # type: ignore[union-attr]
                paused.set()
                break
        await asyncio.sleep(0.5)  # a few more submit steps: still nothing sent
        daemons[0].stop()
        assert await runner == 0
    assert paused.is_set()
    assert sqlite_count(db_path, "SELECT count(*) FROM batches") == 1
    assert sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'pending'") == 8
    events = [e["event"] for e in logs if "budget" in e["event"]]
    assert events[0] == "submission_paused_budget"
    assert "submission_resumed_budget" not in events  # actual cost + next batch still too much

    reopened = await Store.open(db_path)
    try:
        snapshot = await status_snapshot(reopened, config)
    finally:
        await reopened.close()
    assert snapshot["budget"]["paused"] is True
    # Spent: what the 4 results really cost, far less than their upper bound.
    assert 0 < snapshot["budget"]["spent_usd"] < first_batch_max / 2
    assert "submission: paused: budget" in render_status(snapshot)


def sqlite_count(path: Path, sql: str) -> int:
    with sqlite3.connect(path, timeout=5) as conn:
        (count,) = conn.execute(sql).fetchone()
    conn.close()
    return int(count)


async def test_a_row_the_chunker_will_refuse_is_not_priced(store: Store, db_path: Path) -> None:
    # An unknown model would pause the budget; but the API would refuse this custom_id,
    # so the chunker marks it invalid: it must not hold up the tasks behind it.
    with sqlite3.connect(db_path) as db:
        db.execute(
            "INSERT INTO tasks (custom_id, params) VALUES ('bad id', ?), ('fine-1', ?)",
            (
                request_params("x", model="claude-nonexistent-1"),
                request_params("y", model="claude-haiku-4-5"),
            ),
        )
    db.close()
    sizes = await StoreAccounts(store).pending_sizes()
    assert [(model, requests) for model, requests, _, _ in sizes] == [
        (None, 1),
        ("claude-haiku-4-5", 1),
    ]
