"""The OpenAI chat-completions request we accept: JSON parsing and type checks, each failure naming its `param`.

Ranges (temperature 0-2, top_p 0-1, max_tokens >= 1, at most 4 stops, n 1-8, penalties -2..2, tool and schema
names, valid roles) are checked by the core, which applies them to gRPC callers too; here we check only what is
needed to build the proto: JSON types and shapes. Every field that can change the answer is either carried to the
core, where the serving provider honours it or refuses it with a 400 naming it, or refused here (logit_bias,
predicted outputs, audio, web search, legacy `functions`): never silently dropped. Fields that cannot change the
answer (store, metadata, service_tier, ...) and fields we do not know are accepted and ignored (logged at debug).

Images: a `data:` URL is decoded here, so neither the core nor a provider ever parses one; an http(s) URL is passed
on as a URL for the core to fetch or refuse. An image's `detail` is checked and then ignored: it trades resolution
against cost, and never changes the shape of the answer.
"""

from __future__ import annotations

import binascii
import json
import logging
from dataclasses import dataclass
from typing import Any

from bridge.openai.errors import OpenAIError, bad_request
from bridge.openai.values import optional_string, reject_constant, required_string

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_KNOWN = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stop", "n", "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "presence_penalty",
    "frequency_penalty", "user", "logprobs", "top_logprobs", "reasoning_effort",
}  # fmt: skip
# Accepted and ignored without a log line: they never change the answer.
_IGNORED = {"service_tier", "store", "metadata", "prompt_cache_key", "safety_identifier", "prompt_cache_retention"}
# Not implemented, and each would change the answer: refused unless null or its default value.
_REFUSED = {
    "logit_bias": "token biases",
    "prediction": "predicted outputs",
    "modalities": "output modalities other than text",
    "audio": "audio output",
    "web_search_options": "web search",
    "verbosity": "a verbosity other than 'medium'",
}
_DEFAULTS: dict[str, tuple[Any, ...]] = {"logit_bias": ({},), "modalities": (["text"],), "verbosity": ("medium",)}
_LEGACY = {"functions": "tools", "function_call": "tool_choice"}  # deprecated name -> its replacement
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_TOOL_CHOICES = {"none", "auto", "required"}
_EFFORTS = {"none", "minimal", "low", "medium", "high", "xhigh"}
_DETAILS = {"auto", "low", "high"}
_IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# The parsed request is plain slotted dataclasses, not frozen ones: a frozen dataclass pays an object.__setattr__
# per field, and every request builds one ChatRequest and one Message per message. Nothing mutates them.


@dataclass(slots=True)
class Image:
    """An image part: decoded bytes of a `data:` URL, or a remote http(s) URL the core resolves."""

    data: bytes = b""
    media_type: str = ""
    url: str = ""


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the caller sent it


@dataclass(slots=True)
class Message:
    role: str  # system, user, assistant or tool; "developer" is already folded into "system"
    content: str  # text, or "" when `parts` is used
    parts: tuple[str | Image, ...] = ()  # only when the content has an image: text and images in order
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(slots=True)
class Tool:
    name: str
    description: str
    parameters: str  # the JSON Schema as compact JSON text; "" when not given
    strict: bool | None


@dataclass(slots=True)
class ToolChoice:
    mode: str  # none, auto, required or function
    name: str = ""  # the function, with mode "function"


@dataclass(slots=True)
class ResponseFormat:
    type: str  # text, json_object or json_schema
    name: str = ""
    description: str = ""
    schema: str = ""  # compact JSON text
    strict: bool | None = None


