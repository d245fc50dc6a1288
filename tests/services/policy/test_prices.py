"""Prices and costs: integer micro-USD from Decimal prices, and None (never 0) for an unpriced model."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.policy.usage import UsageRecord
from services.prices import Price, cost

SONNET = Price.from_mapping({"input": 3, "cached_input": 0.3, "output": 15})


def _usage(prompt: int, cached: int, completion: int) -> UsageRecord:
    return UsageRecord(
        "r", "k", "m", "d", "p", datetime(2026, 1, 1, tzinfo=UTC), prompt, cached, completion, reasoning_tokens=0
    )


def test_cost_is_tokens_times_price_in_micro_usd() -> None:
    # 1000 prompt tokens, 400 of them cached, 200 output: 600*3 + 400*0.3 + 200*15 = 4920 micro-USD
    assert cost(SONNET, _usage(1000, 400, 200)) == 4920
    assert cost(SONNET, _usage(1_000_000, 0, 0)) == 3_000_000  # one million input tokens: $3


def test_cached_tokens_cost_the_input_price_when_no_cached_price() -> None:
    price = Price.from_mapping({"input": "0.075", "output": "0.3"})
    assert price.cached_input is None
    assert cost(price, _usage(1000, 1000, 0)) == 75  # 1000 * 0.075, exact: the float 0.075 never enters


def test_rounding_is_half_up_to_whole_micro_usd() -> None:
    price = Price(Decimal("0.5"), Decimal("0.25"))
    assert price.cost_micros(1, 0, 0) == 1  # 0.5 rounds up
    assert price.cost_micros(0, 0, 1) == 0  # 0.25 rounds down


def test_reasoning_tokens_are_priced_once_inside_completion_tokens() -> None:
    record = UsageRecord("r", "k", "m", "d", "p", datetime(2026, 1, 1, tzinfo=UTC), 0, 0, 100, reasoning_tokens=80)
    assert cost(SONNET, record) == 1500


def test_estimate_assumes_no_cache_and_every_output_token() -> None:
    assert SONNET.estimate_micros(1000, 500) == 1000 * 3 + 500 * 15


def test_an_unpriced_model_costs_none_not_zero() -> None:
    assert cost(None, _usage(1000, 0, 1000)) is None
    assert cost(Price(Decimal(0), Decimal(0)), _usage(1000, 0, 1000)) == 0  # a free model is priced at 0


@pytest.mark.parametrize(
    "raw",
    [
        {"input": 1},
        {"input": 1, "output": 2, "batch": 3},
        {"input": -1, "output": 2},
        {"input": "NaN", "output": 2},
        {"input": "cheap", "output": 2},
        {"input": True, "output": 2},
    ],
)
def test_malformed_prices_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Price.from_mapping(raw)
