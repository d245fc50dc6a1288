"""The Messages request we accept, parsed straight into the core's CompletionParams; each failure is a 400 naming
the request's field as Anthropic does ("messages.1.content.0.source: ...").

Shapes and JSON types are checked here; ranges the core also applies to gRPC callers (stop sequence count, tool
names, max_tokens) are left to the core, whose errors name the field by its proto path. `Parsed.field_names` maps
those paths back to the request's (one Anthropic message can become several proto messages: a user turn with tool
results becomes one tool message per result, then the user's own text).

What the request asks that can change the answer is carried to the core, where the serving provider honours it or
refuses it with a 400 naming the field, or refused here (server tools, documents, MCP servers, context edits other
than keeping every thinking block): never silently dropped. Fields that cannot change the answer (cache_control,
service_tier, the advisory `output_config.effort`, which Anthropic documents as a behavioural signal rather than a
constraint) and fields we do not know are accepted and ignored. `thinking: {"type": "adaptive"}` leaves the
provider's default; `enabled` asks for a budget; `disabled` asks for no reasoning.

Tools marked `defer_loading` (Anthropic's tool search: Claude Code sends them) are left out of what the model sees
until a `tool_reference` block in a tool result names them, as Anthropic's API does.
"""

from __future__ import annotations

import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from bridge.anthropic.errors import invalid
from modelmax.v1 import completion_pb2 as pb

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_IGNORED = {"service_tier", "cache_control", "inference_geo", "container"}
_IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
_TOOL_CHOICE = {
    "auto": pb.ToolChoiceMode.TOOL_CHOICE_MODE_AUTO,
    "any": pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED,
    "tool": pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION,
    "none": pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE,
}
_ROLE = {"user": pb.Role.ROLE_USER, "assistant": pb.Role.ROLE_ASSISTANT, "system": pb.Role.ROLE_SYSTEM}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(slots=True)
class Parsed:
    """A checked Messages request: the core's params, and what only the edge needs."""

    params: pb.CompletionParams
    stream: bool
    show_thinking: bool  # False for `thinking.display: "omitted"`: thinking blocks carry their signature, no text
    field_names: dict[str, str] = field(default_factory=dict)  # proto path prefix -> request path


