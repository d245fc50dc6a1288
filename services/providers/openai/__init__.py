"""The `openai` provider kind: any OpenAI-compatible chat completions server (see adapter.py)."""

from __future__ import annotations

# The catalog options an entry of this kind may set (tests/helm checks the chart's catalog against them).
from services.providers.openai.adapter import _OPTIONS as _OPTIONS
from services.providers.openai.adapter import OpenAICompatibleBackend, OpenAICompatibleProvider, create_backend

__all__ = ["OpenAICompatibleBackend", "OpenAICompatibleProvider", "create_backend"]
