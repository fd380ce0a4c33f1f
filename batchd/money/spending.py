"""What `batchd status` and `batchd estimate` say about money: JSON-ready figures, text.

Figures are rounded to 6 decimals of a dollar in JSON; the text shows 4 decimals below
one dollar, cents above.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from batchd.config import Config
from batchd.domain import BatchRecord
from batchd.money.budget import BudgetView, budget_view, fitting_view, period_start
from batchd.money.pricing import (
    BATCH_DISCOUNT,
    BYTES_PER_TOKEN,
    PRICES_AS_OF,
    CostReport,
    Estimate,
    PriceTable,
    RequestSizes,
    TokenCounts,
    estimate,
    price_usage,
)
from batchd.money.pricing import (
    format_usd as usd,
)
from batchd.store import SchemaTooOldError, SizeTotals, StoreAccounts, UsageTotals


async def usage_status(accounts: StoreAccounts, config: Config) -> dict[str, Any]:
    """The ledger's totals and cost, and of them what was paid for lines no task holds."""
    table = PriceTable(config.pricing.models)
    usage = usage_json(price_usage(_usage_rows(await accounts.usage_by_model()), table))
    try:
        kept = {
            kept_in: price_usage(_usage_rows(await accounts.kept_usage_by_model(kept_in)), table)
            for kept_in in _KEPT_IN
        }
    except SchemaTooOldError:
        usage["kept_aside"] = None  # a read-only look at a schema before migration 015
        return usage
    tokens = kept["duplicate"].tokens + kept["unmatched"].tokens
    usage["kept_aside"] = {
        **_tokens_json(tokens),
        "cost_usd": _money(sum(report.cost_usd for report in kept.values())),
        **{
            kept_in: {"requests": report.tokens.requests, "cost_usd": _money(report.cost_usd)}
            for kept_in, report in kept.items()
        },
    }
    return usage


# Where billed lines no task holds are kept (kept_line_usage.kept_in, migration 015).
_KEPT_IN = ("duplicate", "unmatched")


def _usage_rows(
    rows: Sequence[UsageTotals],
) -> list[tuple[str, TokenCounts]]:
    return [(row[0], TokenCounts(*row[1:])) for row in rows]


async def budget_status(
    accounts: StoreAccounts,
    config: Config,
    batches: Sequence[BatchRecord],
    now: datetime,
) -> dict[str, Any] | None:
    if config.budget.max_spend_usd is None:
        return None
    table = PriceTable(config.pricing.models)
    sizes = await accounts.batch_sizes([batch.local_id for batch in batches])
    usage = await accounts.usage_by_model(period_start(config.budget.period, now))
    in_flight = [size for rows in sizes.values() for size in rows]

    def view_of(next_batch: list[SizeTotals]) -> BudgetView:
        return budget_view(
            config.budget,
            table,
            now=now,
            period_usage=usage,
            in_flight=in_flight,
            next_batch=next_batch,
        )

    view = await fitting_view(accounts.pending_sizes, config.batching.max_requests, view_of)
    return budget_json(view)


def budget_json(view: BudgetView) -> dict[str, Any]:
    return {
        "max_spend_usd": view.max_spend_usd,
        "period": view.period,
        "period_start": view.period_start,
        "spent_usd": _money(view.spent_usd),
        "in_flight_max_usd": _money(view.in_flight_max_usd),
        "next_batch_max_usd": _money(view.next_batch_max_usd),
        "unpriced_models": list(view.unpriced_models),
        "paused": view.paused_reason is not None,
        "paused_reason": view.paused_reason,
    }


def _money(usd: float) -> float:
    return round(usd, 6)


def _tokens_json(tokens: TokenCounts) -> dict[str, int]:
    return {
        "requests": tokens.requests,
        "input_tokens": tokens.input_tokens,
        "output_tokens": tokens.output_tokens,
        "cache_creation_input_tokens": tokens.cache_creation_input_tokens,
        "cache_read_input_tokens": tokens.cache_read_input_tokens,
    }


def usage_json(report: CostReport) -> dict[str, Any]:
    """Tokens and cost of every succeeded result so far (pruned tasks included)."""
    return {
        "prices_as_of": PRICES_AS_OF,
        "batch_discount": BATCH_DISCOUNT,
        **_tokens_json(report.tokens),
        "cost_usd": _money(report.cost_usd),
        "standard_cost_usd": _money(report.standard_cost_usd),
        "saving_usd": _money(report.saving_usd),
        "models": [
            {
                "model": line.model,
                "priced_as": line.priced_as,
                **_tokens_json(line.tokens),
                "cost_usd": None if line.cost_usd is None else _money(line.cost_usd),
                "standard_cost_usd": (
                    None if line.standard_cost_usd is None else _money(line.standard_cost_usd)
                ),
            }
            for line in report.models
        ],
        "unpriced_models": [line.model for line in report.unpriced],
    }