def parse_messages_request(body: bytes, *, count: bool = False) -> Parsed:
    """Parse and check a Messages request body; raise AnthropicError (400) naming the offending field. `count`: a
    count_tokens body, which takes no max_tokens (it is left unset: the count is of the prompt alone)."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise invalid("", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise invalid("", "The request body must be a JSON object.")
    try:
        return _Parser(data, count).parse()
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\\ud800"), which no proto string can hold
        raise invalid("", "The request contains a string that is not valid Unicode (a lone surrogate).") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


class _Parser:
    def __init__(self, data: dict[str, Any], count: bool) -> None:
        self.data, self.count = data, count
        self.params = pb.CompletionParams()
        self.field_names: dict[str, str] = {}
        self.loaded: set[str] = set()  # deferred tools a tool_reference has loaded

    def parse(self) -> Parsed:
        data, params = self.data, self.params
        for name in data.keys() - _KNOWN:
            if name not in _IGNORED:
                log.debug("ignoring unknown field %r", name)
        params.model = _string(data.get("model"), "model", required=True)
        max_tokens = data.get("max_tokens")
        if max_tokens is not None:
            params.max_tokens = _int(max_tokens, "max_tokens", minimum=1)
        elif not self.count:
            raise invalid("max_tokens", "Field required")
        self._system(data.get("system"))
        self._messages(data.get("messages"))
        self._tools(data.get("tools"))  # after the messages, whose tool_reference blocks load deferred tools
        self._tool_choice(data.get("tool_choice"))
        stops = data.get("stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
                raise invalid("stop_sequences", "Input should be a list of strings")
            params.stop_sequences.extend(stops)
        temperature = _number(data.get("temperature"), "temperature", 0.0, 1.0)
        if temperature is not None:
            params.temperature = temperature
        top_p = _number(data.get("top_p"), "top_p", 0.0, 1.0)
        if top_p is not None:
            params.top_p = top_p
        if data.get("top_k") is not None:
            params.top_k = _int(data["top_k"], "top_k", minimum=1)
            self.field_names["top_k"] = "top_k"
        show_thinking = self._thinking(data.get("thinking"))
        self._output_config(data.get("output_config"))
        self._metadata(data.get("metadata"))
        self._refuse_unsupported()
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise invalid("stream", "Input should be a valid boolean")
        params.include_usage = bool(stream)  # Anthropic's streams always end with their usage (message_delta)
        return Parsed(params, bool(stream), show_thinking, self.field_names)

    # -- the conversation -------------------------------------------------------------------------------------

    def _system(self, system: Any) -> None:
        if system is None or system == "":
            return
        if isinstance(system, str):
            self._append(pb.Message(role=pb.Role.ROLE_SYSTEM, content=system), "system")
        elif isinstance(system, list):
            if system:  # each block a text part, as the provider takes a list of system blocks
                self._user(system, "system", pb.Role.ROLE_SYSTEM, content="")
        else:
            raise invalid("system", "Input should be a string or a list of text blocks")

    def _messages(self, messages: Any) -> None:
        if messages is None:
            raise invalid("messages", "Field required")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "Input should be a non-empty list of messages")
        for index, message in enumerate(messages):
            where = f"messages.{index}"
            if not isinstance(message, dict):
                raise invalid(where, "Input should be an object")
            role = message.get("role")
            if role not in _ROLE:
                raise invalid(f"{where}.role", "Input should be 'user' or 'assistant'")
            content = message.get("content")
            if isinstance(content, str):
                self._append(pb.Message(role=_ROLE[role], content=content), where)
            elif isinstance(content, list):
                if role == "assistant":
                    self._assistant(content, where)
                else:
                    self._user(content, where, _ROLE[role])
            else:
                raise invalid(f"{where}.content", "Input should be a string or a list of content blocks")

    def _user(self, blocks: list[Any], where: str, role: pb.Role.ValueType, content: str = ".content") -> None:
        """Tool results become tool messages, in order; the text and images between them one message each."""
        parts: list[pb.ContentPart] = []
        part_names: list[str] = []
        for index, block in enumerate(blocks):
            path = f"{where}{content}.{index}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_result" and role == pb.Role.ROLE_USER:
                self._flush(role, parts, part_names, where)
                self._tool_result(block, path)
            elif kind == "text":
                parts.append(pb.ContentPart(text=_text_block(block, path)))
                part_names.append(path)
            elif kind == "image" and role == pb.Role.ROLE_USER:
                parts.append(pb.ContentPart(image=_image(block, path)))
                part_names.append(path)
            else:
                raise _unsupported_block(block, kind, path, "user" if role == pb.Role.ROLE_USER else "system")
        self._flush(role, parts, part_names, where)

    def _flush(self, role: pb.Role.ValueType, parts: list[pb.ContentPart], names: list[str], where: str) -> None:
        if not parts:
            return
        index = len(self.params.messages)
        if len(parts) == 1 and parts[0].WhichOneof("kind") == "text":
            self._append(pb.Message(role=role, content=parts[0].text), where)
        else:
            self._append(pb.Message(role=role, parts=parts), where)
            for number, name in enumerate(names):
                self.field_names[f"messages[{index}].parts[{number}]"] = name
        parts.clear()
        names.clear()

    def _tool_result(self, block: dict[str, Any], path: str) -> None:
        call_id = _string(block.get("tool_use_id"), f"{path}.tool_use_id", required=True)
        content = block.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for index, inner in enumerate(content):
                inner_path = f"{path}.content.{index}"
                kind = inner.get("type") if isinstance(inner, dict) else None
                if kind == "text":
                    texts.append(_text_block(inner, inner_path))
                elif kind == "tool_reference":
                    name = _string(inner.get("tool_name"), f"{inner_path}.tool_name", required=True)
                    self.loaded.add(name)
                    texts.append(f"Tool loaded: {name}")
                else:
                    raise invalid(f"{inner_path}.type", "ModelMax takes text (and tool_reference) blocks in a tool "
                                  f"result; '{kind}' is not supported")  # fmt: skip
            text = "\n".join(texts)
        else:
            raise invalid(f"{path}.content", "Input should be a string or a list of content blocks")
        is_error = block.get("is_error")
        if is_error is not None and not isinstance(is_error, bool):
            raise invalid(f"{path}.is_error", "Input should be a valid boolean")
        self._append(pb.Message(role=pb.Role.ROLE_TOOL, content=text, tool_call_id=call_id, is_error=bool(is_error)),
                     path)  # fmt: skip

    def _assistant(self, blocks: list[Any], where: str) -> None:
        message = pb.Message(role=pb.Role.ROLE_ASSISTANT)
        texts: list[str] = []
        for index, block in enumerate(blocks):
            path = f"{where}.content.{index}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_text_block(block, path))
            elif kind == "tool_use":
                arguments = block.get("input")
                if not isinstance(arguments, dict):
                    raise invalid(f"{path}.input", "Input should be an object")
                name = _string(block.get("name"), f"{path}.name", required=True)
                call_id = _string(block.get("id"), f"{path}.id", required=True)
                self.field_names[f"messages[{len(self.params.messages)}].tool_calls[{len(message.tool_calls)}]"] = path
                message.tool_calls.append(pb.ToolCall(id=call_id, name=name, arguments=_dumps(arguments)))
            elif kind == "thinking":
                thinking = _string(block.get("thinking"), f"{path}.thinking")
                signature = _string(block.get("signature"), f"{path}.signature")
                message.reasoning.append(pb.Reasoning(text=thinking, signature=signature))
            elif kind == "redacted_thinking":
                data = _string(block.get("data"), f"{path}.data", required=True)
                try:
                    redacted = binascii.a2b_base64(data, strict_mode=True)
                except binascii.Error:
                    raise invalid(f"{path}.data", "Input should be the data of a redacted_thinking block") from None
                message.reasoning.append(pb.Reasoning(redacted=redacted))
            else:
                raise _unsupported_block(block, kind, path, "assistant")
        message.content = "".join(texts)
        self._append(message, where)

    def _append(self, message: pb.Message, path: str) -> None:
        self.field_names[f"messages[{len(self.params.messages)}]"] = path
        self.params.messages.append(message)

    # -- tools ------------------------------------------------------------------------------------------------

    def _tools(self, tools: Any) -> None:
        if tools is None:
            return
        if not isinstance(tools, list):
            raise invalid("tools", "Input should be a list of tools")
        for index, tool in enumerate(tools):
            path = f"tools.{index}"
            if not isinstance(tool, dict):
                raise invalid(path, "Input should be an object")
            kind = tool.get("type")
            if kind not in (None, "custom"):
                raise invalid(f"{path}.type", f"server tools ('{kind}') are not supported by ModelMax; define a "
                              "client tool with a name and an input_schema")  # fmt: skip
            name = _string(tool.get("name"), f"{path}.name", required=True)
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise invalid(f"{path}.input_schema", "Field required (a JSON Schema object)")
            if tool.get("defer_loading") is True and name not in self.loaded:
                continue  # not in the model's context until a tool_reference loads it
            strict = tool.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise invalid(f"{path}.strict", "Input should be a valid boolean")
            number = len(self.params.tools)
            self.field_names[f"tools[{number}]"] = path
            self.field_names[f"tools[{number}].parameters"] = f"{path}.input_schema"
            self.params.tools.append(
                pb.Tool(name=name, description=_string(tool.get("description"), f"{path}.description"),
                        parameters=_dumps(schema), strict=strict)
            )  # fmt: skip

    def _tool_choice(self, choice: Any) -> None:
        if choice is None:
            return
        if not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICE:
            raise invalid("tool_choice", "Input should be an object whose type is 'auto', 'any', 'tool' or 'none'")
        kind = choice["type"]
        self.params.tool_choice.mode = _TOOL_CHOICE[kind]
        if kind == "tool":
            self.params.tool_choice.name = _string(choice.get("name"), "tool_choice.name", required=True)
        disable = choice.get("disable_parallel_tool_use")
        if disable is not None:
            if not isinstance(disable, bool):
                raise invalid("tool_choice.disable_parallel_tool_use", "Input should be a valid boolean")
            if disable:
                self.params.parallel_tool_calls = False
                self.field_names["parallel_tool_calls"] = "tool_choice.disable_parallel_tool_use"
        self.field_names["tool_choice"] = "tool_choice"

    # -- the rest ---------------------------------------------------------------------------------------------

    def _thinking(self, thinking: Any) -> bool:
        """Sets the reasoning the request asks for; False when thinking text is to be omitted from the answer."""
        if thinking is None:
            return True
        if not isinstance(thinking, dict):
            raise invalid("thinking", "Input should be an object")
        kind = thinking.get("type")
        if kind == "enabled":
            budget = _int(thinking.get("budget_tokens"), "thinking.budget_tokens", minimum=1024)
            if self.params.HasField("max_tokens") and budget >= self.params.max_tokens:
                raise invalid("thinking.budget_tokens", "`max_tokens` must be greater than `thinking.budget_tokens`")
            self.params.reasoning_budget_tokens = budget
            self.field_names["reasoning_budget_tokens"] = "thinking.budget_tokens"
        elif kind == "disabled":
            self.params.reasoning_effort = pb.ReasoningEffort.REASONING_EFFORT_NONE
            self.field_names["reasoning_effort"] = "thinking"
        elif kind != "adaptive":
            raise invalid("thinking.type", "Input should be 'enabled', 'disabled' or 'adaptive'")
        display = thinking.get("display")
        if display not in (None, "summarized", "omitted"):
            raise invalid("thinking.display", "Input should be 'summarized' or 'omitted'")
        return display != "omitted"

    def _output_config(self, config: Any) -> None:
        if config is None:
            return
        if not isinstance(config, dict):
            raise invalid("output_config", "Input should be an object")
        effort = config.get("effort")
        if effort is not None and effort not in ("low", "medium", "high", "max"):
            raise invalid("output_config.effort", "Input should be 'low', 'medium', 'high' or 'max'")
        output_format = config.get("format")
        if output_format is None:
            return
        if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
            raise invalid("output_config.format", "Input should be an object of type 'json_schema'")
        schema = output_format.get("schema")
        if not isinstance(schema, dict):
            raise invalid("output_config.format.schema", "Field required (a JSON Schema object)")
        self.params.response_format.CopyFrom(
            pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="output",
                              schema=_dumps(schema), strict=True)
        )  # fmt: skip
        self.field_names["response_format"] = "output_config.format"
        self.field_names["response_format.schema"] = "output_config.format.schema"

    def _metadata(self, metadata: Any) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, dict):
            raise invalid("metadata", "Input should be an object")
        user = metadata.get("user_id")
        if user is not None:
            self.params.user = _string(user, "metadata.user_id")
            self.field_names["user"] = "metadata.user_id"

    def _refuse_unsupported(self) -> None:
        servers = self.data.get("mcp_servers")
        if servers:
            raise invalid("mcp_servers", "MCP servers are not supported by ModelMax")
        management = self.data.get("context_management")
        if management is None:
            return
        edits = management.get("edits") if isinstance(management, dict) else None
        if not isinstance(edits, list):
            raise invalid("context_management.edits", "Input should be a list of edits")
        for index, edit in enumerate(edits):
            # Keeping every thinking block is what ModelMax does anyway; any other edit would change the context.
            if not (isinstance(edit, dict) and str(edit.get("type", "")).startswith("clear_thinking_")
                    and edit.get("keep") == "all"):  # fmt: skip
                raise invalid(f"context_management.edits.{index}", "ModelMax supports only clearing no thinking "
                              "blocks ({'type': 'clear_thinking_...', 'keep': 'all'})")  # fmt: skip


_KNOWN = {
    "model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences", "temperature", "top_p",
    "top_k", "thinking", "output_config", "metadata", "mcp_servers", "context_management", "stream",
}  # fmt: skip


def _string(value: Any, path: str, *, required: bool = False) -> str:
    if value is None:
        if required:
            raise invalid(path, "Field required")
        return ""
    if not isinstance(value, str):
        raise invalid(path, "Input should be a valid string")
    if required and not value:
        raise invalid(path, "String should have at least 1 character")
    return value


def _int(value: Any, path: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(path, "Input should be a valid integer")
    if not minimum <= value <= _INT32_MAX:
        raise invalid(path, f"Input should be between {minimum} and {_INT32_MAX}")
    return value


def _number(value: Any, path: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(path, "Input should be a valid number")
    if not low <= value <= high:
        raise invalid(path, f"Input should be between {low:g} and {high:g}")
    return float(value)


def _text_block(block: Any, path: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise invalid(f"{path}.type", "Input should be a text block")
    return _string(block.get("text"), f"{path}.text", required=False)


def _image(block: dict[str, Any], path: str) -> pb.Image:
    source = block.get("source")
    if not isinstance(source, dict):
        raise invalid(f"{path}.source", "Field required")
    kind = source.get("type")
    if kind == "url":
        url = _string(source.get("url"), f"{path}.source.url", required=True)
        return pb.Image(url=url)
    if kind != "base64":
        raise invalid(f"{path}.source.type", "Input should be 'base64' or 'url'")
    media_type = source.get("media_type")
    if media_type not in _IMAGE_TYPES:
        raise invalid(f"{path}.source.media_type", "Input should be 'image/jpeg', 'image/png', 'image/gif' or "
                      "'image/webp'")  # fmt: skip
    data = source.get("data")
    if not isinstance(data, str):
        raise invalid(f"{path}.source.data", "Field required (base64 image data)")
    try:
        return pb.Image(data=binascii.a2b_base64(data, strict_mode=True), media_type=media_type)
    except binascii.Error:
        raise invalid(f"{path}.source.data", "The image data is not valid base64") from None


def _unsupported_block(block: Any, kind: Any, path: str, role: str) -> Exception:
    if not isinstance(block, dict):
        return invalid(path, "Input should be a content block object")
    allowed = {
        "user": "text, image and tool_result",
        "assistant": "text, tool_use, thinking and redacted_thinking",
        "system": "text",
    }[role]
    return invalid(f"{path}.type", f"'{kind}' blocks are not supported by ModelMax in {role} messages (only "
                   f"{allowed})")  # fmt: skip
