"""Prices per model, the cost of used tokens, and the estimate of work not yet done.

Prices are the standard (live API) list prices in USD per million tokens; the Message
Batches API charges 50% of them for every kind of token, cache reads and writes
included (spec §5). A model is matched by its exact id, then by its family: a table key
followed by a date or `latest` (`claude-haiku-4-5` prices `claude-haiku-4-5-20251001`).
A model that matches nothing is "unpriced": reported with its tokens, never priced at 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

BATCH_DISCOUNT = 0.5
# The default table's date: list prices change, and the config overrides them.
PRICES_AS_OF = "early 2026"
# 5-minute prompt cache: a write costs 1.25x the input price, a read 0.1x.
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1
# `batchd estimate`: input tokens are approximated as bytes of the request's JSON / 4.
BYTES_PER_TOKEN = 4
_PER_MILLION = 1_000_000
# What may follow a family key: a snapshot date (`-20251001`, Vertex `@20251001`) or `-latest`.
_FAMILY_SUFFIX = re.compile(r"[-@](\d{8}|latest)")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Standard list prices of one model, USD per million tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def of(cls, input_usd: float, output_usd: float) -> ModelPrice:
        """Cache prices derived from the input price (5-minute cache)."""
        return cls(
            input_usd,
            output_usd,
            input_usd * CACHE_WRITE_FACTOR,
            input_usd * CACHE_READ_FACTOR,
        )


# List prices at the time of writing (PRICES_AS_OF); config.example.toml shows how to
# override them. Opus 4 and 4.1 kept the older, higher price; Opus 4.5 lowered it.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "claude-opus-4-6": ModelPrice.of(5.0, 25.0),
    "claude-opus-4-5": ModelPrice.of(5.0, 25.0),
    "claude-opus-4-1": ModelPrice.of(15.0, 75.0),
    "claude-opus-4-0": ModelPrice.of(15.0, 75.0),
    "claude-opus-4": ModelPrice.of(15.0, 75.0),
    "claude-sonnet-4-6": ModelPrice.of(3.0, 15.0),
    "claude-sonnet-4-5": ModelPrice.of(3.0, 15.0),
    "claude-sonnet-4-0": ModelPrice.of(3.0, 15.0),
    "claude-sonnet-4": ModelPrice.of(3.0, 15.0),
    "claude-haiku-4-5": ModelPrice.of(1.0, 5.0),
    "claude-3-5-haiku": ModelPrice.of(0.8, 4.0),
}


@dataclass(frozen=True, slots=True)
class TokenCounts:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
        )


def format_usd(amount: float | None) -> str:
    """Dollars for people: 4 decimals below one dollar (batch costs are often cents), else 2."""
    if amount is None:
        return "-"
    return f"${amount:,.4f}" if abs(amount) < 1 else f"${amount:,.2f}"


def standard_cost(tokens: TokenCounts, price: ModelPrice) -> float:
    """What these tokens cost at the live API's prices, USD."""
    return (
        tokens.input_tokens * price.input
        + tokens.output_tokens * price.output
        + tokens.cache_creation_input_tokens * price.cache_write
        + tokens.cache_read_input_tokens * price.cache_read
    ) / _PER_MILLION


def batch_cost(tokens: TokenCounts, price: ModelPrice) -> float:
    """What these tokens cost through the Message Batches API, USD."""
    return standard_cost(tokens, price) * BATCH_DISCOUNT


