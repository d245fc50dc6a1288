"""Pure translation between OpenAI chat shapes and the core's proto: the request to CompletionParams, and a whole
completion to its `chat.completion` JSON."""

from __future__ import annotations

from typing import Any

from bridge.openai.chat.request import ChatRequest, Image, Message, ResponseFormat, Tool
from bridge.openai.errors import bad_request
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


def completion_json(response: svc.CreateCompletionResponse, completion_id: str) -> dict[str, Any]:
    """A `chat.completion` object, exactly the fields OpenAI sends; one choice per choice the core returned."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": [_choice_json(choice) for choice in response.choices],
        "usage": usage_json(response.usage),
        "system_fingerprint": None,
    }


def _choice_json(choice: svc.Choice) -> dict[str, Any]:
    tool_calls = choice.tool_calls
    # OpenAI's content is null on a message that only called tools.
    message: dict[str, Any] = {"role": "assistant", "content": choice.content or (None if tool_calls else ""),
                               "refusal": None}  # fmt: skip
    if tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in tool_calls
        ]
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    return {"index": choice.index, "message": message, "logprobs": None,
            "finish_reason": FINISH_REASON[choice.finish_reason]}  # fmt: skip
