"""Bedrock Converse shapes, SDK-free: CompletionParams to a Converse request; answers and stream events to proto.

Converse wants what OpenAI does not insist on: system prompts apart from the turns, turns that alternate and start
with the user, and no blank text. Shaping rules (documented in the README):

- system messages become top-level `system` blocks, in order, wherever they were in the conversation;
- blank messages (empty or whitespace-only text, such as an assistant turn replayed with `content: null`) carry
  nothing and are left out, as are blank text parts, because Converse rejects blank text blocks;
- consecutive messages of one role become one turn, each message its own block(s) (no separator invented). Tool
  results are `toolResult` blocks of a user turn, so consecutive results and a user message after them share one;
- an assistant message's tool calls are `toolUse` blocks after its text; images are `image` blocks, in place;
- the first turn must be the user's: a conversation that starts with an assistant message is refused, rather than
  preceded by a user message the caller never wrote.

Tools:

- `tools` become `toolConfig.tools[].toolSpec`. `tool_choice` auto / required / a function becomes toolChoice
  auto / any / tool, sent only when the caller set it (Converse's default is auto; some models refuse toolChoice);
- Converse refuses toolUse and toolResult blocks in a request without `toolConfig`. When the request has no
  `tools`, a toolSpec is synthesised for each tool the history's calls name, with the schema `{"type": "object"}`:
  the model sees those tools offered, as when it made those calls, and may call one of them again;
- `tool_choice: "none"` offers no tools. With tool calls or results in the history that cannot be honoured (see
  `_tool_config`), so that combination is a 400 naming `tool_choice`;
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.errors import GatewayError
from services.providers.schema_check import SchemaCheck

PROVIDER = "bedrock"
F = pb.FinishReason
TC = pb.ToolChoiceMode
RF = pb.ResponseFormatType
# Converse stopReason -> OpenAI finish reason. The window running out cuts the answer as max_tokens would, so a
# caller sees `length` either way; an unknown reason is an upstream protocol error, never a guess.
FINISH_REASONS = {
    "end_turn": F.FINISH_REASON_STOP,
    "stop_sequence": F.FINISH_REASON_STOP,
    "max_tokens": F.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": F.FINISH_REASON_LENGTH,
    "guardrail_intervened": F.FINISH_REASON_CONTENT_FILTER,
    "content_filtered": F.FINISH_REASON_CONTENT_FILTER,
    "tool_use": F.FINISH_REASON_TOOL_CALLS,
}
_ROLES = {pb.Role.ROLE_USER: "user", pb.Role.ROLE_ASSISTANT: "assistant", pb.Role.ROLE_TOOL: "user"}
# Media type -> Converse ImageFormat: the four types the core lets through are exactly the four Converse takes.
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
# The forced tool of `response_format: {"type": "json_object"}`, and what it tells the model.
JSON_OBJECT_TOOL = "json_object"
JSON_OBJECT_DESCRIPTION = "Give your answer as a JSON object."
JSON_SCHEMA_TOOL = "json_schema"  # the forced tool of a json_schema without a name


class UnusableAnswer(Exception):
    """The upstream's answer breaks the Converse contract; the message says how (for the log, not the caller)."""


@dataclass(frozen=True, slots=True)
class AnswerShape:
    """How to read the answer to one request."""

    answer_tool: str = ""  # the forced tool whose input is the answer (response_format); "" when there is none
    first_call_only: bool = False  # parallel_tool_calls=false: relay the first tool call, drop the others
    answer_check: SchemaCheck | None = None  # a strict json_schema: what the answer must match
    call_checks: Mapping[str, SchemaCheck] = field(default_factory=dict)  # strict tools' schemas, by tool name


def converse_request(model_id: str, params: pb.CompletionParams) -> tuple[dict[str, Any], AnswerShape]:
    """The keyword arguments of `converse` / `converse_stream` (only what the caller set, nothing model-specific),
    and how to read the answer.

    `additionalModelRequestFields` is never sent: models reject fields they do not know (DeepSeek answers 400).
    """
    system, messages, called, tool_blocks = _conversation(params.messages)
    request: dict[str, Any] = {"modelId": model_id, "messages": messages}
    if system:
        request["system"] = system
    inference: dict[str, Any] = {}
    if params.HasField("max_tokens"):
        inference["maxTokens"] = params.max_tokens
    if params.HasField("temperature"):
        inference["temperature"] = params.temperature
    if params.HasField("top_p"):
        inference["topP"] = params.top_p
    if params.stop_sequences:
        inference["stopSequences"] = list(params.stop_sequences)
    if inference:
        request["inferenceConfig"] = inference
    tool_config, shape = _tool_config(params, called, tool_blocks)
    if tool_config:
        request["toolConfig"] = tool_config
    return request, shape