@dataclass(slots=True)
class ChatRequest:
    """A type-checked chat-completions request."""

    model: str
    messages: tuple[Message, ...]
    stream: bool
    include_usage: bool
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    stop: tuple[str, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    n: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str = ""
    logprobs: bool = False
    top_logprobs: int | None = None
    reasoning_effort: str | None = None


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and type-check a request body; raise OpenAIError (400) naming the offending param."""
    try:
        data = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise bad_request(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        ) from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    for name in data.keys() - _KNOWN:
        _check_unknown(name, data[name])
    stream = _bool(data.get("stream"), "stream") or False
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("Invalid type for 'stream_options': expected an object.", param="stream_options")
    include_usage = bool(options and _bool(options.get("include_usage"), "stream_options.include_usage"))
    if options is not None and not stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          param="stream_options")  # fmt: skip
    max_tokens = data.get("max_completion_tokens")
    max_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_param = data.get("max_tokens"), "max_tokens"
    get = data.get
    return ChatRequest(
        model=_model(get("model")),
        messages=_messages(get("messages")),
        stream=stream,
        include_usage=include_usage,
        temperature=_number(get("temperature"), "temperature"),
        top_p=_number(get("top_p"), "top_p"),
        max_tokens=_int(max_tokens, max_param),
        stop=_stop(get("stop")),
        tools=_tools(get("tools")),
        tool_choice=_tool_choice(get("tool_choice")),
        parallel_tool_calls=_bool(get("parallel_tool_calls"), "parallel_tool_calls"),
        response_format=_response_format(get("response_format")),
        n=_int(get("n"), "n"),
        seed=_seed(get("seed")),
        presence_penalty=_number(get("presence_penalty"), "presence_penalty"),
        frequency_penalty=_number(get("frequency_penalty"), "frequency_penalty"),
        user=optional_string(get("user"), "user"),
        logprobs=_bool(get("logprobs"), "logprobs") or False,
        top_logprobs=_int(get("top_logprobs"), "top_logprobs"),
        reasoning_effort=_reasoning_effort(get("reasoning_effort")),
    )


def _check_unknown(name: str, value: Any) -> None:
    if name in _REFUSED:
        if value is not None and value not in _DEFAULTS.get(name, ()):
            raise bad_request(f"'{name}' ({_REFUSED[name]}) is not supported by ModelMax.", param=name)
    elif name in _LEGACY:
        if value is not None:
            raise bad_request(f"'{name}' is deprecated and not supported by ModelMax: use '{_LEGACY[name]}' instead.",
                              param=name)  # fmt: skip
    elif name not in _IGNORED:
        log.debug("ignoring unknown field %r", name)


def _model(value: Any) -> str:
    if value is None or value == "":
        raise bad_request("you must provide a model parameter", param="model")
    if not isinstance(value, str):
        raise bad_request("Invalid type for 'model': expected a string.", param="model")
    return value


def _messages(value: Any) -> tuple[Message, ...]:
    if value is None:
        raise bad_request("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(value, list):
        raise bad_request("Invalid type for 'messages': expected an array of objects.", param="messages")
    if not value:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    return tuple([_message(message, f"messages[{index}]") for index, message in enumerate(value)])


def _message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise bad_request(f"Invalid type for '{where}': expected an object.", param=where)
    raw_role = message.get("role")
    role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        if raw_role == "function":
            raise bad_request("Messages with role 'function' are deprecated and not supported by ModelMax: "
                              "use role 'tool' with a 'tool_call_id'.", param=f"{where}.role")  # fmt: skip
        raise bad_request(f"Invalid value for '{where}.role': expected one of 'system', 'developer', 'user', "
                          "'assistant', 'tool'.", param=f"{where}.role")  # fmt: skip
    content = message.get("content")
    if role == "assistant":
        if message.get("function_call") is not None:
            raise bad_request(f"'{where}.function_call' is deprecated and not supported by ModelMax: use "
                              "'tool_calls'.", param=f"{where}.function_call")  # fmt: skip
        tool_calls = _tool_calls(message.get("tool_calls"), where)
        if isinstance(content, str) and not tool_calls:
            return Message(role, content)
        text, parts = _content(content, role, where)
        return Message(role, text, parts, tool_calls)
    if message.get("tool_calls"):
        raise bad_request(f"Only assistant messages have 'tool_calls'; '{where}' has role '{raw_role}'.",
                          param=f"{where}.tool_calls")  # fmt: skip
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(f"Missing required parameter: '{where}.tool_call_id' (a string).",
                              param=f"{where}.tool_call_id")  # fmt: skip
        text, _ = _content(content, role, where)
        return Message(role, text, tool_call_id=call_id)
    if isinstance(content, str):
        return Message(role, content)
    text, parts = _content(content, role, where)
    return Message(role, text, parts)


def _content(content: Any, role: str, where: str) -> tuple[str, tuple[str | Image, ...]]:
    """The text of a message, or ("", parts) when it has an image; text-only part lists are joined."""
    if isinstance(content, str):
        return content, ()
    if content is None and role == "assistant":
        return "", ()
    if content is None:
        raise bad_request(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for '{where}.content': expected a string or an array of content parts.",
                          param=f"{where}.content")  # fmt: skip
    parts: list[str | Image] = []
    has_image = False
    for part_index, part in enumerate(content):
        param = f"{where}.content[{part_index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or (kind == "refusal" and role == "assistant"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise bad_request(f"Invalid type for '{param}.{kind}': expected a string.", param=f"{param}.{kind}")
            parts.append(text)
        elif kind == "image_url" and role == "user":
            parts.append(_image(part.get("image_url"), param))
            has_image = True
        else:
            raise _unsupported_part(part, kind, role, param)
    if not has_image:
        return "".join(parts), ()  # type: ignore[arg-type]  # every part is text
    return "", tuple(parts)


def _unsupported_part(part: Any, kind: Any, role: str, param: str) -> OpenAIError:
    if not isinstance(part, dict):
        return bad_request(f"Invalid type for '{param}': expected a content part object.", param=param)
    if kind == "image_url":
        return bad_request(f"Image content is only allowed in user messages, not in a '{role}' message.", param=param)
    if kind in ("input_audio", "file", "refusal"):
        allowed = "text and image_url" if role == "user" else "text"
        return bad_request(f"Content parts of type '{kind}' are not supported by ModelMax in '{role}' messages "
                           f"(only {allowed}).", param=param)  # fmt: skip
    return bad_request(f"Invalid value for '{param}.type': expected 'text' or 'image_url'.", param=param)


def _image(value: Any, param: str) -> Image:
    """Decode a `data:` URL (strict base64, an image type every provider takes), or keep an http(s) URL."""
    if not isinstance(value, dict):
        raise bad_request(f"Invalid type for '{param}.image_url': expected an object.", param=f"{param}.image_url")
    where = f"{param}.image_url.url"
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise bad_request(f"Missing required parameter: '{where}' (a string).", param=where)
    detail = value.get("detail")
    if detail is not None and (not isinstance(detail, str) or detail not in _DETAILS):
        raise bad_request(f"Invalid value for '{param}.image_url.detail': expected 'auto', 'low' or 'high'.",
                          param=f"{param}.image_url.detail")  # fmt: skip
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        media_type = media_type.lower()
        if not comma or encoding.lower() != "base64":
            raise bad_request(f"Invalid value for '{where}': a data URL must be base64-encoded "
                              "('data:image/png;base64,...').", param=where)  # fmt: skip
        if media_type not in _IMAGE_TYPES:
            raise bad_request(f"Invalid value for '{where}': the image type '{media_type}' is not supported; use "
                              "image/png, image/jpeg, image/gif or image/webp.", param=where)  # fmt: skip
        try:
            data = binascii.a2b_base64(payload, strict_mode=True)
        except ValueError:  # binascii.Error, or a non-ASCII payload
            data = b""
        if not data:
            raise bad_request(f"Invalid value for '{where}': the data URL is not valid base64 image data.",
                              param=where)  # fmt: skip
        return Image(data=data, media_type=media_type)
    if scheme == "https://" or scheme.startswith("http://"):
        return Image(url=url)
    raise bad_request(f"Invalid value for '{where}': expected a base64 'data:' URL or an http(s) URL.", param=where)


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request(f"Invalid type for '{where}.tool_calls': expected an array of tool calls.",
                          param=f"{where}.tool_calls")  # fmt: skip
    calls: list[ToolCall] = []
    for index, call in enumerate(value):
        param = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict):
            raise bad_request(f"Invalid type for '{param}': expected an object.", param=param)
        if call.get("type", "function") != "function":
            raise bad_request(f"Invalid value for '{param}.type': only 'function' tool calls are supported.",
                              param=f"{param}.type")  # fmt: skip
        call_id = required_string(call.get("id"), f"{param}.id")
        function = _object(call.get("function"), f"{param}.function")
        name = required_string(function.get("name"), f"{param}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise bad_request(f"Invalid type for '{param}.function.arguments': expected a string (the JSON text of "
                              "the arguments).", param=f"{param}.function.arguments")  # fmt: skip
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request("Invalid type for 'tools': expected an array of tools.", param="tools")
    tools: list[Tool] = []
    for index, tool in enumerate(value):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise bad_request(f"Invalid type for '{param}': expected an object.", param=param)
        if tool.get("type") != "function":
            raise bad_request(f"Invalid value for '{param}.type': only 'function' tools are supported by ModelMax.",
                              param=f"{param}.type")  # fmt: skip
        function = _object(tool.get("function"), f"{param}.function")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"Invalid type for '{param}.function.parameters': expected a JSON Schema object.",
                              param=f"{param}.function.parameters")  # fmt: skip
        tools.append(
            Tool(
                name=required_string(function.get("name"), f"{param}.function.name"),
                description=optional_string(function.get("description"), f"{param}.function.description"),
                parameters="" if parameters is None else _dumps(parameters),
                strict=_bool(function.get("strict"), f"{param}.function.strict"),
            )
        )
    return tuple(tools)


def _tool_choice(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _TOOL_CHOICES:
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return ToolChoice("function", name)
    raise bad_request("Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
                      '{"type": "function", "function": {"name": "..."}}.', param="tool_choice")  # fmt: skip


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("Invalid type for 'response_format': expected an object.", param="response_format")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise bad_request("Invalid value for 'response_format.type': expected 'text', 'json_object' or "
                          "'json_schema'.", param="response_format.type")  # fmt: skip
    spec = _object(value.get("json_schema"), "response_format.json_schema")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise bad_request("Invalid type for 'response_format.json_schema.schema': expected a JSON Schema object.",
                          param="response_format.json_schema.schema")  # fmt: skip
    return ResponseFormat(
        type=kind,
        name=required_string(spec.get("name"), "response_format.json_schema.name"),
        description=optional_string(spec.get("description"), "response_format.json_schema.description"),
        schema="" if schema is None else _dumps(schema),
        strict=_bool(spec.get("strict"), "response_format.json_schema.strict"),
    )


def _reasoning_effort(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value in _EFFORTS):
        return value
    raise bad_request("Invalid value for 'reasoning_effort': expected one of 'none', 'minimal', 'low', 'medium', "
                      "'high', 'xhigh'.", param="reasoning_effort")  # fmt: skip


def _object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        raise bad_request(f"Missing required parameter: '{param}'.", param=param)
    if not isinstance(value, dict):
        raise bad_request(f"Invalid type for '{param}': expected an object.", param=param)
    return value


def _number(value: Any, param: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"Invalid type for '{param}': expected a number.", param=param)
    return float(value)


def _int(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"Invalid type for '{param}': expected an integer.", param=param)
    if not -_INT32_MAX <= value <= _INT32_MAX:
        raise bad_request(f"Invalid value for '{param}': {value} is out of range.", param=param)
    return value


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("Invalid type for 'seed': expected an integer.", param="seed")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise bad_request(f"Invalid value for 'seed': {value} is not a 64-bit integer.", param="seed")
    return value


def _bool(value: Any, param: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"Invalid type for '{param}': expected a boolean.", param=param)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request("Invalid type for 'stop': expected a string or an array of strings.", param="stop")
    return tuple(value)
