"""Pure translation between OpenAI shapes and the core's proto messages, including the wire bytes of chunks."""

from __future__ import annotations

import json
from typing import Any

from bridge.openai_request import ChatRequest
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

_ROLE = {"system": pb.Role.ROLE_SYSTEM, "user": pb.Role.ROLE_USER, "assistant": pb.Role.ROLE_ASSISTANT}
FINISH_REASON: dict[int, str] = {
    pb.FinishReason.FINISH_REASON_STOP: "stop",
    pb.FinishReason.FINISH_REASON_LENGTH: "length",
    pb.FinishReason.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FinishReason.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_params(request: ChatRequest) -> pb.CompletionParams:
    params = pb.CompletionParams(
        model=request.model,
        messages=[pb.Message(role=_ROLE[role], content=text) for role, text in request.messages],
        stop_sequences=request.stop,
        include_usage=request.include_usage,
    )
    if request.temperature is not None:
        params.temperature = request.temperature
    if request.top_p is not None:
        params.top_p = request.top_p
    if request.max_tokens is not None:
        params.max_tokens = request.max_tokens
    return params


def usage_json(usage: pb.Usage) -> dict[str, Any]:
    """OpenAI's usage object; the details appear only when the provider reported them."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.HasField("cached_tokens"):
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.HasField("reasoning_tokens"):
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def completion_json(response: svc.CreateCompletionResponse) -> dict[str, Any]:
    """A `chat.completion` object, exactly the fields OpenAI sends."""
    message: dict[str, Any] = {"role": "assistant", "content": response.content, "refusal": None}
    if response.reasoning_content:
        message["reasoning_content"] = response.reasoning_content
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASON[response.finish_reason],
            }
        ],
        "usage": usage_json(response.usage),
        "system_fingerprint": None,
    }


def model_json(model: svc.ModelInfo) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}


class ChunkEncoder:
    """Encodes one stream's `chat.completion.chunk` events as SSE bytes.

    The fields shared by every chunk (id, created, model) are serialised once per stream, so each token costs one
    JSON-encoded string and a few concatenations.
    """

    def __init__(self, start: svc.CompletionStart, include_usage: bool) -> None:
        head = _dumps({"id": start.id, "object": "chat.completion.chunk", "created": start.created,
                       "model": start.model, "system_fingerprint": None})  # fmt: skip
        self._head = head[:-1]  # without the closing brace
        self._usage_null = ',"usage":null' if include_usage else ""

    def _choice(self, delta: str, finish_reason: str) -> bytes:
        return (
            f'data: {self._head},"choices":[{{"index":0,"delta":{delta},"logprobs":null,'
            f'"finish_reason":{finish_reason}}}]{self._usage_null}}}\n\n'
        ).encode()

    def role(self) -> bytes:
        return self._choice('{"role":"assistant","content":""}', "null")

    def content(self, text: str) -> bytes:
        return self._choice(f'{{"content":{_dumps(text)}}}', "null")

    def reasoning(self, text: str) -> bytes:
        return self._choice(f'{{"reasoning_content":{_dumps(text)}}}', "null")

    def finish(self, reason: int) -> bytes:
        return self._choice("{}", f'"{FINISH_REASON[reason]}"')

    def usage(self, usage: pb.Usage) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{_dumps(usage_json(usage))}}}\n\n'.encode()


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