def render_usage(usage: dict[str, Any]) -> list[str]:
    lines = [
        f"usage: {usage['requests']:,} result(s), {usage['input_tokens']:,} input, "
        f"{usage['output_tokens']:,} output, {usage['cache_creation_input_tokens']:,} "
        f"cache-write, {usage['cache_read_input_tokens']:,} cache-read tokens",
        f"cost: {usd(usage['cost_usd'])} at batch prices; {usd(usage['standard_cost_usd'])} "
        f"at standard API prices; saved {usd(usage['saving_usd'])} "
        f"(list prices of {usage['prices_as_of']} unless overridden in [pricing])",
    ]
    kept = usage.get("kept_aside")
    if kept and kept["requests"]:
        duplicate, unmatched = kept["duplicate"], kept["unmatched"]
        lines.append(
            f"  of which {kept['requests']:,} result(s), {usd(kept['cost_usd'])}, paid for lines"
            f" no task holds: {duplicate['requests']:,} duplicate ({usd(duplicate['cost_usd'])},"
            f" duplicate_results), {unmatched['requests']:,} unmatched"
            f" ({usd(unmatched['cost_usd'])}, unmatched_results: e.g. tasks deleted in flight)"
        )
    for line in usage["models"]:
        priced = (
            f"{usd(line['cost_usd'])} (as {line['priced_as']})" if line["priced_as"] else "UNPRICED"
        )
        lines.append(f"  {line['model'] or '(no model)':<36} {line['requests']:>9,}  {priced}")
    for line in usage["models"]:
        if line["priced_as"] is None:
            lines.append(
                f"UNPRICED: {line['model'] or '(no model)'}: {line['requests']:,} result(s), "
                f"{line['input_tokens']:,} input, {line['output_tokens']:,} output tokens; "
                f'add [pricing."{line["model"]}"] to price them'
            )
    return lines


def render_budget(budget: dict[str, Any]) -> list[str]:
    period = "in total" if budget["period"] == "total" else f"this {budget['period']} (UTC)"
    lines = [
        f"budget: {usd(budget['spent_usd'])} spent {period} of {usd(budget['max_spend_usd'])}; "
        f"up to {usd(budget['in_flight_max_usd'])} in flight, up to "
        f"{usd(budget['next_batch_max_usd'])} for the next batch"
    ]
    if budget["paused"]:
        lines.append(f"submission: paused: budget ({budget['paused_reason']})")
    return lines


APPROXIMATION = (
    f"input tokens ~ UTF-8 bytes of each request's params JSON / {BYTES_PER_TOKEN}, rounded up"
    " (about right for English text; high for images and base64, low for CJK scripts);"
    " output at most max_tokens; typical output = the mean output per result of the same"
    " model so far"
)


async def estimate_status(accounts: StoreAccounts, config: Config) -> dict[str, Any]:
    """What the pending tasks would cost: the upper bound, and a typical figure if known."""
    table = PriceTable(config.pricing.models)
    sizes = [RequestSizes(*row) for row in await accounts.pending_sizes()]
    typical = typical_output(await accounts.usage_by_model(), table)
    return estimate_json(estimate(sizes, table, typical))


def typical_output(rows: Sequence[UsageTotals], table: PriceTable) -> dict[str, float]:
    """Mean output tokens per result, by model id and by price key (a family's ids share)."""
    sums: dict[str, tuple[int, int]] = {}
    for model, requests, _, output, *_ in rows:
        found = table.lookup(model)
        for key in {model, found[0] if found else model}:
            seen_requests, seen_output = sums.get(key, (0, 0))
            sums[key] = seen_requests + requests, seen_output + output
    return {key: output / requests for key, (requests, output) in sums.items() if requests}


def estimate_json(figures: Estimate) -> dict[str, Any]:
    typical = [m.cost_typical_usd for m in figures.models if m.priced_as]
    return {
        "approximation": APPROXIMATION,
        "prices_as_of": PRICES_AS_OF,
        "batch_discount": BATCH_DISCOUNT,
        "requests": sum(m.requests for m in figures.models),
        "input_tokens": sum(m.input_tokens for m in figures.models),
        "output_tokens_max": sum(m.output_tokens_max for m in figures.models),
        "cost_max_usd": _money(figures.cost_max_usd),
        "standard_cost_max_usd": _money(figures.standard_cost_max_usd),
        # Only when every priced model has a history: a partial sum would mislead.
        "cost_typical_usd": (
            _money(sum(c for c in typical if c is not None))
            if typical and None not in typical
            else None
        ),
        "models": [
            {
                "model": m.model,
                "priced_as": m.priced_as,
                "requests": m.requests,
                "input_tokens": m.input_tokens,
                "output_tokens_max": m.output_tokens_max,
                "output_tokens_typical": m.output_tokens_typical,
                "cost_max_usd": _optional_money(m.cost_max_usd),
                "cost_typical_usd": _optional_money(m.cost_typical_usd),
                "standard_cost_max_usd": _optional_money(m.standard_cost_max_usd),
            }
            for m in figures.models
        ],
        "unpriced_models": [m.model for m in figures.unpriced if m.model],
    }


def _optional_money(usd: float | None) -> float | None:
    return None if usd is None else _money(usd)


def render_estimate(figures: dict[str, Any]) -> str:
    if not figures["requests"]:
        return "nothing pending"
    lines = [
        f"pending: {figures['requests']:,} request(s), ~{figures['input_tokens']:,} input "
        f"tokens, at most {figures['output_tokens_max']:,} output tokens",
        f"  {'model':<34} {'requests':>9} {'~input':>12} {'output <=':>12} "
        f"{'batch <=':>11} {'typical':>11} {'standard <=':>12}",
    ]
    for m in figures["models"]:
        lines.append(
            f"  {m['model'] or '(no model: will be invalid)':<34} {m['requests']:>9,} "
            f"{m['input_tokens']:>12,} {m['output_tokens_max']:>12,} "
            f"{usd(m['cost_max_usd']):>11} {usd(m['cost_typical_usd']):>11} "
            f"{usd(m['standard_cost_max_usd']):>12}"
        )
    lines.append(
        f"at batch prices: at most {usd(figures['cost_max_usd'])}"
        + (
            f", typically {usd(figures['cost_typical_usd'])}"
            if figures["cost_typical_usd"] is not None
            else ""
        )
        + f" (standard API: at most {usd(figures['standard_cost_max_usd'])})"
    )
    lines += [
        f'UNPRICED: {model}: not counted above; add [pricing."{model}"]'
        for model in figures["unpriced_models"]
    ]
    lines.append(f"approximation: {figures['approximation']}")
    return "\n".join(lines)
