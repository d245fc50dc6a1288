"""OpenAI's `reasoning_effort` as Gemini's thinkingConfig, by the upstream model's family (the name's prefix):

    effort    gemini-3-pro  gemini-3.1-pro  other gemini-3*  gemini-2.5-pro  gemini-2.5-flash*
    none      refused       refused         refused          refused         thinkingBudget 0
    minimal   LOW           LOW             MINIMAL          128             512
    low       LOW           LOW             LOW              1024            1024
    medium    HIGH          MEDIUM          MEDIUM           8192            8192
    high      HIGH          HIGH            HIGH             32768           24576
    xhigh     HIGH          HIGH            HIGH             32768           24576

Gemini 3 takes a thinkingLevel and cannot turn thinking off (MINIMAL still thinks); 2.5 takes a token budget within
the model's range (2.5 Pro: 128-32768, never off; Flash and Flash-Lite: up to 24576, 0 turns it off). Any other model
(aliases such as gemini-flash-latest, older or tuned models) refuses every effort. The catalog option
`reasoning_effort` (effort -> level name, budget, or null to refuse) overrides this table per effort. A refused
effort is a 400 naming `reasoning_effort`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from services.providers.gemini.errors import invalid

E = pb.ReasoningEffort

# reasoning_effort -> thinkingConfig, per model family: a thinkingLevel name (str), a thinkingBudget (int), or None
# when the family cannot honour that effort. The first family whose prefix the model name starts with wins.
Thinking = str | int | None
_ORDER = ("none", "minimal", "low", "medium", "high", "xhigh")
FAMILIES: tuple[tuple[str, tuple[Thinking, ...]], ...] = (
    ("gemini-3-pro", (None, "LOW", "LOW", "HIGH", "HIGH", "HIGH")),  # LOW and HIGH only
    ("gemini-3.1-pro", (None, "LOW", "LOW", "MEDIUM", "HIGH", "HIGH")),  # no MINIMAL
    ("gemini-3", (None, "MINIMAL", "LOW", "MEDIUM", "HIGH", "HIGH")),
    ("gemini-2.5-pro", (None, 128, 1024, 8192, 32768, 32768)),  # 128-32768; thinking cannot be turned off
    ("gemini-2.5-flash", (0, 512, 1024, 8192, 24576, 24576)),  # Flash 0-24576, Flash-Lite 512-24576; 0 is off
)
# The catalog's (and OpenAI's) names for the efforts: "none", "minimal", ..., "xhigh".
EFFORTS = {name: E.Value(f"REASONING_EFFORT_{name.upper()}") for name in _ORDER}


def thinking_table(model: str, overrides: Mapping[str, Thinking]) -> dict[pb.ReasoningEffort.ValueType, Thinking]:
    """The reasoning_effort table for the upstream `model` (such as "models/gemini-2.5-pro"), with the catalog's
    `overrides` (effort name -> level, budget or None) applied on top."""
    family = model.rpartition("/")[2].lower()
    values = next((values for prefix, values in FAMILIES if family.startswith(prefix)), ())
    table = {EFFORTS[name]: value for name, value in zip(_ORDER, values, strict=False)}
    for effort, value in overrides.items():
        table[EFFORTS[effort]] = value
    return table


def thinking_config(
    effort: pb.ReasoningEffort.ValueType, table: Mapping[pb.ReasoningEffort.ValueType, Thinking], model: str
) -> dict[str, Any]:
    """thinkingConfig's level or budget for `effort`, from the model's `table`; `model` is the public name."""
    value = table.get(effort)
    if value is None:
        name = E.Name(effort).removeprefix("REASONING_EFFORT_").lower()
        what = "cannot turn its thinking off" if effort == E.REASONING_EFFORT_NONE else "has no thinking setting for it"
        raise invalid(f"'reasoning_effort' {name!r} is not supported: '{model}' {what}.", "reasoning_effort")
    return {"thinking_level": value} if isinstance(value, str) else {"thinking_budget": value}
