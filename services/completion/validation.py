"""Checks every CompletionParams before a provider sees it; internal gRPC callers get the same rules as HTTP.

Each refusal is a GatewayError(INVALID_REQUEST) whose `field` names the offending field by its proto path
(`messages[2].tool_call_id`, `tools[0].name`, `stop_sequences`), and whose message quotes that path ('tools[0].name').
Each dialect at the edge maps the path to its own parameter names, in the field and in the message, so an OpenAI
client sees the same 400 from the gateway as from OpenAI. The common request (a few text messages, no tools) takes
one cheap pass. Which optional features a provider honours is data (`Provider.supported`); `check_supported` refuses
the rest, once, before dispatch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError, invalid_request, shown
from services.providers import FEATURES

MAX_STOP_SEQUENCES = 4
MAX_MODEL_NAME = 256  # characters; the catalog's names are at most 128, and a name is echoed nowhere past this
MAX_USER = 256  # characters: OpenAI's `user` is a short id for the caller's end user (it goes into the log line)
MAX_STOP_LENGTH = 512  # characters of one stop sequence
MAX_TOOLS = 128  # OpenAI's limit
MAX_CHOICES = 8  # the gateway's own bound on `n` (OpenAI allows 128; eight answers is already eight times the cost)
MAX_TOP_LOGPROBS = 20
IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # tool and json_schema names

_ROLES = frozenset({pb.Role.ROLE_SYSTEM, pb.Role.ROLE_USER, pb.Role.ROLE_ASSISTANT, pb.Role.ROLE_TOOL})
# Enum values read on every request, looked up once: `pb.Role.ROLE_TOOL` goes through a Python-level __getattr__.
_ASSISTANT, _TOOL = pb.Role.ROLE_ASSISTANT, pb.Role.ROLE_TOOL
_STRUCTURED = frozenset(
    {pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT, pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA}
)
_NO_EFFORT = pb.ReasoningEffort.REASONING_EFFORT_UNSPECIFIED
_TOOL_CHOICE_MODES = frozenset(pb.ToolChoiceMode.values())
_RESPONSE_FORMAT_TYPES = frozenset(pb.ResponseFormatType.values())
_REASONING_EFFORTS = frozenset(pb.ReasoningEffort.values())


def check_params(params: pb.CompletionParams) -> None:
    """Raise GatewayError(INVALID_REQUEST) naming the offending field by its proto path."""
    if len(params.model) > MAX_MODEL_NAME:  # first: nothing after this may quote an over-long name
        raise invalid_request(_too_long("model", len(params.model), MAX_MODEL_NAME), field="model")
    if not params.model:
        raise invalid_request("you must provide a model parameter", field="model")
    if len(params.user) > MAX_USER:
        raise invalid_request(_too_long("user", len(params.user), MAX_USER), field="user")
    if not params.messages:
        raise invalid_request("'messages' must contain at least one message", field="messages")
    _check_messages(params.messages)
    if params.HasField("temperature") and not (0.0 <= params.temperature <= 2.0):
        raise invalid_request(f"{params.temperature} is not in [0, 2]", field="temperature")
    if params.HasField("top_p") and not (0.0 <= params.top_p <= 1.0):
        raise invalid_request(f"{params.top_p} is not in [0, 1]", field="top_p")
    if params.HasField("temperature") and math.isnan(params.temperature):
        raise invalid_request("temperature must be a number", field="temperature")
    if params.HasField("top_p") and math.isnan(params.top_p):
        raise invalid_request("top_p must be a number", field="top_p")
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise invalid_request(f"max_tokens must be at least 1, got {params.max_tokens}", field="max_tokens")
    if len(params.stop_sequences) > MAX_STOP_SEQUENCES:
        raise invalid_request(
            f"'stop_sequences' accepts at most {MAX_STOP_SEQUENCES} sequences, got {len(params.stop_sequences)}",
            field="stop_sequences",
        )
    for stop in params.stop_sequences:
        if not stop:
            raise invalid_request("stop sequences must not be empty", field="stop_sequences")
        if len(stop) > MAX_STOP_LENGTH:
            raise invalid_request(_too_long("stop_sequences", len(stop), MAX_STOP_LENGTH), field="stop_sequences")
    if params.tools or params.HasField("tool_choice"):
        _check_tools(params)
    if params.HasField("response_format"):
        _check_response_format(params.response_format)
    if params.HasField("choice_count"):
        _check_range("choice_count", params.choice_count, 1, MAX_CHOICES)
    for name in ("presence_penalty", "frequency_penalty"):
        if params.HasField(name):
            value = getattr(params, name)
            if math.isnan(value) or not (-2.0 <= value <= 2.0):
                raise invalid_request(f"Invalid '{name}': {value} is not a number in [-2, 2].", field=name)
    if params.HasField("top_logprobs"):
        _check_range("top_logprobs", params.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if not params.logprobs:
            raise invalid_request(
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
                field="top_logprobs",
            )
    if params.reasoning_effort not in _REASONING_EFFORTS:
        raise invalid_request(
            "Invalid value for 'reasoning_effort': supported values are 'none', 'minimal', 'low', 'medium', "
            "'high' and 'xhigh'.",
            field="reasoning_effort",
        )
    if params.HasField("top_k") and params.top_k < 1:
        raise invalid_request(_below_one("top_k", params.top_k), field="top_k")
    if params.HasField("reasoning_budget_tokens"):
        _check_reasoning_budget(params)


def _check_reasoning_budget(params: pb.CompletionParams) -> None:
    """A budget of at least one token, and never beside an effort: the two ask for the same setting two ways."""
    if params.reasoning_budget_tokens < 1:
        raise invalid_request(
            _below_one("reasoning_budget_tokens", params.reasoning_budget_tokens), field="reasoning_budget_tokens"
        )
    if params.reasoning_effort != _NO_EFFORT:
        raise invalid_request(
            "Invalid parameter: set either 'reasoning_budget_tokens' or 'reasoning_effort', not both.",
            field="reasoning_budget_tokens",
        )


def _check_messages(messages: Sequence[pb.Message]) -> None:
    """Roles, content shapes, images, and the tool-call conversation rules, in one pass over the messages."""
    answerable: set[str] | None = None  # ids of the tool calls the following tool messages may answer
    for index, message in enumerate(messages):
        role = message.role
        if role not in _ROLES:
            raise invalid_request(
                "Invalid value for 'role': supported values are 'system', 'user', 'assistant' and 'tool'.",
                field=f"messages[{index}].role",
            )
        if message.parts:
            _check_parts(message, index)
        if message.is_error and role != _TOOL:
            raise invalid_request(
                "Invalid parameter: only messages with role 'tool' can have 'is_error'.",
                field=f"messages[{index}].is_error",
            )
        if message.reasoning:
            _check_reasoning(message, index)
        if message.tool_calls:
            if role != _ASSISTANT:
                raise invalid_request(
                    "Invalid parameter: only messages with role 'assistant' can have 'tool_calls'.",
                    field=f"messages[{index}].tool_calls",
                )
            answerable = _tool_call_ids(message.tool_calls, index)
        elif role == _TOOL:
            _check_tool_message(message, index, answerable)
        else:
            answerable = None  # tool messages answer only the assistant message right before them


def _check_reasoning(message: pb.Message, index: int) -> None:
    """Reasoning given back only on assistant turns; each block is text (with its signature) or redacted bytes."""
    if message.role != _ASSISTANT:
        raise invalid_request(
            "Invalid parameter: only messages with role 'assistant' can have 'reasoning'.",
            field=f"messages[{index}].reasoning",
        )
    for block_index, block in enumerate(message.reasoning):
        if bool(block.redacted) == bool(block.text or block.signature):
            raise invalid_request(
                "Invalid reasoning block: give either its text (and signature) or its redacted bytes.",
                field=f"messages[{index}].reasoning[{block_index}]",
            )


def _check_parts(message: pb.Message, index: int) -> None:
    if message.content:
        raise invalid_request(
            "Invalid message: set either 'content' as text or 'content' as a list of parts, not both.",
            field=f"messages[{index}].content",
        )
    for part_index, part in enumerate(message.parts):
        param = f"messages[{index}].parts[{part_index}]"
        kind = part.WhichOneof("kind")
        if kind is None:
            raise invalid_request("Invalid content part: it holds neither text nor an image.", field=param)
        if kind == "text":
            continue
        if message.role != pb.Role.ROLE_USER:
            raise invalid_request(
                "Image URLs are only allowed for messages with role 'user', but this message with role "
                f"'{pb.Role.Name(message.role).removeprefix('ROLE_').lower()}' contains an image URL.",
                field=param,
            )
        image = part.image
        if bool(image.data) == bool(image.url):
            raise invalid_request("Invalid image: give exactly one of its bytes (data) or a URL.", field=param)
        if image.data and image.media_type not in IMAGE_MEDIA_TYPES:
            raise invalid_request(
                f"Invalid image: the media type {shown(image.media_type)!r} is not supported; use one of "
                "'image/png', 'image/jpeg', 'image/gif' or 'image/webp'.",
                field=param,
            )


def _tool_call_ids(calls: Sequence[pb.ToolCall], index: int) -> set[str]:
    ids: set[str] = set()
    for call_index, call in enumerate(calls):
        param = f"messages[{index}].tool_calls[{call_index}]"
        if not call.id:
            raise invalid_request(f"Missing required parameter: '{param}.id'.", field=f"{param}.id")
        if not call.name:
            raise invalid_request(f"Missing required parameter: '{param}.name'.", field=f"{param}.name")
        ids.add(call.id)
    return ids


def _check_tool_message(message: pb.Message, index: int, answerable: set[str] | None) -> None:
    if not message.tool_call_id:
        raise invalid_request(
            f"Missing required parameter: 'messages[{index}].tool_call_id'.", field=f"messages[{index}].tool_call_id"
        )
    if answerable is None:
        raise invalid_request(
            "Invalid parameter: messages with role 'tool' must be a response to a preceding message with 'tool_calls'.",
            field=f"messages[{index}].role",
        )
    if message.tool_call_id not in answerable:
        raise invalid_request(
            f"Invalid parameter: 'tool_call_id' of '{shown(message.tool_call_id)}' not found in 'tool_calls' of "
            "previous message.",
            field=f"messages[{index}].tool_call_id",
        )


def _check_tools(params: pb.CompletionParams) -> None:
    if len(params.tools) > MAX_TOOLS:
        raise invalid_request(
            f"Invalid 'tools': array too long. Expected an array with maximum length {MAX_TOOLS}, but got an array "
            f"with length {len(params.tools)} instead.",
            field="tools",
        )
    names: set[str] = set()
    for index, tool in enumerate(params.tools):
        param = f"tools[{index}].name"
        _check_name(tool.name, param)
        if tool.name in names:
            raise invalid_request(
                f"Invalid 'tools': the function name '{tool.name}' is declared more than once; names must be unique.",
                field=param,
            )
        names.add(tool.name)
        if tool.parameters and not _is_json_object(tool.parameters):
            raise invalid_request(
                f"Invalid 'tools[{index}].parameters': expected a JSON Schema object.",
                field=f"tools[{index}].parameters",
            )
    choice = params.tool_choice
    if choice.mode not in _TOOL_CHOICE_MODES:
        raise invalid_request(
            "Invalid value for 'tool_choice': supported values are 'none', 'auto', 'required' or a named function.",
            field="tool_choice",
        )
    needs_tools = choice.mode in (
        pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED,
        pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION,
    )
    if needs_tools and not params.tools:
        raise invalid_request(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            field="tool_choice",
        )
    if choice.mode == pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION:
        if choice.name not in names:
            raise invalid_request(
                f"Invalid value for 'tool_choice': the function '{shown(choice.name)}' is not one of the request's "
                "'tools'.",
                field="tool_choice",
            )
    elif choice.name:
        raise invalid_request(
            "Invalid value for 'tool_choice': a function name goes only with a named function choice.",
            field="tool_choice",
        )


def _check_response_format(response_format: pb.ResponseFormat) -> None:
    kind = response_format.type
    if kind not in _RESPONSE_FORMAT_TYPES:
        raise invalid_request(
            "Invalid value for 'response_format.type': supported values are 'text', 'json_object' and 'json_schema'.",
            field="response_format.type",
        )
    if kind != pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        return
    _check_name(response_format.name, "response_format.name")
    if not response_format.schema:
        raise invalid_request(
            "Missing required parameter: 'response_format.schema'.",
            field="response_format.schema",
        )
    if not _is_json_object(response_format.schema):
        raise invalid_request(
            "Invalid 'response_format.schema': expected a JSON Schema object.",
            field="response_format.schema",
        )


def _check_name(name: str, param: str) -> None:
    """A function or schema name as OpenAI checks it: 1-64 of a-z, A-Z, 0-9, '_' and '-'."""
    if not name:
        raise invalid_request(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string "
            "instead.",
            field=param,
        )
    if len(name) > 64:
        raise invalid_request(
            f"Invalid '{param}': string too long. Expected a string with maximum length 64, but got a string with "
            f"length {len(name)} instead.",
            field=param,
        )
    if not FUNCTION_NAME.match(name):
        raise invalid_request(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
            "'^[a-zA-Z0-9_-]+$'.",
            field=param,
        )


def _too_long(param: str, length: int, limit: int) -> str:
    return (
        f"Invalid '{param}': string too long. Expected a string with maximum length {limit}, but got a string with "
        f"length {length} instead."
    )


def _below_one(param: str, value: int) -> str:
    return f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {value} instead."


def _check_range(param: str, value: int, low: int, high: int) -> None:
    if value < low:
        raise invalid_request(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            field=param,
        )
    if value > high:
        raise invalid_request(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            field=param,
        )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def requested_features(params: pb.CompletionParams) -> dict[str, str]:
    """The optional features (services.providers.FEATURES) this request uses: feature -> the field a refusal names."""
    used: dict[str, str] = {}
    if params.tools or params.HasField("tool_choice"):
        used["tools"] = "tools"
    for index, message in enumerate(params.messages):
        if "tools" not in used and (message.tool_calls or message.role == _TOOL):
            used["tools"] = f"messages[{index}]"
        if "images" not in used:
            for part_index, part in enumerate(message.parts):
                if part.HasField("image"):
                    used["images"] = f"messages[{index}].parts[{part_index}]"
                    break
    if params.HasField("parallel_tool_calls") and not params.parallel_tool_calls:
        used["parallel_tool_calls"] = "parallel_tool_calls"
    if params.response_format.type in _STRUCTURED:
        used["response_format"] = "response_format"
    if params.HasField("choice_count") and params.choice_count > 1:
        used["n"] = "choice_count"
    if params.HasField("seed"):
        used["seed"] = "seed"
    for name in ("presence_penalty", "frequency_penalty"):
        if params.HasField(name) and getattr(params, name) != 0:
            used[name] = name
    if params.logprobs or (params.HasField("top_logprobs") and params.top_logprobs > 0):
        used["logprobs"] = "logprobs" if params.logprobs else "top_logprobs"
    if params.reasoning_effort != _NO_EFFORT:
        used["reasoning_effort"] = "reasoning_effort"
    if params.HasField("top_k"):
        used["top_k"] = "top_k"
    if params.HasField("reasoning_budget_tokens"):
        used["reasoning_budget_tokens"] = "reasoning_budget_tokens"
    return used


def check_supported(params: pb.CompletionParams, supported: frozenset[str], *, provider: str) -> None:
    """Refuse (400, INVALID_REQUEST naming the field) the first feature the request uses that `supported` lacks.

    `supported` holds names from services.providers.FEATURES (what every deployment of the route honours);
    `provider` is the route's provider kind, for the error's metadata. Called once per request, before dispatch:
    providers never check their own features.
    """
    for feature, field in requested_features(params).items():
        if feature not in supported:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_INVALID_REQUEST,
                f"'{field}' ({_FEATURE_WORDS[feature]}) is not supported by the model '{params.model}'.",
                field=field,
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
    "top_k": "top-k sampling",
    "reasoning_budget_tokens": "a reasoning budget in tokens",
}
assert set(_FEATURE_WORDS) == set(FEATURES), "every feature a provider can declare has its words here"
