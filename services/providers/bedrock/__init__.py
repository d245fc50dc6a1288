"""The `bedrock` provider kind: AWS Bedrock Runtime's Converse and ConverseStream (see adapter.py)."""

from __future__ import annotations

# The catalog options an entry of this kind may set (tests/helm checks the chart's catalog against them).
from services.providers.bedrock.adapter import _OPTIONS as _OPTIONS
from services.providers.bedrock.adapter import BedrockBackend, BedrockProvider, create_backend

__all__ = ["BedrockBackend", "BedrockProvider", "create_backend"]
