"""Checks of JSON request values that more than one OpenAI-shaped handler shares: each refusal is a 400 naming
the offending `param`, in the OpenAI API's words."""

from __future__ import annotations

from typing import Any

from bridge.openai.errors import bad_request


def reject_constant(name: str) -> None:
    """`json.loads(parse_constant=...)`: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def required_string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"Missing required parameter: '{param}' (a non-empty string).", param=param)
    return value


def optional_string(value: Any, param: str) -> str:
    """A string, or "" when the value is null or absent."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(f"Invalid type for '{param}': expected a string.", param=param)
    return value