def _conversation(
    messages: Sequence[pb.Message],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], bool]:
    """System blocks, turns, the tool names the history's calls use (in order), and whether it has tool blocks."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    called: dict[str, None] = {}
    tool_blocks = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.tool_calls and message.role != pb.Role.ROLE_ASSISTANT:
            raise _invalid("Only assistant messages can carry 'tool_calls'.", f"{where}.tool_calls")
        if message.role == pb.Role.ROLE_SYSTEM:
            system.extend(_content(message, where, images=False))
            continue
        if message.role == pb.Role.ROLE_TOOL:
            blocks = [_tool_result(message, where)]
            tool_blocks = True
        else:
            blocks = _content(message, where)
            for number, call in enumerate(message.tool_calls):
                blocks.append(_tool_use(call, f"{where}.tool_calls[{number}]"))
                called[call.name] = None
                tool_blocks = True
        if not blocks:
            continue
        role = _ROLES[message.role]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise _invalid("'messages' must contain at least one user message with text.")
    if turns[0]["role"] != "user":
        raise _invalid(
            "This model requires the conversation to start with a user message: "
            "the first non-system message with text is an assistant message."
        )
    return system, turns, list(called), tool_blocks


def _content(message: pb.Message, where: str, *, images: bool = True) -> list[dict[str, Any]]:
    """A message's text and images as Converse blocks, in order, blank text left out."""
    blocks: list[dict[str, Any]] = [{"text": message.content}] if message.content.strip() else []
    for number, part in enumerate(message.parts):
        kind = part.WhichOneof("kind")
        if kind == "text" and part.text.strip():
            blocks.append({"text": part.text})
        elif kind == "image":
            param = f"{where}.content[{number}]"
            if not images:
                raise _invalid("System messages cannot carry images on this model.", param)
            blocks.append(_image(part.image, param))
    return blocks


def _image(image: pb.Image, param: str) -> dict[str, Any]:
    image_format = IMAGE_FORMATS.get(image.media_type.lower())
    if image_format is None:
        raise _invalid(f"The image type {image.media_type!r} is not supported: use PNG, JPEG, GIF or WebP.", param)
    if not image.data:
        raise _invalid("The image has no data.", param)
    # botocore base64-encodes the bytes on the wire.
    return {"image": {"format": image_format, "source": {"bytes": image.data}}}


def _tool_use(call: pb.ToolCall, where: str) -> dict[str, Any]:
    if not call.id:
        raise _invalid("A tool call needs its 'id'.", f"{where}.id")
    if not call.name:
        raise _invalid("A tool call needs its function's 'name'.", f"{where}.function.name")
    arguments = _json_object(call.arguments, f"{where}.function.arguments")
    return {"toolUse": {"toolUseId": call.id, "name": call.name, "input": arguments}}


def _tool_result(message: pb.Message, where: str) -> dict[str, Any]:
    """A tool message as a toolResult block. Blank text is left out of it, but never the block: the call it
    answers would be left unanswered."""
    if not message.tool_call_id:
        raise _invalid("A tool message needs the 'tool_call_id' of the call it answers.", f"{where}.tool_call_id")
    return {"toolResult": {"toolUseId": message.tool_call_id, "content": _content(message, where)}}


