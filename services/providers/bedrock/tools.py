"""Tools on Bedrock's Converse, without the SDK: tools and tool_choice as toolConfig, tool calls and tool results in
the history as toolUse and toolResult blocks, response_format as a forced tool, and the schemas `strict` asks the
gateway to enforce. Its AnswerShape tells the answer folds of `translate` how to read the answer.

- `tools` become `toolConfig.tools[].toolSpec`. `tool_choice` auto / required / a function becomes toolChoice
  auto / any / tool, sent only when the caller set it (Converse's default is auto; some models refuse toolChoice);
- Converse refuses toolUse and toolResult blocks in a request without `toolConfig`. When the request has no
  `tools`, a toolSpec is synthesised for each tool the history's calls name, with the schema `{"type": "object"}`:
  the model sees those tools offered, as when it made those calls, and may call one of them again;
- `tool_choice: "none"` offers no tools. With tool calls or results in the history that cannot be honoured (see
  `tool_config`), so that combination is a 400 naming `tool_choice`;
- `response_format` (json_object, json_schema) is a forced tool whose input is the answer: the input arrives as
  content and the `tool_use` stop as `stop`. Text the model writes beside that call is not the answer and is left
  out; an answer that never calls it is relayed as its text, held until the end of the answer;
- `parallel_tool_calls: false` has no Converse switch: only the model's first tool call is relayed.
- `strict` (on a tool or a json_schema) has no Converse field, so the gateway enforces it (schema_check.py): the
  schema is checked when the request is shaped (a broken one is a 400 naming it), and the final JSON of a strict
  answer or call is validated when the answer ends. Pieces are relayed as they come; a mismatch ends the answer with
  an UPSTREAM_PROTOCOL error instead of its finish. An answer cut by length or a filter is not checked: its finish
  already says it is incomplete, as OpenAI's does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from services.providers.bedrock.errors import PROVIDER, invalid
from services.providers.schema_check import SchemaCheck

TC = pb.ToolChoiceMode
RF = pb.ResponseFormatType
# The forced tool of `response_format: {"type": "json_object"}`, and what it tells the model.
JSON_OBJECT_TOOL = "json_object"
JSON_OBJECT_DESCRIPTION = "Give your answer as a JSON object."
JSON_SCHEMA_TOOL = "json_schema"  # the forced tool of a json_schema without a name


@dataclass(frozen=True, slots=True)
class AnswerShape:
    """How to read the answer to one request."""

    answer_tool: str = ""  # the forced tool whose input is the answer (response_format); "" when there is none
    first_call_only: bool = False  # parallel_tool_calls=false: relay the first tool call, drop the others
    answer_check: SchemaCheck | None = None  # a strict json_schema: what the answer must match
    call_checks: Mapping[str, SchemaCheck] = field(default_factory=dict)  # strict tools' schemas, by tool name
    stop_sequence: str = ""  # what a `stop_sequence` stop names: the request's only stop sequence; "" with several


def tool_use(call: pb.ToolCall, where: str) -> dict[str, Any]:
    """An assistant message's tool call as a toolUse block."""
    if not call.id:
        raise invalid("A tool call needs its 'id'.", f"{where}.id")
    if not call.name:
        raise invalid("A tool call needs its function's 'name'.", f"{where}.name")
    arguments = _json_object(call.arguments, f"{where}.arguments")
    return {"toolUse": {"toolUseId": call.id, "name": call.name, "input": arguments}}


def tool_result(
    message: pb.Message, where: str, content: Callable[[pb.Message, str], list[dict[str, Any]]]
) -> dict[str, Any]:
    """A tool message as a toolResult block, its text and images shaped by `content` (translate's, passed in so
    that this module does not import it). Blank text is left out of it, but never the block: the call it
    answers would be left unanswered. A failed tool (`is_error`) is the block's `"status": "error"`."""
    if not message.tool_call_id:
        raise invalid("A tool message needs the 'tool_call_id' of the call it answers.", f"{where}.tool_call_id")
    result: dict[str, Any] = {"toolUseId": message.tool_call_id, "content": content(message, where)}
    if message.is_error:
        result["status"] = "error"
    return {"toolResult": result}


