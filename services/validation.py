"""Checks every CompletionParams before a provider sees it; internal gRPC callers get the same rules as HTTP."""

from __future__ import annotations

import math

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError, invalid_request

MAX_STOP_SEQUENCES = 4


def check_params(params: pb.CompletionParams) -> None:
    """Raise GatewayError(INVALID_REQUEST) naming the offending OpenAI parameter."""
    if not params.model:
        raise invalid_request("you must provide a model parameter", param="model")
    if not params.messages:
        raise invalid_request("'messages' must contain at least one message", param="messages")
    for index, message in enumerate(params.messages):
        if message.role == pb.Role.ROLE_UNSPECIFIED or message.role not in pb.Role.values():
            raise invalid_request("role must be one of 'system', 'user', 'assistant'", param=f"messages[{index}].role")
    if params.HasField("temperature") and not (0.0 <= params.temperature <= 2.0):
        raise invalid_request(f"{params.temperature} is not in [0, 2]", param="temperature")
    if params.HasField("top_p") and not (0.0 <= params.top_p <= 1.0):
        raise invalid_request(f"{params.top_p} is not in [0, 1]", param="top_p")
    if params.HasField("temperature") and math.isnan(params.temperature):
        raise invalid_request("temperature must be a number", param="temperature")
    if params.HasField("top_p") and math.isnan(params.top_p):
        raise invalid_request("top_p must be a number", param="top_p")
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise invalid_request(f"max_tokens must be at least 1, got {params.max_tokens}", param="max_tokens")
    if len(params.stop_sequences) > MAX_STOP_SEQUENCES:
        raise invalid_request(
            f"'stop' accepts at most {MAX_STOP_SEQUENCES} sequences, got {len(params.stop_sequences)}", param="stop"
        )
    if any(not stop for stop in params.stop_sequences):
        raise invalid_request("stop sequences must not be empty", param="stop")


# The optional features of a request, by the OpenAI parameter that asks for each. A provider declares the ones it
# honours; any other one a request uses is refused with a 400 naming it (check_supported), never silently dropped.
FEATURES = (
    "tools",  # tools, tool_choice, tool calls and tool results in the history
    "parallel_tool_calls",  # parallel_tool_calls=false (true is every tool-calling provider's default)
    "response_format",  # json_object / json_schema
    "n",  # more than one choice
    "seed",
    "presence_penalty",  # non-zero (zero is the default: honoured everywhere)
    "frequency_penalty",  # non-zero
    "logprobs",  # logprobs=true or top_logprobs
    "reasoning_effort",
    "images",  # image content parts
)


def requested_features(params: pb.CompletionParams) -> dict[str, str]:
    """The optional features this request uses: feature name -> the `param` a refusal names."""
    used: dict[str, str] = {}
    if params.tools or params.HasField("tool_choice"):
        used["tools"] = "tools"
    for index, message in enumerate(params.messages):
        if "tools" not in used and (message.tool_calls or message.role == pb.Role.ROLE_TOOL):
            used["tools"] = f"messages[{index}]"
        if "images" not in used:
            for part_index, part in enumerate(message.parts):
                if part.HasField("image"):
                    used["images"] = f"messages[{index}].content[{part_index}]"
                    break
    if params.HasField("parallel_tool_calls") and not params.parallel_tool_calls:
        used["parallel_tool_calls"] = "parallel_tool_calls"
    if params.response_format.type in (
        pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
        pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    ):
        used["response_format"] = "response_format"
    if params.HasField("choice_count") and params.choice_count > 1:
        used["n"] = "n"
    if params.HasField("seed"):
        used["seed"] = "seed"
    for name in ("presence_penalty", "frequency_penalty"):
        if params.HasField(name) and getattr(params, name) != 0:
            used[name] = name
    if params.logprobs or (params.HasField("top_logprobs") and params.top_logprobs > 0):
        used["logprobs"] = "logprobs" if params.logprobs else "top_logprobs"
    if params.reasoning_effort != pb.ReasoningEffort.REASONING_EFFORT_UNSPECIFIED:
        used["reasoning_effort"] = "reasoning_effort"
    return used


def check_supported(params: pb.CompletionParams, supported: frozenset[str], *, provider: str) -> None:
    """Refuse (400, INVALID_REQUEST naming the param) the first feature the request uses that `supported` lacks.

    `supported` holds names from FEATURES; `provider` is the provider kind, for the error's metadata.
    """
    for feature, param in requested_features(params).items():
        if feature not in supported:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_INVALID_REQUEST,
                f"'{param}' ({_FEATURE_WORDS[feature]}) is not supported by the model '{params.model}'.",
                param=param,
                provider=provider,
            )


_FEATURE_WORDS = {
    "tools": "tool calling",
    "parallel_tool_calls": "disabling parallel tool calls",
    "response_format": "structured output",
    "n": "several choices",
    "seed": "a sampling seed",
    "presence_penalty": "a presence penalty",
    "frequency_penalty": "a frequency penalty",
    "logprobs": "log probabilities",
    "reasoning_effort": "a reasoning effort",
    "images": "image input",
}
