"""The scrape-time metrics: read from the database when /metrics is asked, never cached.

Each read walks an index for a few rows (tasks by status, batches by state) or the small
usage ledger; none scans finished tasks, so a scrape costs the same after a year.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from batchd.config import Config
from batchd.domain import IN_FLIGHT_BATCH_STATES
from batchd.money.budget import period_start
from batchd.money.pricing import PriceTable, TokenCounts, price_usage
from batchd.service.metrics import (
    BATCHES_IN_FLIGHT,
    BUDGET_LIMIT,
    BUDGET_PAUSED,
    BUDGET_SPENT,
    CANDIDATE_BATCHES,
    FOREIGN_BATCHES,
    NEXT_EXPIRY,
    OLDEST_BATCH_AGE,
    OLDEST_PENDING_AGE,
    TASKS,
    TOKEN_KINDS,
    TOKENS,
    Registry,
    harvest_state,
)
from batchd.service.status import batch_created_at, expires_in_s
from batchd.store import Store

Clock = Callable[[], datetime]


def register_database_gauges(
    registry: Registry,
    store: Store,
    config: Config,
    clock: Clock,
    *,
    budget_paused: Callable[[], bool] | None = None,
) -> None:
    """Fill batchd's scrape-time metrics from `store`; `budget_paused` is the daemon's gate."""
    accounts = store.accounts
    prices = PriceTable(config.pricing.models)

    async def task_counts() -> dict[str, float]:
        return {str(status): count for status, count in (await store.status_counts()).items()}

    async def in_flight() -> float:
        return len(await store.batches_in(*IN_FLIGHT_BATCH_STATES))

    async def tokens() -> dict[str, float]:
        totals = [0, 0, 0, 0]
        for _, _, *by_kind in await accounts.usage_by_model():
            totals = [total + (value or 0) for total, value in zip(totals, by_kind, strict=True)]
        return dict(zip(TOKEN_KINDS, map(float, totals), strict=True))

    async def oldest_pending_age() -> float:
        created = await store.oldest_pending_created_at()
        return 0.0 if created is None else max(0.0, (clock() - created).total_seconds())

    async def oldest_batch_age() -> float:
        batches = await store.batches_in(*IN_FLIGHT_BATCH_STATES)
        now = clock()
        return max(((now - batch_created_at(b)).total_seconds() for b in batches), default=0.0)

    async def next_expiry() -> float | None:
        now = clock()
        batches = await store.batches_in(*IN_FLIGHT_BATCH_STATES)
        remaining = [s for b in batches if (s := expires_in_s(b, now)) is not None]
        return min(remaining, default=None)

    async def budget_spent() -> float:
        since = period_start(config.budget.period, clock())
        rows = await accounts.usage_by_model(since)
        return price_usage(((row[0], TokenCounts(*row[1:])) for row in rows), prices).cost_usd

    async def budget_limit() -> float | None:
        return config.budget.max_spend_usd

    async def paused() -> float:
        return 1.0 if budget_paused is not None and budget_paused() else 0.0

    registry.set_callback(TASKS, task_counts)
    registry.set_callback(BATCHES_IN_FLIGHT, in_flight)
    registry.set_callback(TOKENS, tokens)
    registry.set_callback(OLDEST_PENDING_AGE, oldest_pending_age)
    registry.set_callback(OLDEST_BATCH_AGE, oldest_batch_age)
    registry.set_callback(NEXT_EXPIRY, next_expiry)
    registry.set_callback(BUDGET_SPENT, budget_spent)
    registry.set_callback(BUDGET_LIMIT, budget_limit)
    registry.set_callback(BUDGET_PAUSED, paused)
    register_harvest_gauges(registry, store)


def register_harvest_gauges(registry: Registry, store: Store) -> None:
    """Suspected duplicates by harvest state, and batches proven another client's."""

    async def candidates() -> dict[str, float]:
        found: dict[str, float] = {}
        for candidate in await store.candidate_batches():
            key = harvest_state(candidate.state, candidate.origin)
            found[key] = found.get(key, 0) + 1
        return found

    async def foreign() -> float:
        return (await store.shared_key_evidence()).proven_foreign

    registry.set_callback(CANDIDATE_BATCHES, candidates)
    registry.set_callback(FOREIGN_BATCHES, foreign)
