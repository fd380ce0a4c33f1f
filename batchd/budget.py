"""The spend limit: batches are cut to what the budget admits, and submission pauses
once not even the oldest pending task could be sent without passing it.

Spending in a period (a UTC day, a UTC month, or all time) counts, conservatively:
the cost of results written in the period (the usage ledger, actual tokens), plus the
upper bound of every batch still in flight (input ≈ request bytes / 4, output at
max_tokens), plus the same upper bound for the next batch: exactly the tasks the
chunker took for it (rows it refuses are never counted in place of others), or if they
would pass the limit, the largest half, quarter, ... of them that does not (`admit`).
`batchd status` shows the same figures estimated over the oldest pending rows. Work
whose model has no price cannot be bounded, so it pauses submission too, with a reason
that says which model to price.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from batchd.config import BudgetConfig, Config
from batchd.domain import BatchState
from batchd.pricing import (
    PriceTable,
    RequestSizes,
    TokenCounts,
    estimate,
    format_usd,
    price_usage,
)
from batchd.store import SizeRow, Store, StoreAccounts, UsageRow

log = structlog.get_logger("batchd.budget")

# Batches whose results are not yet in the ledger: their cost is still an upper bound.
UNSETTLED_BATCH_STATES = (
    BatchState.CREATING,
    BatchState.IN_PROGRESS,
    BatchState.CANCELING,
    BatchState.ENDED,
)


@dataclass(frozen=True, slots=True)
class BudgetView:
    max_spend_usd: float
    period: str
    period_start: str | None  # first UTC day counted; None for "total"
    spent_usd: float  # results written in the period, batch prices
    in_flight_max_usd: float  # upper bound of batches not yet settled
    next_batch_max_usd: float  # upper bound of the next batch; 0 when nothing is pending
    next_batch_requests: int
    unpriced_models: tuple[str, ...]  # spent, in flight or next: cannot be priced

    @property
    def committed_usd(self) -> float:
        return self.spent_usd + self.in_flight_max_usd

    @property
    def paused_reason(self) -> str | None:
        """Why the next batch may not be sent, or None."""
        if not self.next_batch_requests:
            return None
        if self.unpriced_models:
            return (
                f"no price for model {', '.join(self.unpriced_models)}: "
                "add it under [pricing] to submit it within a budget"
            )
        if self.committed_usd + self.next_batch_max_usd > self.max_spend_usd:
            return (
                f"{format_usd(self.spent_usd)} spent {_period_phrase(self.period)}"
                f" + up to {format_usd(self.in_flight_max_usd)} in flight"
                f" + up to {format_usd(self.next_batch_max_usd)} for the next batch"
                f" would pass [budget] max_spend_usd {format_usd(self.max_spend_usd)}"
            )
        return None


def period_start(period: str, now: datetime) -> str | None:
    """The first UTC day of the period that contains `now` (ledger days are UTC dates)."""
    if period == "day":
        return f"{now:%Y-%m-%d}"
    if period == "month":
        return f"{now:%Y-%m}-01"
    return None


def budget_view(
    config: BudgetConfig,
    table: PriceTable,
    *,
    now: datetime,
    period_usage: Iterable[UsageRow],
    in_flight: Iterable[SizeRow],
    next_batch: Iterable[SizeRow],
) -> BudgetView:
    """Pure: the budget's figures from what the store says."""
    assert config.max_spend_usd is not None
    spent = price_usage(((row[0], TokenCounts(*row[1:])) for row in period_usage), table)
    flying = estimate((RequestSizes(*row) for row in in_flight), table)
    upcoming = estimate((RequestSizes(*row) for row in next_batch), table)
    # Spent tokens of an unpriced model (sent before the budget was set) hide money too.
    unpriced = {line.model for line in spent.unpriced if line.model} | {
        line.model for line in (*flying.unpriced, *upcoming.unpriced) if line.model
    }
    return BudgetView(
        max_spend_usd=config.max_spend_usd,
        period=config.period,
        period_start=period_start(config.period, now),
        spent_usd=spent.cost_usd,
        in_flight_max_usd=flying.cost_max_usd,
        next_batch_max_usd=upcoming.cost_max_usd,
        next_batch_requests=sum(line.requests for line in upcoming.models if line.model),
        unpriced_models=tuple(sorted(unpriced)),
    )


async def fitting_view(
    next_sizes: Callable[[int], Awaitable[list[SizeRow]]],
    wanted: int,
    view_of: Callable[[list[SizeRow]], BudgetView],
) -> BudgetView:
    """The view of the largest next batch the budget admits: the oldest `wanted` pending
    tasks, else half as many, and so on; if not even the oldest one fits, its view (which
    says why submission is paused)."""
    limit = max(1, wanted)
    while True:
        view = view_of(await next_sizes(limit))
        if view.paused_reason is None or limit == 1:
            return view
        limit //= 2


