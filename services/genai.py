"""The OpenTelemetry GenAI semantic conventions' words for what the core does, shared by its metrics and its spans.

ModelMax follows the GenAI conventions of semantic-conventions v1.37.0 (the `gen_ai.*` attributes; Prometheus
labels replace the dots with underscores). One table, so a metric label and a span attribute can never disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Final

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

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


# The opt-in content attributes (gen_ai.system_instructions, gen_ai.input.messages, gen_ai.output.messages): JSON
# in the conventions' message shape, text and tool calls only (images, reasoning and signatures are never recorded).
_ROLES: Final = {pb.Role.ROLE_SYSTEM: "system", pb.Role.ROLE_USER: "user", pb.Role.ROLE_ASSISTANT: "assistant",
                 pb.Role.ROLE_TOOL: "tool"}  # fmt: skip


def _arguments(text: str) -> object:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text  # what the model wrote, when it is not JSON


def input_messages(params: pb.CompletionParams) -> tuple[str, str | None]:
    """gen_ai.input.messages, and gen_ai.system_instructions (None without a system message), as JSON."""
    messages: list[dict[str, object]] = []
    system: list[dict[str, object]] = []
    for message in params.messages:
        parts: list[dict[str, object]] = []
        texts = [message.content] if message.content else []
        texts += [part.text for part in message.parts if not part.HasField("image")]
        if message.role == pb.Role.ROLE_TOOL:
            parts.append({"type": "tool_call_response", "id": message.tool_call_id, "response": "".join(texts)})
        else:
            parts += [{"type": "text", "content": text} for text in texts]
        for call in message.tool_calls:
            parts.append(
                {"type": "tool_call", "id": call.id, "name": call.name, "arguments": _arguments(call.arguments)}
            )
        if message.role == pb.Role.ROLE_SYSTEM:
            system += parts
        else:
            messages.append({"role": _ROLES.get(message.role, "user"), "parts": parts})
    return json.dumps(messages, ensure_ascii=False), json.dumps(system, ensure_ascii=False) if system else None


def output_messages(choices: Iterable[svc.Choice], reasons: Sequence[str]) -> str:
    """gen_ai.output.messages for the folded choices of a completion, as JSON."""
    messages: list[dict[str, object]] = []
    for choice, reason in zip(choices, reasons, strict=False):
        parts: list[dict[str, object]] = []
        if choice.content:
            parts.append({"type": "text", "content": choice.content})
        for call in choice.tool_calls:
            parts.append(
                {"type": "tool_call", "id": call.id, "name": call.name, "arguments": _arguments(call.arguments)}
            )
        messages.append({"role": "assistant", "parts": parts, "finish_reason": reason})
    return json.dumps(messages, ensure_ascii=False)
