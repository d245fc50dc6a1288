"""Model prices (USD per million tokens) and the cost of a request's tokens in integer micro-USD."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Protocol

_PRICE_KEYS = {"input", "cached_input", "output"}


class TokenUsage(Protocol):
    """Token counts in OpenAI's sense: `cached_tokens` is the part of `prompt_tokens` read from the prompt cache,
    and reasoning tokens are already inside `completion_tokens` (so they are priced as output, never twice)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Decimal, not float: prices such as 0.075 have no exact binary form.

    A USD price per million tokens is also the cost in micro-USD of one token, so cost = tokens x price exactly.
    """

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # None: cached prompt tokens cost as much as the others

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Decimal) or not value.is_finite() or value < 0):
                raise ValueError(f"price {name} must be a finite, non-negative Decimal, got {value!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> Price:
        """From a catalog entry's `price: {input: 3, cached_input: 0.3, output: 15}` (USD per million tokens)."""
        unknown = set(raw) - _PRICE_KEYS
        if unknown:
            raise ValueError(f"unknown price fields {sorted(unknown)}; expected {sorted(_PRICE_KEYS)}")
        if "input" not in raw or "output" not in raw:
            raise ValueError("a price needs both `input` and `output` (USD per million tokens)")
        cached = raw.get("cached_input")
        return cls(_decimal(raw["input"]), _decimal(raw["output"]), None if cached is None else _decimal(cached))

    def cost_micros(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """The cost in micro-USD, rounded half up to a whole micro-USD."""
        cached = min(cached_tokens, prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        exact = (prompt_tokens - cached) * self.input + cached * cached_price + completion_tokens * self.output
        return int(exact.to_integral_value(rounding=ROUND_HALF_UP))

    def estimate_micros(self, prompt_tokens: int, max_output_tokens: int) -> int:
        """An upper bound for a budget reservation: no cache discount, and every allowed output token used."""
        return self.cost_micros(prompt_tokens, 0, max_output_tokens)


def cost(price: Price | None, usage: TokenUsage) -> int | None:
    """The cost of `usage` in micro-USD, or None when the model has no price (unknown, which is not free)."""
    if price is None:
        return None
    return price.cost_micros(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)


def _decimal(value: object) -> Decimal:
    # str() first: Decimal(0.075) would carry the float's binary error (0.07499999...)
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"a price must be a number, got {value!r}")
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"a price must be a number, got {value!r}") from None