def _period_phrase(period: str) -> str:
    return "in total" if period == "total" else f"this {period} (UTC)"


class BudgetGate:
    """The submitter's check before each batch; logs each change of its decision once."""

    def __init__(
        self,
        store: Store,
        config: BudgetConfig,
        table: PriceTable,
        *,
        next_batch_requests: int,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._accounts = StoreAccounts(store)
        self._config = config
        self._table = table
        self._next_batch_requests = next_batch_requests
        self._clock = clock
        # A batch's requests never change: read its sizes once (reading params is O(n)).
        self._batch_sizes: dict[int, list[SizeRow]] = {}
        self._next: tuple[tuple[int, int, int, int], list[SizeRow]] | None = None
        self.paused_reason: str | None = None

    @classmethod
    def from_config(
        cls, store: Store, config: Config, *, clock: Callable[[], datetime]
    ) -> BudgetGate | None:
        """None when no budget is configured: nothing is read, nothing is checked."""
        if config.budget.max_spend_usd is None:
            return None
        return cls(
            store,
            config.budget,
            PriceTable(config.pricing.models),
            next_batch_requests=config.batching.max_requests,
            clock=clock,
        )

    async def admit(self, task_ids: Sequence[int]) -> int:
        """How many of `task_ids` (a chunk the chunker built: valid tasks, oldest first)
        may go now without passing the limit: all, the first half, quarter, ..., or 0
        when not even the first fits (then submission is paused, and it is logged)."""
        view_of = await self._viewer()

        async def first(count: int) -> list[SizeRow]:
            return await self._accounts.task_sizes(task_ids[:count])

        view = await fitting_view(first, len(task_ids), view_of)
        self._note(view)
        return 0 if view.paused_reason is not None else view.next_batch_requests

    async def pause_reason(self) -> str | None:
        """Why submission must wait now, or None; logged when the answer changes."""
        view = await self.view()
        self._note(view)
        return view.paused_reason

    def _note(self, view: BudgetView) -> None:
        reason = view.paused_reason
        if reason != self.paused_reason:
            if reason is None:
                log.info("submission_resumed_budget", spent_usd=round(view.spent_usd, 4))
            else:
                log.warning(
                    "submission_paused_budget",
                    reason=reason,
                    spent_usd=round(view.spent_usd, 4),
                    in_flight_max_usd=round(view.in_flight_max_usd, 4),
                    next_batch_max_usd=round(view.next_batch_max_usd, 4),
                    max_spend_usd=view.max_spend_usd,
                    period=view.period,
                )
        self.paused_reason = reason

    async def view(self) -> BudgetView:
        """The figures for the largest next batch the budget admits (`fitting_view`)."""
        view_of = await self._viewer()
        return await fitting_view(self._next_sizes, self._next_batch_requests, view_of)

    async def _viewer(self) -> Callable[[list[SizeRow]], BudgetView]:
        """The budget's figures as of now, for whichever next batch is being weighed."""
        now = self._clock()
        usage = await self._accounts.usage_by_model(period_start(self._config.period, now))
        in_flight = await self._in_flight_sizes()

        def view_of(next_batch: list[SizeRow]) -> BudgetView:
            return budget_view(
                self._config,
                self._table,
                now=now,
                period_usage=usage,
                in_flight=in_flight,
                next_batch=next_batch,
            )

        return view_of

    async def _next_sizes(self, limit: int) -> list[SizeRow]:
        if limit == self._next_batch_requests:
            return await self._next_batch_sizes()
        return await self._accounts.pending_sizes(limit)  # only while the budget is tight

    async def _in_flight_sizes(self) -> list[SizeRow]:
        batches = await self._store.batches_in(*UNSETTLED_BATCH_STATES)
        live = {batch.local_id for batch in batches}
        self._batch_sizes = {k: v for k, v in self._batch_sizes.items() if k in live}
        if unknown := sorted(live - self._batch_sizes.keys()):
            self._batch_sizes.update(await self._accounts.batch_sizes(unknown))
        return [size for sizes in self._batch_sizes.values() for size in sizes]

    async def _next_batch_sizes(self) -> list[SizeRow]:
        # The same oldest pending ids mean the same next batch: skip re-reading their params.
        key = await self._accounts.pending_fingerprint(self._next_batch_requests)
        if self._next is None or self._next[0] != key:
            self._next = key, await self._accounts.pending_sizes(self._next_batch_requests)
        return self._next[1]
