"""A whole completion as Anthropic's Message object, and what the streamed and whole answers share: stop reasons,
usage, content blocks.

Stop reasons come from the core's finish reasons, never guessed: a stop with the matched sequence known is
`stop_sequence`, any other stop `end_turn`, the token limit `max_tokens`, tool calls `tool_use`, a content filter
`refusal`. A finish without a reason is an error, not an `end_turn`.

Usage: Anthropic's `input_tokens` excludes cache reads (the total input is the three input fields added up), so it
is the prompt tokens minus the cached ones. The cache fields are null when the provider did not report them: the
core carries no cache-write count, and a cache read is known only where the provider reports one.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from bridge.anthropic.errors import AnthropicError
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

_F = pb.FinishReason
STOP_REASON: dict[int, str] = {
    _F.FINISH_REASON_STOP: "end_turn",
    _F.FINISH_REASON_LENGTH: "max_tokens",
    _F.FINISH_REASON_TOOL_CALLS: "tool_use",
    _F.FINISH_REASON_CONTENT_FILTER: "refusal",
}


def stop_of(finish_reason: int, stop_sequence: str) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a choice's finish; AnthropicError (502) for one the core left unset."""
    reason = STOP_REASON.get(finish_reason)
    if reason is None:
        raise AnthropicError(502, "The model's answer ended without a stop reason.", "api_error")
    if reason == "end_turn" and stop_sequence:
        return "stop_sequence", stop_sequence
    return reason, None


def usage_json(usage: pb.Usage) -> dict[str, int | None]:
    cached = usage.cached_tokens if usage.HasField("cached_tokens") else None
    return {
        "input_tokens": usage.prompt_tokens - (cached or 0),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": cached,
    }


def redacted_data(redacted: bytes) -> str:
    """A redacted reasoning block's `data`: its opaque bytes as base64, given back the same way (request.py)."""
    return base64.b64encode(redacted).decode("ascii")


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the `input` object of a tool_use block; no arguments is {}."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise AnthropicError(502, "The model called a tool with arguments that are not a JSON object.", "api_error")
    return value


def message_json(response: svc.CreateCompletionResponse, message_id: str, show_thinking: bool) -> dict[str, Any]:
    """The Message object: thinking blocks, the text, then the tool calls, as Anthropic orders them."""
    if not response.choices:
        raise AnthropicError(502, "The gateway core sent an answer without a choice.", "api_error")
    choice = response.choices[0]  # a Messages request never asks for several
    content: list[dict[str, Any]] = []
    blocks: Sequence[pb.Reasoning] = choice.reasoning_blocks
    if not blocks and choice.reasoning:  # a provider that gives reasoning text only
        blocks = [pb.Reasoning(text=choice.reasoning)]
    for block in blocks:
        if block.redacted:
            content.append({"type": "redacted_thinking", "data": redacted_data(block.redacted)})
        else:
            text = block.text if show_thinking else ""
            content.append({"type": "thinking", "thinking": text, "signature": block.signature})
    if choice.content:
        content.append({"type": "text", "text": choice.content})
    for call in choice.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call.arguments)})
    stop_reason, stop_sequence = stop_of(choice.finish_reason, choice.stop_sequence)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_json(response.usage),
    }
