"""Checks every CompletionParams before a provider sees it; internal gRPC callers get the same rules as HTTP."""

from __future__ import annotations

import math

from modelmax.v1 import completion_pb2 as pb
from services.errors import invalid_request

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
