"""The `gemini` provider kind: Google Gemini through google-genai, on the Gemini API or Vertex AI (see adapter.py)."""

from __future__ import annotations

# The catalog options an entry of this kind may set (tests/helm checks the chart's catalog against them).
from services.providers.gemini.adapter import _OPTIONS as _OPTIONS
from services.providers.gemini.adapter import GeminiBackend, GeminiProvider, create_backend

__all__ = ["GeminiBackend", "GeminiProvider", "create_backend"]
