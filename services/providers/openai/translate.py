"""CompletionParams as an OpenAI chat-completions request body, for the `openai` provider: SDK- and I/O-free.

Only what the caller set is sent, in OpenAI's own shape: tools and tool choice, structured output, images (as
`data:` URLs rebuilt from the bytes the core holds), tool calls and tool results in the history, and every
sampling parameter. The upstream is always asked to stream, with usage: the core folds the stream for callers that
did not ask for one.

Two Message fields have no place in chat completions and are not sent: `is_error` (an OpenAI tool message has no
error flag; its content, the error text, says it) and `reasoning` (chat completions takes no reasoning back).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from modelmax.v1 import completion_pb2 as pb

_ROLE_NAMES = {
    pb.Role.ROLE_SYSTEM: "system",
    pb.Role.ROLE_USER: "user",
    pb.Role.ROLE_ASSISTANT: "assistant",
    pb.Role.ROLE_TOOL: "tool",
}
_TOOL_CHOICES = {
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE: "none",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED: "required",
}


# Enum values read on every request, looked up once (the enum wrappers' attribute access is Python-level).
_CHOICE_FUNCTION = pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION
_NO_FORMAT = pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_UNSPECIFIED
_NO_EFFORT = pb.ReasoningEffort.REASONING_EFFORT_UNSPECIFIED


def request_body(model: str, params: pb.CompletionParams) -> dict[str, Any]:
    """The upstream request in OpenAI's shape: its own model name, and only the parameters the caller set."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in params.messages],
        "stream": True,  # always: the core folds the stream for callers that did not ask for one
        "stream_options": {"include_usage": True},
    }
    for name in ("temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty"):
        if params.HasField(name):
            body[name] = getattr(params, name)
    if params.stop_sequences:
        body["stop"] = list(params.stop_sequences)
    if params.HasField("choice_count"):
        body["n"] = params.choice_count
    if params.tools:
        body["tools"] = [_tool(tool) for tool in params.tools]
    choice = _TOOL_CHOICES.get(params.tool_choice.mode)
    if choice is not None:
        body["tool_choice"] = choice
    elif params.tool_choice.mode == _CHOICE_FUNCTION:
        body["tool_choice"] = {"type": "function", "function": {"name": params.tool_choice.name}}
    if params.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = params.parallel_tool_calls
    if params.response_format.type != _NO_FORMAT:
        body["response_format"] = _response_format(params.response_format)
    if params.user:
        body["user"] = params.user
    if params.reasoning_effort != _NO_EFFORT:
        body["reasoning_effort"] = (
            pb.ReasoningEffort.Name(params.reasoning_effort).removeprefix("REASONING_EFFORT_").lower()
        )
    return body


def _message(message: pb.Message) -> dict[str, Any]:
    # `is_error` and `reasoning` are left out (see the module doc): a failed tool's content is its error text.
    out: dict[str, Any] = {"role": _ROLE_NAMES[message.role]}
    if message.parts:
        out["content"] = [_part(part) for part in message.parts]
    elif message.content or not message.tool_calls:
        out["content"] = message.content
    else:
        out["content"] = None  # an assistant turn that only called tools, as OpenAI itself returns it
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _part(part: pb.ContentPart) -> dict[str, Any]:
    if part.WhichOneof("kind") == "text":
        return {"type": "text", "text": part.text}
    image = part.image
    if image.data:
        url = f"data:{image.media_type};base64,{base64.b64encode(image.data).decode('ascii')}"
    else:
        url = image.url  # only reached by a caller other than the core, which fetches URLs first
    return {"type": "image_url", "image_url": {"url": url}}


def _tool(tool: pb.Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters:
        function["parameters"] = json.loads(tool.parameters)  # a JSON object: the core checked it
    if tool.HasField("strict"):
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _response_format(response_format: pb.ResponseFormat) -> dict[str, Any]:
    kind = response_format.type
    if kind == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_TEXT:
        return {"type": "text"}
    if kind == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": response_format.name}
    if response_format.description:
        schema["description"] = response_format.description
    schema["schema"] = json.loads(response_format.schema)  # a JSON object: the core checked it
    if response_format.HasField("strict"):
        schema["strict"] = response_format.strict
    return {"type": "json_schema", "json_schema": schema}
