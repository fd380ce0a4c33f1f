"""Prices, cost arithmetic and the estimate, against figures worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.config import ConfigError, load_config
from batchd.money.pricing import (
    DEFAULT_PRICES,
    ModelPrice,
    PriceTable,
    RequestSizes,
    TokenCounts,
    batch_cost,
    estimate,
    price_usage,
    standard_cost,
)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("claude-haiku-4-5", "claude-haiku-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5-latest", "claude-sonnet-4-5"),
        # A new minor version must not borrow an older one's price (Opus 4.5 costs a third
        # of Opus 4): unpriced until someone prices it.
        ("claude-opus-4-7", None),
        ("claude-opus-4-7-20270101", None),
        ("claude-haiku-4-5x", None),
        ("gpt-4o", None),
    ],
)
def test_a_model_is_matched_by_exact_id_then_by_family(model: str, key: str | None) -> None:
    found = PriceTable().lookup(model)
    assert (found[0] if found else None) == key


def test_defaults_derive_cache_prices_from_input() -> None:
    haiku = DEFAULT_PRICES["claude-haiku-4-5"]
    assert haiku == ModelPrice(input=1.0, output=5.0, cache_write=1.25, cache_read=0.1)
    assert DEFAULT_PRICES["claude-opus-4-1"].output == 75.0
    assert DEFAULT_PRICES["claude-sonnet-4-5"].input == 3.0


def test_an_override_for_an_exact_id_wins_over_the_family_default() -> None:
    table = PriceTable({"claude-haiku-4-5-20251001": ModelPrice.of(2.0, 10.0)})
    assert table.lookup("claude-haiku-4-5-20251001") == (
        "claude-haiku-4-5-20251001",
        ModelPrice(2.0, 10.0, 2.5, 0.2),
    )
    assert table.lookup("claude-haiku-4-5-20990101") == ("claude-haiku-4-5", ModelPrice.of(1, 5))


def test_cost_arithmetic_for_every_kind_of_token() -> None:
    tokens = TokenCounts(
        requests=7,
        input_tokens=1_000_000,
        output_tokens=200_000,
        cache_creation_input_tokens=400_000,
        cache_read_input_tokens=2_000_000,
    )
    haiku = DEFAULT_PRICES["claude-haiku-4-5"]
    # 1.0 (input) + 0.2 M x $5 = 1.0 (output) + 0.4 M x $1.25 = 0.5 + 2 M x $0.10 = 0.2
    assert standard_cost(tokens, haiku) == pytest.approx(2.7)
    assert batch_cost(tokens, haiku) == pytest.approx(1.35)


def test_a_report_prices_known_models_and_lists_unknown_ones_with_their_tokens() -> None:
    report = price_usage(
        [
            ("claude-sonnet-4-5-20250929", TokenCounts(2, 10_000, 2_000)),
            ("claude-haiku-4-5-20251001", TokenCounts(3, 30_000, 6_000, 0, 50_000)),
            ("claude-mystery-1", TokenCounts(1, 999, 111)),
        ],
        PriceTable(),
    )
    sonnet = next(m for m in report.models if m.model.startswith("claude-sonnet"))
    # sonnet: 10k x $3 + 2k x $15 = $0.03 + $0.03 = $0.06 standard, $0.03 batch
    assert sonnet.standard_cost_usd == pytest.approx(0.06)
    assert sonnet.cost_usd == pytest.approx(0.03)
    # haiku: 30k x $1 + 6k x $5 + 50k x $0.10 = $0.03 + $0.03 + $0.005 = $0.065 standard
    assert report.standard_cost_usd == pytest.approx(0.06 + 0.065)
    assert report.cost_usd == pytest.approx(0.0625)
    assert report.saving_usd == pytest.approx(0.0625)
    [unpriced] = report.unpriced
    assert (unpriced.model, unpriced.cost_usd, unpriced.tokens.input_tokens) == (
        "claude-mystery-1",
        None,
        999,
    )
    assert report.tokens == TokenCounts(6, 40_999, 8_111, 0, 50_000)  # unpriced included


def test_estimate_upper_bound_and_typical_figure() -> None:
    figures = estimate(
        [
            RequestSizes("claude-haiku-4-5", 6, 2_001, 600),
            RequestSizes("claude-haiku-4-5", 4, 2_000, 400),  # same model: merged
            RequestSizes("claude-unknown-2", 1, 40, 10),
            RequestSizes(None, 2, 10, 0),  # no usable model: the chunker will refuse them
        ],
        PriceTable(),
        {"claude-haiku-4-5": 30.0},
    )
    haiku = next(m for m in figures.models if m.model == "claude-haiku-4-5")
    assert (haiku.requests, haiku.input_tokens, haiku.output_tokens_max) == (10, 1001, 1000)
    # upper bound: 1001 x $1 + 1000 x $5 = $0.006001 standard, half of it batch
    assert haiku.standard_cost_max_usd == pytest.approx(0.006001)
    assert haiku.cost_max_usd == pytest.approx(0.0030005)
    # typical: 30 output tokens x 10 requests = 300; (1001 + 300 x 5) / 1e6 / 2
    assert haiku.output_tokens_typical == 300
    assert haiku.cost_typical_usd == pytest.approx(0.0012505)
    assert [m.model for m in figures.unpriced] == [None, "claude-unknown-2"]
    assert figures.cost_max_usd == pytest.approx(0.0030005)


def test_pricing_and_budget_sections_of_the_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[pricing.claude-haiku-4-5]\ninput = 2\noutput = 8.5\ncache_read = 0.3\n"
        '[pricing."claude-custom-1"]\ninput = 1.5\noutput = 3\n'
        '[budget]\nmax_spend_usd = 25\nperiod = "day"\n'
    )
    config = load_config(path, env={})
    assert config.pricing.models["claude-haiku-4-5"] == ModelPrice(2.0, 8.5, 2.5, 0.3)
    custom = config.pricing.models["claude-custom-1"]
    assert (custom.input, custom.output, custom.cache_write) == (1.5, 3.0, 1.875)
    assert custom.cache_read == pytest.approx(0.15)  # 0.1 x input
    assert (config.budget.max_spend_usd, config.budget.period) == (25.0, "day")
    assert load_config(None, env={}).budget.max_spend_usd is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pricing.m]\ninput = 1\n", r'\[pricing\."m"\] output: required'),
        ("[pricing.m]\ninput = 1\noutput = 2\ncache = 1\n", r'\[pricing\."m"\] cache: unknown'),
        ("[pricing.m]\ninput = -1\noutput = 2\n", r"input: must be >= 0"),
        ("[pricing.m]\ninput = 'a'\noutput = 2\n", r"input: expected a number"),
        ("[pricing]\nm = 3\n", r'\[pricing\."m"\] must be a table'),
        ("[budget]\nmax_spend_usd = 0\n", r"\[budget\] max_spend_usd: must be > 0"),
        ("[budget]\nmax_spend_usd = 5\nperiod = 'week'\n", r"\[budget\] period: must be day"),
        ("[budget]\nlimit = 5\n", r"\[budget\] limit: unknown key"),
    ],
)
def test_bad_pricing_or_budget_config_names_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})