def tool_config(
    params: pb.CompletionParams, called: list[str], tool_blocks: bool
) -> tuple[dict[str, Any] | None, AnswerShape]:
    """The request's toolConfig (None: no tools offered), and how to read the answer. `called` names the tools the
    history's calls use, in order; `tool_blocks` says whether the history has toolUse or toolResult blocks."""
    mode = params.tool_choice.mode if params.HasField("tool_choice") else TC.TOOL_CHOICE_MODE_UNSPECIFIED
    if mode in (TC.TOOL_CHOICE_MODE_REQUIRED, TC.TOOL_CHOICE_MODE_FUNCTION) and not params.tools:
        raise invalid("'tool_choice' requires 'tools'.", "tool_choice")
    if mode == TC.TOOL_CHOICE_MODE_FUNCTION and params.tool_choice.name not in {t.name for t in params.tools}:
        raise invalid(
            f"'tool_choice' names the function {params.tool_choice.name!r}, which is not one of 'tools'.",
            "tool_choice",
        )
    answer = _answer_tool(params.response_format)
    if answer is not None and params.tools:
        raise invalid(
            "'response_format' cannot be combined with 'tools' on this model: "
            "Bedrock gives structured output through a tool call of its own.",
            "response_format",
        )
    if mode == TC.TOOL_CHOICE_MODE_NONE and tool_blocks and answer is None:
        # Converse refuses tool calls and results in a request without toolConfig, and it has no choice that
        # forbids calling the tools offered there: offering them would let the model call one after "none", and
        # rewriting the history as text would change the conversation. Forced structured output is fine (the
        # model can only call the answer tool), so only this combination is refused.
        raise invalid(
            "'tool_choice' \"none\" is not supported by this model when the conversation has tool calls or tool "
            "results: Bedrock requires the tools to be offered then. Use \"auto\", or leave out 'tool_choice'.",
            "tool_choice",
        )
    specs: list[dict[str, Any]] = []
    if mode != TC.TOOL_CHOICE_MODE_NONE:
        specs = [_tool_spec(tool, f"tools[{number}]") for number, tool in enumerate(params.tools)]
    answer_name = answer["toolSpec"]["name"] if answer is not None else ""
    first_call_only = params.HasField("parallel_tool_calls") and not params.parallel_tool_calls
    shape = AnswerShape(answer_name, first_call_only, *_strict_checks(params, specs, answer))
    if not params.tools and tool_blocks:
        specs = [{"toolSpec": {"name": name, "inputSchema": {"json": {"type": "object"}}}}
                 for name in called if name != answer_name]  # fmt: skip
    if answer is not None:
        specs.append(answer)
    if not specs:
        return None, shape
    config: dict[str, Any] = {"tools": specs}
    if answer_name:
        config["toolChoice"] = {"tool": {"name": answer_name}}
    elif mode == TC.TOOL_CHOICE_MODE_AUTO:
        config["toolChoice"] = {"auto": {}}
    elif mode == TC.TOOL_CHOICE_MODE_REQUIRED:
        config["toolChoice"] = {"any": {}}
    elif mode == TC.TOOL_CHOICE_MODE_FUNCTION:
        config["toolChoice"] = {"tool": {"name": params.tool_choice.name}}
    return config, shape


def _strict_checks(
    params: pb.CompletionParams, specs: list[dict[str, Any]], answer: dict[str, Any] | None
) -> tuple[SchemaCheck | None, dict[str, SchemaCheck]]:
    """The schemas the gateway enforces, each checked as a schema now: the answer's (a strict json_schema) and the
    strict tools' (by name; the offered `specs` are in the order of `tools`). Nothing at all without `strict`."""
    calls: dict[str, SchemaCheck] = {}
    for number, (tool, spec) in enumerate(zip(params.tools, specs, strict=False)):
        if tool.strict and tool.name not in calls:
            schema = spec["toolSpec"]["inputSchema"]["json"]
            calls[tool.name] = SchemaCheck(schema, field=f"tools[{number}].parameters", provider=PROVIDER)
    if answer is None or not params.response_format.strict:
        return None, calls
    schema = answer["toolSpec"]["inputSchema"]["json"]
    return SchemaCheck(schema, field="response_format.schema", provider=PROVIDER), calls


def _tool_spec(tool: pb.Tool, where: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": tool.name}
    if tool.description:  # Converse refuses an empty description
        spec["description"] = tool.description
    if tool.parameters:
        schema = _json_object(tool.parameters, f"{where}.parameters")
    else:  # a function without parameters: Converse requires a schema, of an object
        schema = {"type": "object", "properties": {}}
    spec["inputSchema"] = {"json": schema}
    return {"toolSpec": spec}


def _answer_tool(response_format: pb.ResponseFormat) -> dict[str, Any] | None:
    """The forced tool that carries a structured answer, or None for plain text."""
    if response_format.type == RF.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        spec = {"name": JSON_OBJECT_TOOL, "description": JSON_OBJECT_DESCRIPTION}
        schema: dict[str, Any] = {"type": "object"}
    elif response_format.type == RF.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        spec = {"name": response_format.name or JSON_SCHEMA_TOOL}
        if response_format.description:
            spec["description"] = response_format.description
        schema = {"type": "object"}
        if response_format.schema:
            schema = _json_object(response_format.schema, "response_format.schema")
    else:
        return None
    return {"toolSpec": {**spec, "inputSchema": {"json": schema}}}


def _json_object(text: str, field: str) -> dict[str, Any]:
    """JSON text that must hold an object, parsed; anything else is the caller's mistake, a 400 naming `field`."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise invalid(f"'{field}' must be the JSON text of an object.", field)
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity, which json.loads accepts and JSON does not