def _tool_config(
    params: pb.CompletionParams, called: list[str], tool_blocks: bool
) -> tuple[dict[str, Any] | None, AnswerShape]:
    """The request's toolConfig (None: no tools offered), and how to read the answer."""
    mode = params.tool_choice.mode if params.HasField("tool_choice") else TC.TOOL_CHOICE_MODE_UNSPECIFIED
    if mode in (TC.TOOL_CHOICE_MODE_REQUIRED, TC.TOOL_CHOICE_MODE_FUNCTION) and not params.tools:
        raise _invalid("'tool_choice' requires 'tools'.", "tool_choice")
    if mode == TC.TOOL_CHOICE_MODE_FUNCTION and params.tool_choice.name not in {t.name for t in params.tools}:
        raise _invalid(
            f"'tool_choice' names the function {params.tool_choice.name!r}, which is not one of 'tools'.",
            "tool_choice",
        )
    answer = _answer_tool(params.response_format)
    if answer is not None and params.tools:
        raise _invalid(
            "'response_format' cannot be combined with 'tools' on this model: "
            "Bedrock gives structured output through a tool call of its own.",
            "response_format",
        )
    if mode == TC.TOOL_CHOICE_MODE_NONE and tool_blocks and answer is None:
        # Converse refuses tool calls and results in a request without toolConfig, and it has no choice that
        # forbids calling the tools offered there: offering them would let the model call one after "none", and
        # rewriting the history as text would change the conversation. Forced structured output is fine (the
        # model can only call the answer tool), so only this combination is refused.
        raise _invalid(
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
            calls[tool.name] = SchemaCheck(schema, param=f"tools[{number}].function.parameters", provider=PROVIDER)
    if answer is None or not params.response_format.strict:
        return None, calls
    schema = answer["toolSpec"]["inputSchema"]["json"]
    return SchemaCheck(schema, param="response_format.json_schema.schema", provider=PROVIDER), calls


def _tool_spec(tool: pb.Tool, where: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": tool.name}
    if tool.description:  # Converse refuses an empty description
        spec["description"] = tool.description
    if tool.parameters:
        schema = _json_object(tool.parameters, f"{where}.function.parameters")
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
            schema = _json_object(response_format.schema, "response_format.json_schema.schema")
    else:
        return None
    return {"toolSpec": {**spec, "inputSchema": {"json": schema}}}


def _json_object(text: str, param: str) -> dict[str, Any]:
    """JSON text that must hold an object, parsed; anything else is the caller's mistake, a 400 naming `param`."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise _invalid(f"'{param}' must be the JSON text of an object.", param)
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity, which json.loads accepts and JSON does not


def _invalid(message: str, param: str = "messages") -> GatewayError:
    return GatewayError(pb.ErrorReason.ERROR_REASON_INVALID_REQUEST, message, param=param, provider=PROVIDER)


def converse_events(
    answer: Mapping[str, Any], shape: AnswerShape = AnswerShape()
) -> list[svc.StreamCompletionResponse]:
    """A whole Converse answer as the events a stream would have carried, in block order."""
    output = answer.get("output")
    message = output.get("message") if isinstance(output, Mapping) else None
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        raise UnusableAnswer("the answer has no output.message.content list")
    reader = _Reader(shape)
    events: list[svc.StreamCompletionResponse] = []
    for index, block in enumerate(content):
        if not isinstance(block, Mapping):
            raise UnusableAnswer("a content block is not an object")
        if "text" in block:
            events.extend(reader.text(block["text"]))
        elif "reasoningContent" in block:
            reasoning = block["reasoningContent"]
            text = reasoning.get("reasoningText", {}) if isinstance(reasoning, Mapping) else None
            if not isinstance(text, Mapping):
                raise UnusableAnswer("a reasoningContent block without reasoningText")
            events.extend(_reasoning_event(text.get("text", "")))  # redactedContent alone has no text to show
        elif "toolUse" in block:
            tool = block["toolUse"]
            if not isinstance(tool, Mapping) or "input" not in tool:
                raise UnusableAnswer("a toolUse block without input")
            arguments = json.dumps(tool["input"], ensure_ascii=False, separators=(",", ":"))
            events.extend(reader.tool_start(index, tool.get("toolUseId"), tool.get("name"), arguments))
        # other blocks (citations, ...) are never asked for
    events.extend(reader.finish(answer.get("stopReason"), answer.get("usage")))
    return events


class StreamFold:
    """ConverseStream events in, proto events out; the finish only once both messageStop and metadata arrived.

    Bedrock sends messageStart; per content block, a contentBlockStart (tool-use blocks only: id and name), its
    contentBlockDeltas and a contentBlockStop; messageStop (the stop reason); then metadata (usage). Each event
    names its block by contentBlockIndex, counted over text and tool blocks together. Unknown event types are
    skipped (botocore already skips unknown frames).
    """

    def __init__(self, shape: AnswerShape = AnswerShape()) -> None:
        self._reader = _Reader(shape)
        self._stop_reason: object = None
        self._usage: object = None

    def feed(self, event: Mapping[str, Any]) -> list[svc.StreamCompletionResponse]:
        if "contentBlockStart" in event:
            start = event["contentBlockStart"].get("start")
            tool = start.get("toolUse") if isinstance(start, Mapping) else None
            if not isinstance(tool, Mapping):
                return []  # the start of a kind of block the request never asks for
            index = event["contentBlockStart"].get("contentBlockIndex")
            return self._reader.tool_start(index, tool.get("toolUseId"), tool.get("name"))
        if "contentBlockDelta" in event:
            delta = event["contentBlockDelta"].get("delta")
            if not isinstance(delta, Mapping):
                raise UnusableAnswer("a contentBlockDelta without a delta")
            if "text" in delta:
                return self._reader.text(delta["text"])
            if "toolUse" in delta:
                tool = delta["toolUse"]
                piece = tool.get("input") if isinstance(tool, Mapping) else None
                return self._reader.tool_input(event["contentBlockDelta"].get("contentBlockIndex"), piece)
            reasoning = delta.get("reasoningContent")
            if isinstance(reasoning, Mapping) and "text" in reasoning:
                return _reasoning_event(reasoning["text"])
            return []  # a reasoning signature, redacted reasoning or a citation delta: nothing to show
        if "contentBlockStop" in event:
            return self._reader.block_stop(event["contentBlockStop"].get("contentBlockIndex"))
        if "messageStop" in event:
            self._stop_reason = event["messageStop"].get("stopReason")
            if self._stop_reason is None:
                raise UnusableAnswer("messageStop without a stopReason")
        elif "metadata" in event:
            self._usage = event["metadata"].get("usage")
            if self._usage is None:
                raise UnusableAnswer("metadata without usage")
        return []

    def finish(self) -> list[svc.StreamCompletionResponse]:
        """The last events (the finish last), once the stream ended; an error when it ended before messageStop or
        metadata."""
        if self._stop_reason is None:
            raise UnusableAnswer("the stream ended without messageStop")
        if self._usage is None:
            raise UnusableAnswer("the stream ended without metadata (usage)")
        return self._reader.finish(self._stop_reason, self._usage)


@dataclass(slots=True)
class _ToolBlock:
    """A tool-use content block being relayed."""

    call: int | None  # the tool call's index; None for the answer tool, whose input is content
    has_input: bool = False
    closed: bool = False
    check: SchemaCheck | None = None  # strict: the schema its whole input must match; None: not asked, no copy kept
    pieces: list[str] = field(default_factory=list)  # with a check: a copy of the input relayed so far


class _Reader:
    """The content of one answer as proto events, by the same rules whether it arrives whole or streamed.

    Tool calls are numbered 0, 1, ... as they start; each call's first event carries its id and name.
    """

    def __init__(self, shape: AnswerShape) -> None:
        self._shape = shape
        self._tools: dict[int, _ToolBlock | None] = {}  # contentBlockIndex -> its tool block; None: dropped
        self._calls = 0
        self._answered = False  # the answer tool was called
        self._held: list[str] = []  # with an answer tool: text, until an answer-tool call shows it is not the answer

    def text(self, text: object) -> list[svc.StreamCompletionResponse]:
        if not isinstance(text, str):
            raise UnusableAnswer("a text block or delta whose text is not a string")
        if self._shape.answer_tool:
            if not self._answered and text:
                self._held.append(text)
            return []
        return _content_event(text)

    def tool_start(
        self, block: object, tool_use_id: object, name: object, arguments: str = ""
    ) -> list[svc.StreamCompletionResponse]:
        block = _block_index(block)
        if not isinstance(tool_use_id, str) or not tool_use_id or not isinstance(name, str) or not name:
            raise UnusableAnswer(f"tool-use block {block} without a toolUseId and a name")
        if block in self._tools:
            raise UnusableAnswer(f"content block {block} started twice")
        if self._shape.answer_tool:
            if name != self._shape.answer_tool:
                raise UnusableAnswer(f"a call of {name!r} although {self._shape.answer_tool!r} was forced")
            if self._answered:  # a second answer would make the content two JSON texts: the first one is it
                self._tools[block] = None
                return []
            self._answered = True
            self._held.clear()  # the model's words beside the answer are not the answer
            self._tools[block] = _ToolBlock(call=None, check=self._shape.answer_check)
            return self.tool_input(block, arguments)
        if self._shape.first_call_only and self._calls:
            self._tools[block] = None
            return []
        tool = _ToolBlock(call=self._calls, has_input=bool(arguments), check=self._shape.call_checks.get(name))
        self._tools[block] = tool
        self._calls += 1
        if tool.check is not None:
            tool.pieces.append(arguments)
        delta = svc.ToolCallDelta(index=tool.call, id=tool_use_id, name=name, arguments=arguments)
        return [svc.StreamCompletionResponse(tool_call=delta)]

    def tool_input(self, block: object, piece: object) -> list[svc.StreamCompletionResponse]:
        block = _block_index(block)
        if not isinstance(piece, str):
            raise UnusableAnswer(f"tool input for content block {block} that is not a string")
        if block not in self._tools:
            raise UnusableAnswer(f"tool input for content block {block}, which never started")
        tool = self._tools[block]
        if tool is None or not piece:
            return []
        if tool.closed:
            raise UnusableAnswer(f"tool input for content block {block} after it stopped")
        tool.has_input = True
        return [self._piece(tool, piece)]

    def block_stop(self, block: object) -> list[svc.StreamCompletionResponse]:
        tool = self._tools.get(_block_index(block))
        if tool is None or tool.closed:
            return []  # a text or reasoning block, or a dropped call
        tool.closed = True
        # Bedrock streams no input at all for a call without arguments, whose whole answer shows `{}`: say so, so
        # the caller gets JSON text it can parse and send back.
        return [] if tool.has_input else [self._piece(tool, "{}")]

    def finish(self, stop_reason: object, usage: object) -> list[svc.StreamCompletionResponse]:
        """The last events, the finish last; raises SchemaMismatch when a strict answer or call does not match."""
        events = [event for block in list(self._tools) for event in self.block_stop(block)]
        held = "".join(self._held)  # the model never called the answer tool: its text is all the answer there is
        events.extend(_content_event(held))
        self._held.clear()
        if not isinstance(stop_reason, str) or stop_reason not in FINISH_REASONS:
            raise UnusableAnswer(f"unknown stopReason {stop_reason!r}")
        reason = FINISH_REASONS[stop_reason]
        if reason not in (F.FINISH_REASON_LENGTH, F.FINISH_REASON_CONTENT_FILTER):  # cut: incomplete, and says so
            self._check(held)
        if self._shape.answer_tool and reason == F.FINISH_REASON_TOOL_CALLS:
            reason = F.FINISH_REASON_STOP  # the answer tool's call is the answer, relayed as content
        elif self._calls and reason == F.FINISH_REASON_STOP:
            reason = F.FINISH_REASON_TOOL_CALLS  # an answer with tool calls, whatever the model said
        finish = svc.CompletionFinish(finish_reason=reason, usage=usage_of(usage))
        events.append(svc.StreamCompletionResponse(finish=finish))
        return events

    def _check(self, held: str) -> None:
        """Every strict JSON of the answer, whole now, against its schema (nothing to do for other requests)."""
        for tool in self._tools.values():
            if tool is not None and tool.check is not None:
                subject = "the structured answer" if tool.call is None else f"tool call {tool.call}"
                tool.check.check_text("".join(tool.pieces), subject)
        if self._shape.answer_check is not None and not self._answered:
            self._shape.answer_check.check_text(held, "the structured answer")

    def _piece(self, tool: _ToolBlock, text: str) -> svc.StreamCompletionResponse:
        if tool.check is not None:
            tool.pieces.append(text)
        if tool.call is None:
            return svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text))
        return svc.StreamCompletionResponse(tool_call=svc.ToolCallDelta(index=tool.call, arguments=text))


def _block_index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnusableAnswer(f"contentBlockIndex {value!r} is not a block index")
    return value


def usage_of(usage: object) -> pb.Usage:
    """Converse TokenUsage as OpenAI counts it: the prompt includes cache reads and writes; cache reads are cached.

    Bedrock reports no reasoning-token count, so `reasoning_tokens` stays unset.
    """
    if not isinstance(usage, Mapping):
        raise UnusableAnswer("the answer carries no usage")
    counts: dict[str, int] = {}
    for name in ("inputTokens", "outputTokens", "cacheReadInputTokens", "cacheWriteInputTokens"):
        value = usage.get(name, 0 if name.startswith("cache") else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UnusableAnswer(f"usage.{name} is {value!r}, not a token count")
        counts[name] = value
    prompt = counts["inputTokens"] + counts["cacheReadInputTokens"] + counts["cacheWriteInputTokens"]
    out = pb.Usage(
        prompt_tokens=prompt, completion_tokens=counts["outputTokens"], total_tokens=prompt + counts["outputTokens"]
    )
    if "cacheReadInputTokens" in usage or "cacheWriteInputTokens" in usage:
        out.cached_tokens = counts["cacheReadInputTokens"]
    return out


def _content_event(text: str) -> list[svc.StreamCompletionResponse]:
    return [svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text))] if text else []


def _reasoning_event(text: object) -> list[svc.StreamCompletionResponse]:
    if not isinstance(text, str):
        raise UnusableAnswer("reasoning text that is not a string")
    return [svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=text))] if text else []
