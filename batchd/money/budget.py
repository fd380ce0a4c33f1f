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

A task whose upper bound alone passes the whole limit could never be sent, in this period
or any other, however little was spent: it is marked `invalid` with the figures instead
of pausing submission for ever with every task behind it. Not fitting what is left of the
limit is the budget working: that pauses, and waits for results, a new period or a
higher limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from batchd.config import BudgetConfig, BudgetSettings
from batchd.domain import BatchState
from batchd.money.pricing import (
    Estimate,
    PriceTable,
    RequestSizes,
    TokenCounts,
    estimate,
    format_usd,
    price_usage,
)
from batchd.store import PendingFingerprint, SizeTotals, Store, UsageTotals

log = structlog.get_logger("batchd.money.budget")

_PER_PERIOD = {"day": "per UTC day", "month": "per UTC month"}
# Tasks refused as over the whole limit, named in one log line (the count says the rest).
_REFUSED_NAMED = 20

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
    next_batch: Estimate = field(default_factory=Estimate)  # its upper bound, per model

    @property
    def committed_usd(self) -> float:
        return self.spent_usd + self.in_flight_max_usd

    @property
    def alone_over_limit(self) -> bool:
        """The next batch is one task whose upper bound alone passes max_spend_usd: no
        period, however little was spent in it, could ever admit it."""
        return self.next_batch_requests == 1 and self.next_batch_max_usd > self.max_spend_usd

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
            reason = (
                f"{format_usd(self.spent_usd)} spent {_period_phrase(self.period)}"
                f" + up to {format_usd(self.in_flight_max_usd)} in flight"
                f" + up to {format_usd(self.next_batch_max_usd)} for the next batch"
                f" would pass [budget] max_spend_usd {format_usd(self.max_spend_usd)}"
            )
            if self.alone_over_limit:  # what `batchd status` says before the daemon acts
                reason += "; that one task alone passes the whole limit: batchd marks it invalid"
            return reason
        return None

    def over_limit_reason(self, custom_id: str) -> str:
        """The `error` of the next batch's one task when `alone_over_limit`: its figures,
        and what to do about them."""
        task = next(line for line in self.next_batch.models if line.model)
        return (
            f"over the budget: this request alone may cost up to {format_usd(task.cost_max_usd)}"
            f" (about {task.input_tokens:,} input tokens, max_tokens {task.output_tokens_max:,})"
            f", more than the whole [budget] max_spend_usd {format_usd(self.max_spend_usd)}"
            f" {_PER_PERIOD.get(self.period, 'in total')}, so it can never be sent under"
            " this budget; raise max_spend_usd or lower its max_tokens, then"
            f" `batchd retry --status invalid {custom_id}`"
        )


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
    period_usage: Iterable[UsageTotals],
    in_flight: Iterable[SizeTotals],
    next_batch: Iterable[SizeTotals],
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
        next_batch=upcoming,
    )


async def fitting_view(
    next_sizes: Callable[[int], Awaitable[list[SizeTotals]]],
    wanted: int,
    view_of: Callable[[list[SizeTotals]], BudgetView],
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


@dataclass(frozen=True, slots=True)
class Admission:
    """The budget's answer about a chunk: what may go now, and what never can."""

    task_ids: Sequence[int]  # may go now: the oldest of the chunk after the refused ones
    refused: int = 0  # tasks at its head marked invalid: each alone passes the whole limit


class BudgetGate:
    """The submitter's check before each batch; logs each change of its decision once."""

    def __init__(
        self, store: Store, settings: BudgetSettings, *, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._accounts = store.accounts
        self._config = settings.budget
        self._table = PriceTable(settings.pricing.models)
        self._next_batch_requests = settings.next_batch_requests
        self._clock = clock
        # A batch's requests never change: read its sizes once (reading params is O(n)).
        self._batch_sizes: dict[int, list[SizeTotals]] = {}
        self._next: tuple[PendingFingerprint, list[SizeTotals]] | None = None
        self.paused_reason: str | None = None

    async def admit(
        self, task_ids: Sequence[int], custom_ids: Sequence[str], versions: Sequence[str]
    ) -> Admission:
        """Which of `task_ids` (a chunk the chunker built: valid tasks, oldest first) may go
        now without passing the limit: all, the first half, quarter, ..., or none when not
        even the first fits (then submission is paused, and it is logged).

        Tasks at the head whose bound alone passes the whole limit are marked invalid
        first, and the rest is weighed without them: waiting could never let them go.
        `versions` (the chunk's, as read): one edited since is not marked, but judged again.
        """
        view_of = await self._viewer()
        start = 0  # the chunk's tasks before this one are refused

        async def first(count: int) -> list[SizeTotals]:
            return await self._accounts.task_sizes(task_ids[start : start + count])

        view = await fitting_view(first, len(task_ids), view_of)
        refused: list[tuple[int, str]] = []
        while view.alone_over_limit:
            refused.append((task_ids[start], view.over_limit_reason(custom_ids[start])))
            start += 1
            if start == len(task_ids):
                break
            # A run of them (a whole file whose max_tokens the budget cannot cover): one
            # read each, and the rest weighed again only once the head fits the limit.
            view = view_of(await first(1))
            if not view.alone_over_limit:
                view = await fitting_view(first, len(task_ids) - start, view_of)
        if refused:
            await self._refuse(refused, versions[:start], custom_ids[:start])
            if start == len(task_ids):
                return Admission((), len(refused))  # nothing weighed: no pause to note
        self._note(view)
        if view.paused_reason is not None:
            return Admission((), len(refused))
        return Admission(task_ids[start : start + view.next_batch_requests], len(refused))

    async def _refuse(
        self, reasons: list[tuple[int, str]], versions: Sequence[str], custom_ids: Sequence[str]
    ) -> None:
        marked = await self._store.mark_invalid(reasons, versions)
        log.warning(
            "tasks_over_budget",
            count=marked,
            custom_ids=list(custom_ids[:_REFUSED_NAMED]),
            reason=reasons[0][1],
        )

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

    async def _viewer(self) -> Callable[[list[SizeTotals]], BudgetView]:
        """The budget's figures as of now, for whichever next batch is being weighed."""
        now = self._clock()
        usage = await self._accounts.usage_by_model(period_start(self._config.period, now))
        in_flight = await self._in_flight_sizes()

        def view_of(next_batch: list[SizeTotals]) -> BudgetView:
            return budget_view(
                self._config,
                self._table,
                now=now,
                period_usage=usage,
                in_flight=in_flight,
                next_batch=next_batch,
            )

        return view_of

    async def _next_sizes(self, limit: int) -> list[SizeTotals]:
        if limit == self._next_batch_requests:
            return await self._next_batch_sizes()
        return await self._accounts.pending_sizes(limit)  # only while the budget is tight

    async def _in_flight_sizes(self) -> list[SizeTotals]:
        batches = await self._store.batches_in(*UNSETTLED_BATCH_STATES)
        live = {batch.local_id for batch in batches}
        self._batch_sizes = {k: v for k, v in self._batch_sizes.items() if k in live}
        if unknown := sorted(live - self._batch_sizes.keys()):
            self._batch_sizes.update(await self._accounts.batch_sizes(unknown))
        return [size for sizes in self._batch_sizes.values() for size in sizes]

    async def _next_batch_sizes(self) -> list[SizeTotals]:
        # The same oldest pending ids mean the same next batch: skip re-reading their params.
        key = await self._accounts.pending_fingerprint(self._next_batch_requests)
        if self._next is None or self._next[0] != key:
            self._next = key, await self._accounts.pending_sizes(self._next_batch_requests)
        return self._next[1]