class PriceTable:
    """The default prices with the config's overrides on top."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices = {**DEFAULT_PRICES, **(overrides or {})}

    def lookup(self, model: str) -> tuple[str, ModelPrice] | None:
        """(table key, price) for a model id: exact id first, then its family; or None."""
        if model in self._prices:
            return model, self._prices[model]
        families = [
            key
            for key in self._prices
            if model.startswith(key) and _FAMILY_SUFFIX.fullmatch(model[len(key) :])
        ]
        if not families:
            return None
        key = max(families, key=len)
        return key, self._prices[key]


@dataclass(frozen=True, slots=True)
class ModelCost:
    model: str
    priced_as: str | None  # the table key used; None when unpriced
    tokens: TokenCounts
    cost_usd: float | None  # batch price; None when unpriced
    standard_cost_usd: float | None


@dataclass(frozen=True, slots=True)
class CostReport:
    models: tuple[ModelCost, ...]
    tokens: TokenCounts  # every model's, priced or not
    cost_usd: float  # priced models only
    standard_cost_usd: float

    @property
    def saving_usd(self) -> float:
        return self.standard_cost_usd - self.cost_usd

    @property
    def unpriced(self) -> tuple[ModelCost, ...]:
        return tuple(line for line in self.models if line.priced_as is None)


def price_usage(usage: Iterable[tuple[str, TokenCounts]], table: PriceTable) -> CostReport:
    """The batch cost and the standard-API cost of used tokens, per model."""
    lines = []
    for model, tokens in sorted(usage):
        found = table.lookup(model)
        if found is None:
            lines.append(ModelCost(model, None, tokens, None, None))
        else:
            key, price = found
            cost = batch_cost(tokens, price)
            lines.append(ModelCost(model, key, tokens, cost, standard_cost(tokens, price)))
    return CostReport(
        models=tuple(lines),
        tokens=sum((line.tokens for line in lines), TokenCounts()),
        cost_usd=sum(line.cost_usd or 0.0 for line in lines),
        standard_cost_usd=sum(line.standard_cost_usd or 0.0 for line in lines),
    )


@dataclass(frozen=True, slots=True)
class RequestSizes:
    """What the store can tell about requests not yet run, per model."""

    model: str | None  # None: the params have no usable model (the chunker refuses them)
    requests: int
    request_bytes: int  # UTF-8 bytes of the params JSON
    max_tokens: int  # sum of max_tokens


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    model: str | None
    priced_as: str | None
    requests: int
    input_tokens: int  # request_bytes / BYTES_PER_TOKEN, rounded up
    output_tokens_max: int  # sum of max_tokens: the output cannot exceed it
    output_tokens_typical: int | None  # from this model's past results, when there are any
    cost_max_usd: float | None  # batch price, output at max_tokens
    cost_typical_usd: float | None
    standard_cost_max_usd: float | None


@dataclass(frozen=True, slots=True)
class Estimate:
    models: tuple[ModelEstimate, ...] = field(default_factory=tuple)

    @property
    def cost_max_usd(self) -> float:
        return sum(m.cost_max_usd or 0.0 for m in self.models)

    @property
    def standard_cost_max_usd(self) -> float:
        return sum(m.standard_cost_max_usd or 0.0 for m in self.models)

    @property
    def unpriced(self) -> tuple[ModelEstimate, ...]:
        return tuple(m for m in self.models if m.priced_as is None)


def estimate(
    sizes: Iterable[RequestSizes],
    table: PriceTable,
    typical_output_per_request: Mapping[str, float] | None = None,
) -> Estimate:
    """Upper-bound (and, with history, typical) cost of requests not yet run."""
    typical = typical_output_per_request or {}
    merged: dict[str | None, RequestSizes] = {}
    for size in sizes:
        seen = merged.get(size.model)
        merged[size.model] = (
            size
            if seen is None
            else RequestSizes(
                size.model,
                seen.requests + size.requests,
                seen.request_bytes + size.request_bytes,
                seen.max_tokens + size.max_tokens,
            )
        )
    lines = [
        _estimate_model(size, table, typical)
        for size in sorted(merged.values(), key=lambda s: s.model or "")
    ]
    return Estimate(tuple(lines))


def _estimate_model(
    size: RequestSizes, table: PriceTable, typical: Mapping[str, float]
) -> ModelEstimate:
    input_tokens = -(-size.request_bytes // BYTES_PER_TOKEN)
    per_request = typical.get(size.model) if size.model else None
    output_typical = (
        None if per_request is None else min(size.max_tokens, round(per_request * size.requests))
    )
    found = table.lookup(size.model) if size.model else None
    if found is None:
        return ModelEstimate(
            size.model, None, size.requests, input_tokens, size.max_tokens, output_typical,
            None, None, None,
        )  # fmt: skip
    key, price = found
    upper = TokenCounts(size.requests, input_tokens, size.max_tokens)
    cost_typical = (
        None
        if output_typical is None
        else batch_cost(TokenCounts(size.requests, input_tokens, output_typical), price)
    )
    return ModelEstimate(
        size.model,
        key,
        size.requests,
        input_tokens,
        size.max_tokens,
        output_typical,
        batch_cost(upper, price),
        cost_typical,
        standard_cost(upper, price),
    )
