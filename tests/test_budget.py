"""The budget: its figures, the pause and its log lines, end to end against the fake API."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from batchd.cli.commands import render_status, status_snapshot
from batchd.config import BudgetConfig, BudgetSettings, Config
from batchd.domain import TaskStatus
from batchd.fakeapi.server import FakeApiServer
from batchd.money.budget import BudgetGate, budget_view, fitting_view, period_start
from batchd.money.pricing import PriceTable
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.submitter import Submitter
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.params import request_params

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


def test_only_a_task_whose_bound_alone_passes_the_whole_limit_can_never_fit() -> None:
    one = [(HAIKU, 1, 0, 400)]  # 400 output tokens at most x $5 / 1e6, halved: $0.0010
    spent = [(HAIKU, 1, 0, 200, 0, 0)]  # $0.0005
    at_the_limit = view(0.001, next_batch=one)
    assert (at_the_limit.alone_over_limit, at_the_limit.paused_reason) == (False, None)  # type: ignore[attr-defined]
    over_what_is_left = view(0.001, spent=spent, next_batch=one)
    assert over_what_is_left.paused_reason is not None  # type: ignore[attr-defined]
    assert not over_what_is_left.alone_over_limit  # type: ignore[attr-defined]
    two = view(0.0015, next_batch=[(HAIKU, 2, 0, 800)])  # each fits alone
    assert two.paused_reason is not None  # type: ignore[attr-defined]
    assert not two.alone_over_limit  # type: ignore[attr-defined]
    never = view(0.0009, next_batch=one)
    assert never.alone_over_limit  # type: ignore[attr-defined]
    # What `batchd status` says while it waits for the daemon to mark it.
    assert never.paused_reason.endswith(  # type: ignore[attr-defined]
        "; that one task alone passes the whole limit: batchd marks it invalid"
    )


async def test_the_gate_logs_each_change_once(store: Store) -> None:
    await store.enqueue([("a", request_params("hello", max_tokens=1000))])
    config = Config()
    config = replace(config, budget=BudgetConfig(0.001, "total"))
    settings = BudgetSettings.of(config)
    assert settings is not None
    gate = BudgetGate(store, settings, clock=lambda: NOW)
    with capture_logs() as logs:
        first = await gate.pause_reason()
        second = await gate.pause_reason()
    # 1000 max output tokens x $5 / 1e6 / 2 = $0.0025 > $0.001
    assert first is not None
    assert first == second
    assert [e["event"] for e in logs] == ["submission_paused_budget"]
    assert logs[0]["next_batch_max_usd"] == 0.0025  # plus ~13 input tokens, rounded away
    assert BudgetSettings.of(Config()) is None


async def test_a_tiny_budget_sends_what_fits_then_pauses(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    texts = [f"Describe product number {n} in one line" for n in range(40)]
    await store.enqueue(
        (f"t-{n}", request_params(text, max_tokens=100)) for n, text in enumerate(texts)
    )
    sizes = [len(request_params(text, max_tokens=100).encode()) for text in texts[:4]]
    await store.close()
    # A batch of 4 at its upper bound: input = bytes / 4 at $1, output 4 x 100 at $5, per
    # million tokens, halved. The budget fits one such batch; real costs (some 20 output
    # tokens each) are far lower, so smaller batches follow until not even the oldest
    # task's bound fits what is left.
    first_batch_max = (sum(sizes) / 4 * 1.0 + 400 * 5.0) / 1e6 / 2
    assert 0.00105 < first_batch_max < 0.0011
    budget = first_batch_max * 1.02
    base = daemon_config(fake_api.base_url, max_requests=4)
    # All time, not a UTC day: the daemon and the snapshot below read the real clock, and
    # a run across midnight would find the day's spending gone (periods: NEXT_PERIOD).
    config = replace(base, budget=BudgetConfig(budget, "total"))
    daemons: list[Daemon] = []

    async def started(daemon: Daemon) -> None:
        daemons.append(daemon)

    with capture_logs() as logs:
        runner = asyncio.create_task(run_daemon(config, "test-key", on_started=started))
        # Until paused with nothing in flight; a loaded machine only makes that later (the
        # loop used to give up after 400 looks, ~20 s, and go on with a batch in flight).
        async with asyncio.timeout(90):
            while True:
                await asyncio.sleep(0.05)
                created = sqlite_count(db_path, "SELECT count(*) FROM batches")
                idle = not sqlite_count(  # every batch settled: its bound no longer counted
                    db_path,
                    "SELECT count(*) FROM batches"
                    " WHERE state IN ('creating', 'in_progress', 'canceling', 'ended')",
                )
                gate = daemons[0].submitter.budget if daemons else None
                # Paused with nothing in flight, by a fresh look (not one taken mid-batch),
                # and no batch created between the looks: the gate would count one created
                # after the idle look in flight, pause for it, and the test stop it mid-way
                # (seen: 39 of 40 tasks pending or succeeded, one in flight).
                if (
                    idle
                    and gate is not None
                    and await gate.pause_reason()
                    and sqlite_count(db_path, "SELECT count(*) FROM batches") == created
                ):
                    break
        await asyncio.sleep(0.5)  # a few more submit steps: still nothing sent
        daemons[0].stop()
        assert await runner == 0
    with sqlite3.connect(db_path) as db:
        sizes_sent = [n for (n,) in db.execute("SELECT request_count FROM batches ORDER BY id")]
    db.close()
    assert sizes_sent[0] == 4
    assert len(sizes_sent) > 1
    assert min(sizes_sent) < 4  # smaller batches followed
    done = sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'succeeded'")
    pending = sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'pending'")
    assert (done + pending, done > 4, pending > 0) == (40, True, True)
    events = [e["event"] for e in logs if "budget" in e["event"]]
    assert events[-1] == "submission_paused_budget"

    reopened = await SqliteStore.open(db_path)
    try:
        snapshot = await status_snapshot(reopened, config)
    finally:
        await reopened.close()
    assert snapshot["budget"]["paused"] is True
    assert 0 < snapshot["budget"]["spent_usd"] <= budget
    # Paused because the oldest task alone would pass the budget now.
    one_task_max = snapshot["budget"]["next_batch_max_usd"]
    assert snapshot["budget"]["spent_usd"] + one_task_max > budget
    assert "submission: paused: budget" in render_status(snapshot)


def test_the_next_batch_is_cut_to_what_fits() -> None:
    asked: list[int] = []

    async def oldest(limit: int) -> list[Any]:
        asked.append(limit)
        # Each task: 400 output tokens at most, x $5 / 1e6, halved = $0.001.
        return [(HAIKU, limit, 0, 400 * limit)]

    def within(max_spend_usd: float) -> Callable[[list[Any]], Any]:
        return lambda next_batch: budget_view(
            BudgetConfig(max_spend_usd, "day"),
            PriceTable(),
            now=NOW,
            period_usage=[],
            in_flight=[],
            next_batch=next_batch,
        )

    fitted = asyncio.run(fitting_view(oldest, 8, within(0.0035)))
    assert (fitted.paused_reason, fitted.next_batch_requests) == (None, 2)
    assert asked == [8, 4, 2]
    asked.clear()
    poorer = asyncio.run(fitting_view(oldest, 8, within(0.0005)))
    assert poorer.next_batch_requests == 1
    assert "up to $0.0010 for the next batch" in (poorer.paused_reason or "")
    assert asked == [8, 4, 2, 1]


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
    sizes = await store.accounts.pending_sizes()
    assert [(model, requests) for model, requests, _, _ in sizes] == [
        (None, 1),
        ("claude-haiku-4-5", 1),
    ]


def sqlite_count(db_path: Path, sql: str) -> int:
    with sqlite3.connect(db_path) as db:
        (count,) = db.execute(sql).fetchone()
    db.close()
    return int(count)


async def submit_within(
    store: Store,
    fake_api: FakeApiServer,
    max_spend_usd: float,
    *,
    linger_s: float = 0.0,
    period: str = "total",
    now: datetime = NOW,
) -> tuple[int, bool]:
    """One submit step of a submitter whose budget is `max_spend_usd`: (requests, waiting)."""
    config = Config()
    config = replace(
        config,
        budget=BudgetConfig(max_spend_usd, period),
        batching=replace(config.batching, max_requests=8, linger_s=linger_s),
    )
    settings = BudgetSettings.of(config)
    assert settings is not None
    gate = BudgetGate(store, settings, clock=lambda: now)
    async with aiohttp.ClientSession() as session:
        client = BatchesClient(
            session, base_url=fake_api.base_url, api_key="k", policy=RetryPolicy(max_retries=0)
        )
        submitter = Submitter(
            store,
            client,
            config.batching,
            reconciler=Reconciler(store, client, config.batching, clock=lambda: now),
            monotonic=lambda: 0.0,
            budget=gate,
        )
        result = await submitter.submit_once()
    return result.requests, result.waiting


# Rows the chunker refuses, first in the queue: never priced in place of the tasks sent.
REFUSED_FIRST = {
    "bad JSON": ["{not json", "{not json"],
    "a model but no messages": [orjson.dumps({"model": HAIKU, "max_tokens": 1}).decode()],
    "no messages, a huge max_tokens": [
        orjson.dumps({"model": HAIKU, "max_tokens": 10_000_000}).decode()
    ],
    "an unknown model, streaming": [
        request_params("x", model="claude-nonexistent", stream=True, max_tokens=10)
    ],
}


@pytest.mark.parametrize("refused", REFUSED_FIRST.values(), ids=list(REFUSED_FIRST))
async def test_the_budget_prices_exactly_the_tasks_a_batch_carries(
    refused: list[str], store: Store, fake_api: FakeApiServer, db_path: Path
) -> None:
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO tasks (custom_id, params) VALUES (?, ?)",
            [(f"bad-{n}", params) for n, params in enumerate(refused)],
        )
    db.close()
    await store.enqueue(
        (f"ok-{n}", request_params(f"text {n}", max_tokens=1000, model=HAIKU)) for n in range(20)
    )
    # One task is at most 1,000 output tokens x $5 / 1e6, halved: $0.0025. $0.003 fits one.
    requests, _ = await submit_within(store, fake_api, 0.003)
    assert requests == 1
    assert sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'invalid'") == len(
        refused
    )
    assert fake_api.state.stats.submissions.keys() == {"ok-0"}


async def test_a_budget_leaves_the_linger_alone(store: Store, fake_api: FakeApiServer) -> None:
    await store.enqueue((f"ok-{n}", request_params(f"t {n}", max_tokens=10)) for n in range(3))
    # Three tasks, room for far more: the partly full batch still waits for its linger.
    assert await submit_within(store, fake_api, 1000.0, linger_s=1000.0) == (0, True)


def task_row(db_path: Path, custom_id: str) -> tuple[str, str | None]:
    with sqlite3.connect(db_path) as db:
        status, error = db.execute(
            "SELECT status, error FROM tasks WHERE custom_id = ?", (custom_id,)
        ).fetchone()
    db.close()
    return str(status), error


async def test_a_task_whose_bound_alone_passes_the_limit_is_invalid_and_the_queue_goes_on(
    store: Store, fake_api: FakeApiServer, db_path: Path
) -> None:
    # Valid JSON the chunker accepts, but at most 10^12 output tokens x $5 / 1e6, halved:
    # $2.5M, when the whole budget is $1. No spending, no period, ever admits it.
    await store.enqueue([("huge", request_params("x", max_tokens=10**12, model=HAIKU))])
    await store.enqueue(
        (f"ok-{n}", request_params(f"text {n}", max_tokens=1000, model=HAIKU)) for n in range(6)
    )
    with capture_logs() as logs:
        requests, _ = await submit_within(store, fake_api, 1.0)
    assert requests == 6  # the tasks behind it went in the same step
    assert fake_api.state.stats.submissions.keys() == {f"ok-{n}" for n in range(6)}
    status, error = task_row(db_path, "huge")
    assert status == "invalid"
    assert error is not None
    for figure in ("$2,500,000.00", "max_tokens 1,000,000,000,000", "max_spend_usd $1.00"):
        assert figure in error
    assert "batchd retry --status invalid huge" in error
    refused = [e for e in logs if e["event"] == "tasks_over_budget"]
    assert [(e["count"], e["custom_ids"], e["reason"]) for e in refused] == [(1, ["huge"], error)]
    assert not [e for e in logs if e["event"] == "submission_paused_budget"]

    # What the reason says to do works: lower max_tokens, retry, and it is sent.
    with sqlite3.connect(db_path) as db:
        db.execute(
            "UPDATE tasks SET params = ? WHERE custom_id = 'huge'",
            (request_params("x", max_tokens=1000, model=HAIKU),),
        )
    db.close()
    assert await store.retry_tasks([TaskStatus.INVALID], ["huge"]) == 1
    assert await submit_within(store, fake_api, 1.0) == (1, False)
    assert "huge" in fake_api.state.stats.submissions


# Spent today (and this month): 240k output tokens x $5 / 1e6, halved = $0.60 of $1.
SPENT_TODAY = (f"{NOW:%Y-%m-%d}", HAIKU + "-20251001", 3, 0, 240_000, 0, 0)
NEXT_PERIOD = {
    "day": datetime(2026, 11, 25, 0, 1, tzinfo=UTC),
    "month": datetime(2026, 12, 1, 0, 1, tzinfo=UTC),
    "total": datetime(2027, 6, 1, tzinfo=UTC),  # a total never starts again
}


@pytest.mark.parametrize("period", list(NEXT_PERIOD))
async def test_the_whole_limit_of_a_period_decides_what_can_never_be_sent(
    period: str, store: Store, fake_api: FakeApiServer, db_path: Path
) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO usage_ledger VALUES (?, ?, ?, ?, ?, ?, ?)", SPENT_TODAY)
    db.close()
    await store.enqueue(
        [
            ("never", request_params("a", max_tokens=10**12, model=HAIKU)),  # $2.5M
            ("over-limit", request_params("b", max_tokens=420_000, model=HAIKU)),  # $1.05
            ("over-left", request_params("c", max_tokens=200_000, model=HAIKU)),  # $0.50
        ]
    )
    await store.enqueue(
        (f"ok-{n}", request_params(f"text {n}", max_tokens=1000, model=HAIKU)) for n in range(5)
    )
    with capture_logs() as logs:
        assert await submit_within(store, fake_api, 1.0, period=period) == (0, True)
    # Over the whole $1: invalid whatever the period. Over the $0.40 left only: it waits,
    # and the tasks behind it wait with it (the budget working).
    assert task_row(db_path, "never")[0] == "invalid"
    status, error = task_row(db_path, "over-limit")
    assert (status, "may cost up to $1.05" in (error or "")) == ("invalid", True)
    assert task_row(db_path, "over-left") == ("pending", None)
    assert sqlite_count(db_path, "SELECT count(*) FROM tasks WHERE status = 'pending'") == 6
    paused = [e for e in logs if e["event"] == "submission_paused_budget"]
    assert len(paused) == 1
    assert paused[0]["spent_usd"] == 0.6
    assert "for the next batch would pass [budget] max_spend_usd $1.00" in paused[0]["reason"]
    assert not fake_api.state.stats.submissions

    sent = await submit_within(store, fake_api, 1.0, period=period, now=NEXT_PERIOD[period])
    if period == "total":
        assert sent == (0, True)  # what is left of a total never grows back: raise the limit
        assert task_row(db_path, "over-left") == ("pending", None)
    else:
        assert sent == (6, False)  # a new period: the whole $1 again
        assert fake_api.state.stats.submissions.keys() == {"over-left"} | {
            f"ok-{n}" for n in range(5)
        }


async def test_tasks_over_the_whole_limit_anywhere_in_the_queue_never_stop_the_daemon(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    never = {"never-0", "never-1", "never-2", "never-3"}
    order = ["never-0", "ok-0", "ok-1", "never-1", "never-2", "ok-2", "ok-3", "ok-4", "never-3"]
    order += [f"ok-{n}" for n in range(5, 12)]
    await store.enqueue(
        (custom_id, request_params(custom_id, max_tokens=10**9 if custom_id in never else 100))
        for custom_id in order
    )
    await store.close()
    base = daemon_config(fake_api.base_url, max_requests=4)
    config = replace(base, budget=BudgetConfig(1.0, "day"))  # one task's bound: $2,500
    with capture_logs() as logs:
        code = await asyncio.wait_for(run_daemon(config, "test-key", exit_when_idle=True), 60)
    assert code == 0
    with sqlite3.connect(db_path) as db:
        statuses = dict(db.execute("SELECT custom_id, status FROM tasks").fetchall())
    db.close()
    assert statuses == {c: "invalid" if c in never else "succeeded" for c in order}
    refused = [e["custom_ids"] for e in logs if e["event"] == "tasks_over_budget"]
    assert sorted(c for ids in refused for c in ids) == sorted(never)
    assert not [e for e in logs if e["event"] == "submission_paused_budget"]
