"""The OpenTelemetry GenAI semantic conventions' words for what the core does, shared by its metrics and its spans.

ModelMax follows the GenAI conventions of semantic-conventions v1.37.0 (the `gen_ai.*` attributes; Prometheus
labels replace the dots with underscores). One table, so a metric label and a span attribute can never disagree.
"""

from __future__ import annotations

from typing import Final

SEMCONV_VERSION: Final = "1.37.0"

# gen_ai.operation.name: the core serves chat completions (both dialects are chat in the conventions' terms).
OPERATION_CHAT: Final = "chat"

# gen_ai.provider.name by catalog provider kind: the conventions' well-known values where one exists.
_PROVIDER_NAMES: Final = {
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "openai": "openai",
    "local": "llama.cpp",  # no well-known value: the embedded engine's own name
}


def provider_name(kind: str) -> str:
    """gen_ai.provider.name for a catalog provider kind ("none" when no route was found stays "none")."""
    return _PROVIDER_NAMES.get(kind, kind)
