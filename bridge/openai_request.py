"""The OpenAI chat-completions request we accept: JSON parsing and type checks, each failure naming its `param`.

Ranges (temperature 0-2, top_p 0-1, max_tokens >= 1, at most 4 stops, valid roles) are checked by the core, which
applies them to gRPC callers too; here we check only what is needed to build the proto: JSON types and shapes.
Fields the OpenAI SDKs may send that ModelMax does not implement yet are accepted and ignored (logged at debug),
except those whose silent loss would change the answer's shape (several choices, tool calls, structured output).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from bridge.errors import bad_request

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_KNOWN = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "n",
}  # fmt: skip
# Accepted but not implemented yet; they never change the shape of a correct answer.
_IGNORED = {
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "seed",
    "service_tier", "store", "metadata", "parallel_tool_calls", "prediction", "modalities", "audio",
    "reasoning_effort", "web_search_options", "tool_choice", "function_call", "safety_identifier",
    "prompt_cache_key", "verbosity",
}  # fmt: skip
# Not implemented, and ignoring them would return a different kind of answer than the caller asked for.
# (tool_choice and function_call mean nothing without tools, so they are ignored.)
_REFUSED = {"tools": "tool calling", "functions": "function calling", "response_format": "structured output"}
_ROLES = {"system", "developer", "user", "assistant"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A type-checked chat-completions request."""

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text); "developer" is already folded into "system"
    stream: bool
    include_usage: bool
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    stop: tuple[str, ...]


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and type-check a request body; raise OpenAIError (400) naming the offending param."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise bad_request(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        ) from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    for name in data.keys() - _KNOWN:
        if name in _REFUSED and data[name] not in (None, [], {"type": "text"}):
            raise bad_request(f"'{name}' ({_REFUSED[name]}) is not supported by ModelMax yet.", param=name)
        if name not in _IGNORED and name not in _REFUSED:
            log.debug("ignoring unsupported field %r", name)
    n = data.get("n")
    if n is not None and (_int(n, "n") != 1):
        raise bad_request("Only n=1 is supported: ModelMax returns one choice per request.", param="n")
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
    return ChatRequest(
        model=_model(data.get("model")),
        messages=_messages(data.get("messages")),
        stream=stream,
        include_usage=include_usage,
        temperature=_number(data.get("temperature"), "temperature"),
        top_p=_number(data.get("top_p"), "top_p"),
        max_tokens=_int(max_tokens, max_param),
        stop=_stop(data.get("stop")),
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _model(value: Any) -> str:
    if value is None or value == "":
        raise bad_request("you must provide a model parameter", param="model")
    if not isinstance(value, str):
        raise bad_request("Invalid type for 'model': expected a string.", param="model")
    return value


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        raise bad_request("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(value, list):
        raise bad_request("Invalid type for 'messages': expected an array of objects.", param="messages")
    if not value:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    out: list[tuple[str, str]] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"Invalid type for '{where}': expected an object.", param=where)
        role = message.get("role")
        if role not in _ROLES:
            if role in ("tool", "function"):
                raise bad_request(f"Messages with role '{role}' are not supported by ModelMax yet.",
                                  param=f"{where}.role")  # fmt: skip
            raise bad_request(
                f"Invalid value for '{where}.role': expected one of 'system', 'developer', 'user', 'assistant'.",
                param=f"{where}.role",
            )
        if message.get("tool_calls"):
            raise bad_request("Assistant messages with 'tool_calls' are not supported by ModelMax yet.",
                              param=f"{where}.tool_calls")  # fmt: skip
        out.append(("system" if role == "developer" else role, _content(message, role, where)))
    return tuple(out)


def _content(message: dict[str, Any], role: str, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if content is None:
        raise bad_request(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for '{where}.content': expected a string or an array of content parts.",
                          param=f"{where}.content")  # fmt: skip
    texts: list[str] = []
    for part_index, part in enumerate(content):
        param = f"{where}.content[{part_index}]"
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"Only text content parts are supported by ModelMax yet; '{param}' is not one.",
                              param=param)  # fmt: skip
        texts.append(part["text"])
    return "".join(texts)


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
