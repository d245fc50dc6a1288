"""What the openai SDK's streamed chunks add up to, for assertions: the content, and the finish reasons."""

from __future__ import annotations

from typing import Any


def content_of(chunks: list[Any]) -> str:
    """Choice 0's text, joined."""
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks: list[Any]) -> list[str]:
    """Choice 0's finish reasons, in order (a healthy stream has exactly one)."""
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
