"""Pure translation between OpenAI shapes and the core's proto messages, including the wire bytes of chunks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bridge.errors import bad_request
from bridge.openai_request import ChatRequest, Image, Message, ResponseFormat, Tool
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

_ROLE = {
    "system": pb.Role.ROLE_SYSTEM,
    "user": pb.Role.ROLE_USER,
    "assistant": pb.Role.ROLE_ASSISTANT,
    "tool": pb.Role.ROLE_TOOL,
}
_TOOL_CHOICE = {
    "none": pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE,
    "auto": pb.ToolChoiceMode.TOOL_CHOICE_MODE_AUTO,
    "required": pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED,
    "function": pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION,
}
_RESPONSE_FORMAT = {
    "text": pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_EFFORT = {
    "none": pb.ReasoningEffort.REASONING_EFFORT_NONE,
    "minimal": pb.ReasoningEffort.REASONING_EFFORT_MINIMAL,
    "low": pb.ReasoningEffort.REASONING_EFFORT_LOW,
    "medium": pb.ReasoningEffort.REASONING_EFFORT_MEDIUM,
    "high": pb.ReasoningEffort.REASONING_EFFORT_HIGH,
    "xhigh": pb.ReasoningEffort.REASONING_EFFORT_XHIGH,
}
FINISH_REASON: dict[int, str] = {
    pb.FinishReason.FINISH_REASON_STOP: "stop",
    pb.FinishReason.FINISH_REASON_LENGTH: "length",
    pb.FinishReason.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FinishReason.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_params(request: ChatRequest) -> pb.CompletionParams:
    """The whole request as CompletionParams; a field the caller did not send stays unset (None is unset).

    The fields most requests leave out are set only when present: cheaper than passing the constructor a dozen
    Nones on every request.
    """
    try:
        params = pb.CompletionParams(
            model=request.model,
            messages=[_message(message) for message in request.messages],
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            stop_sequences=request.stop,
            include_usage=request.include_usage,
        )
        if request.tools:
            params.tools.extend([_tool(tool) for tool in request.tools])
        if request.tool_choice is not None:
            params.tool_choice.mode = _TOOL_CHOICE[request.tool_choice.mode]
            params.tool_choice.name = request.tool_choice.name
        if request.response_format is not None:
            params.response_format.CopyFrom(_response_format(request.response_format))
        if request.user:
            params.user = request.user
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\\ud800"), which no proto string can hold
        raise bad_request("The request contains a string that is not valid Unicode (a lone surrogate).") from None
    if request.parallel_tool_calls is not None:
        params.parallel_tool_calls = request.parallel_tool_calls
    if request.n is not None:
        params.choice_count = request.n
    if request.seed is not None:
        params.seed = request.seed
    if request.presence_penalty is not None:
        params.presence_penalty = request.presence_penalty
    if request.frequency_penalty is not None:
        params.frequency_penalty = request.frequency_penalty
    if request.logprobs:
        params.logprobs = True
    if request.top_logprobs is not None:
        params.top_logprobs = request.top_logprobs
    if request.reasoning_effort is not None:
        params.reasoning_effort = _EFFORT[request.reasoning_effort]
    return params


def _message(message: Message) -> pb.Message:
    if not (message.parts or message.tool_calls or message.tool_call_id):
        return pb.Message(role=_ROLE[message.role], content=message.content)  # the common case
    return pb.Message(
        role=_ROLE[message.role],
        content=message.content,
        parts=[_part(part) for part in message.parts],
        tool_calls=[pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments) for call in message.tool_calls],
        tool_call_id=message.tool_call_id,
    )


def _part(part: str | Image) -> pb.ContentPart:
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    return pb.ContentPart(image=pb.Image(data=part.data, media_type=part.media_type, url=part.url))


def _tool(tool: Tool) -> pb.Tool:
    return pb.Tool(name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict)


def _response_format(response_format: ResponseFormat) -> pb.ResponseFormat:
    return pb.ResponseFormat(
        type=_RESPONSE_FORMAT[response_format.type],
        name=response_format.name,
        description=response_format.description,
        schema=response_format.schema,
        strict=response_format.strict,
    )


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
    """A `chat.completion` object, exactly the fields OpenAI sends; one choice per choice the core returned."""
    choices = [
        _choice_json(0, response.content, response.reasoning_content, response.tool_calls, response.finish_reason)
    ]
    for choice in response.additional_choices:
        choices.append(
            _choice_json(
                choice.index, choice.content, choice.reasoning_content, choice.tool_calls, choice.finish_reason
            )
        )
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": choices,
        "usage": usage_json(response.usage),
        "system_fingerprint": None,
    }


def _choice_json(
    index: int, content: str, reasoning: str, tool_calls: Sequence[pb.ToolCall], finish_reason: int
) -> dict[str, Any]:
    # OpenAI's content is null on a message that only called tools.
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else ""), "refusal": None}
    if tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in tool_calls
        ]
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"index": index, "message": message, "logprobs": None, "finish_reason": FINISH_REASON[finish_reason]}


def model_json(model: svc.ModelInfo) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}


class ChunkEncoder:
    """Encodes one stream's `chat.completion.chunk` events as SSE bytes.

    The bytes shared by every chunk of a choice (id, created, model, the choice's index) are serialised once per
    stream, so each token costs one JSON-encoded string and a few concatenations. With several choices (`n`), each
    choice has its own role chunk first and its own finish chunk last, as OpenAI streams them.
    """

    def __init__(self, start: svc.CompletionStart, include_usage: bool, choices: int = 1) -> None:
        """`choices` is the request's choice_count; 0 (unset) means one."""
        head = _dumps({"id": start.id, "object": "chat.completion.chunk", "created": start.created,
                       "model": start.model, "system_fingerprint": None})  # fmt: skip
        self._head = head[:-1]  # without the closing brace
        self._usage_null = ',"usage":null' if include_usage else ""
        self._tail = self._ending("null")
        self._opening = [self._open(index) for index in range(max(1, choices))]

    def _open(self, index: int) -> str:
        return f'data: {self._head},"choices":[{{"index":{index},"delta":'

    def _ending(self, finish_reason: str) -> str:
        return f',"logprobs":null,"finish_reason":{finish_reason}}}]{self._usage_null}}}\n\n'

    def _delta(self, choice: int, delta: str) -> bytes:
        opening = self._opening[choice] if 0 <= choice < len(self._opening) else self._open(choice)
        return (opening + delta + self._tail).encode()

    def role(self) -> bytes:
        """The first chunk of every choice."""
        return b"".join(self._delta(index, '{"role":"assistant","content":""}') for index in range(len(self._opening)))

    def content(self, text: str, choice: int = 0) -> bytes:
        return self._delta(choice, '{"content":' + _dumps(text) + "}")

    def reasoning(self, text: str, choice: int = 0) -> bytes:
        return self._delta(choice, '{"reasoning_content":' + _dumps(text) + "}")

    def tool_call(self, delta: svc.ToolCallDelta) -> bytes:
        """A piece of a tool call: the first names the call (id, type, name), later ones only add arguments."""
        if delta.id or delta.name:
            call = (f'{{"index":{delta.index},"id":{_dumps(delta.id)},"type":"function","function":'
                    f'{{"name":{_dumps(delta.name)},"arguments":{_dumps(delta.arguments)}}}}}')  # fmt: skip
        else:
            call = f'{{"index":{delta.index},"function":{{"arguments":{_dumps(delta.arguments)}}}}}'
        return self._delta(delta.choice_index, '{"tool_calls":[' + call + "]}")

    def finish(self, finish: svc.CompletionFinish) -> bytes:
        """The last chunk of every choice: choice 0's reason, then those of choices 1, 2, ..."""
        chunk = self._finish(0, finish.finish_reason)
        for index, reason in enumerate(finish.additional_finish_reasons, 1):
            chunk += self._finish(index, reason)
        return chunk

    def _finish(self, choice: int, reason: int) -> bytes:
        opening = self._opening[choice] if choice < len(self._opening) else self._open(choice)
        return (opening + "{}" + self._ending(f'"{FINISH_REASON[reason]}"')).encode()

    def usage(self, usage: pb.Usage) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{_dumps(usage_json(usage))}}}\n\n'.encode()


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
