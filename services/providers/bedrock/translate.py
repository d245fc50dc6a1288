"""Bedrock Converse shapes, SDK-free: CompletionParams to a Converse request; answers and stream events to proto.

Converse wants what OpenAI does not insist on: system prompts apart from the turns, turns that alternate and start
with the user, and no blank text. Shaping rules (documented in the README):

- system messages become top-level `system` blocks, in order, wherever they were in the conversation;
- blank messages (empty or whitespace-only text, such as an assistant turn replayed with `content: null`) carry
  nothing and are left out, as are blank text parts, because Converse rejects blank text blocks;
- consecutive messages of one role become one turn, each message its own block(s) (no separator invented). Tool
  results are `toolResult` blocks of a user turn, so consecutive results and a user message after them share one;
- an assistant message's tool calls are `toolUse` blocks after its text; images are `image` blocks, in place;
- an assistant message's reasoning (given back with its signatures) is `reasoningContent` blocks before its text,
  in order: `reasoningText` {text, signature}, or `redactedContent` bytes;
- the first turn must be the user's: a conversation that starts with an assistant message is refused, rather than
  preceded by a user message the caller never wrote.

The parts with rules of their own live beside it, SDK-free too: tools, tool_choice, the toolUse and toolResult
blocks, response_format's forced tool and `strict` in `tools` (whose AnswerShape says how the folds here read an
answer), upstream errors in `errors`.

Bedrock never says which stop sequence ended an answer (messageStop carries only the stopReason `stop_sequence`).
When the request had exactly one, that one is known and a `stop_sequence` finish names it; with several, the
finish's `stop_sequence` stays empty rather than guessed.

Reasoning comes back as ReasoningDeltas: its text, then (from a signature delta, or a whole block's signature) one
delta with the signature that ends the block; a redacted block is one delta with its bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.providers.bedrock.errors import invalid
from services.providers.bedrock.tools import AnswerShape, tool_config, tool_result, tool_use
from services.providers.schema_check import SchemaCheck

F = pb.FinishReason
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


# How to read an answer when the caller gives no AnswerShape: as it comes, no tool forced, nothing strict.
_PLAIN = AnswerShape()


class UnusableAnswer(Exception):
    """The upstream's answer breaks the Converse contract; the message says how (for the log, not the caller)."""


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
    tools, shape = tool_config(params, called, tool_blocks)
    if tools:
        request["toolConfig"] = tools
    if len(params.stop_sequences) == 1:  # a `stop_sequence` stop can only mean this one
        shape = dataclasses.replace(shape, stop_sequence=params.stop_sequences[0])
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
            raise invalid("Only assistant messages can carry 'tool_calls'.", f"{where}.tool_calls")
        if message.role == pb.Role.ROLE_SYSTEM:
            system.extend(_content(message, where, images=False))
            continue
        if message.role == pb.Role.ROLE_TOOL:
            blocks = [tool_result(message, where, _content)]
            tool_blocks = True
        else:
            blocks = [_reasoning_block(block) for block in message.reasoning]  # validated: assistant turns only
            blocks += _content(message, where)
            for number, call in enumerate(message.tool_calls):
                blocks.append(tool_use(call, f"{where}.tool_calls[{number}]"))
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
        raise invalid("'messages' must contain at least one user message with text.", "messages")
    if turns[0]["role"] != "user":
        raise invalid(
            "This model requires the conversation to start with a user message: "
            "the first non-system message with text is an assistant message.",
            "messages",
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
            field = f"{where}.parts[{number}]"
            if not images:
                raise invalid("System messages cannot carry images on this model.", field)
            blocks.append(_image(part.image, field))
    return blocks


def _reasoning_block(block: pb.Reasoning) -> dict[str, Any]:
    """A reasoning block given back, as Converse returned it: redacted bytes, or text with its signature."""
    if block.redacted:
        return {"reasoningContent": {"redactedContent": block.redacted}}  # botocore base64-encodes the bytes
    text: dict[str, Any] = {"text": block.text}
    if block.signature:
        text["signature"] = block.signature
    return {"reasoningContent": {"reasoningText": text}}


def _image(image: pb.Image, field: str) -> dict[str, Any]:
    image_format = IMAGE_FORMATS.get(image.media_type.lower())
    if image_format is None:
        raise invalid(f"The image type {image.media_type!r} is not supported: use PNG, JPEG, GIF or WebP.", field)
    if not image.data:
        raise invalid("The image has no data.", field)
    # botocore base64-encodes the bytes on the wire.
    return {"image": {"format": image_format, "source": {"bytes": image.data}}}


def converse_events(answer: Mapping[str, Any], shape: AnswerShape = _PLAIN) -> list[svc.StreamCompletionResponse]:
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
            events.extend(_reasoning_block_events(block["reasoningContent"]))
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

    def __init__(self, shape: AnswerShape = _PLAIN) -> None:
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
            if "reasoningContent" in delta:
                return _reasoning_delta_events(delta["reasoningContent"])
            return []  # a citation delta: never asked for
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
        call = self._calls  # this call's index (the block's `call` is None only for the answer tool)
        tool = _ToolBlock(call=call, has_input=bool(arguments), check=self._shape.call_checks.get(name))
        self._tools[block] = tool
        self._calls += 1
        if tool.check is not None:
            tool.pieces.append(arguments)
        delta = svc.ToolCallDelta(index=call, id=tool_use_id, name=name, arguments=arguments)
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
        # One choice (the core never sends Bedrock a request for several). The stop sequence only when it is known:
        # Bedrock does not say which one matched, so only a request with exactly one names it (see the module doc).
        ending = svc.ChoiceFinish(index=0, finish_reason=reason)
        if stop_reason == "stop_sequence" and reason == F.FINISH_REASON_STOP:
            ending.stop_sequence = self._shape.stop_sequence
        finish = svc.CompletionFinish(choices=[ending], usage=usage_of(usage))
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


def _reasoning_block_events(block: object) -> list[svc.StreamCompletionResponse]:
    """A whole answer's reasoningContent block: its text then its signature, or its redacted bytes."""
    if not isinstance(block, Mapping):
        raise UnusableAnswer("a reasoningContent block that is not an object")
    if "redactedContent" in block:
        return _reasoning_delta_events(block)
    text = block.get("reasoningText")
    if not isinstance(text, Mapping):
        raise UnusableAnswer("a reasoningContent block without reasoningText or redactedContent")
    events = _reasoning_delta_events({"text": text.get("text", "")})
    if text.get("signature"):
        events += _reasoning_delta_events({"signature": text["signature"]})
    return events


def _reasoning_delta_events(delta: object) -> list[svc.StreamCompletionResponse]:
    """One reasoningContent delta (a union: text, signature or redactedContent) as a ReasoningDelta; none for empty
    text, or a member newer than this code."""
    if not isinstance(delta, Mapping):
        raise UnusableAnswer("a reasoningContent delta that is not an object")
    if "redactedContent" in delta:
        redacted = delta["redactedContent"]
        if not isinstance(redacted, bytes):  # botocore decodes the blob's base64
            raise UnusableAnswer("redacted reasoning that is not bytes")
        return [svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(redacted=redacted))] if redacted else []
    for name in ("text", "signature"):
        if name in delta:
            value = delta[name]
            if not isinstance(value, str):
                raise UnusableAnswer(f"reasoning {name} that is not a string")
            if not value:
                return []
            reasoning = svc.ReasoningDelta(text=value) if name == "text" else svc.ReasoningDelta(signature=value)
            return [svc.StreamCompletionResponse(reasoning=reasoning)]
    return []
