"""Bedrock Converse shapes, SDK-free: CompletionParams to a Converse request; answers and stream events to proto.

Converse wants what OpenAI does not insist on: system prompts apart from the turns, turns that alternate and start
with the user, and no blank text. Shaping rules (documented in the README):

- system messages become top-level `system` blocks, in order, wherever they were in the conversation;
- blank messages (empty or whitespace-only text, such as an assistant turn replayed with `content: null`) carry
  nothing and are left out, because Converse rejects blank text blocks;
- consecutive messages of one role become one turn, each message its own text block (no separator invented);
- the first turn must be the user's: a conversation that starts with an assistant message is refused, rather than
  preceded by a user message the caller never wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.errors import GatewayError

PROVIDER = "bedrock"
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
_ROLES = {pb.Role.ROLE_USER: "user", pb.Role.ROLE_ASSISTANT: "assistant"}


class UnusableAnswer(Exception):
    """The upstream's answer breaks the Converse contract; the message says how (for the log, not the caller)."""


def converse_request(model_id: str, params: pb.CompletionParams) -> dict[str, Any]:
    """The keyword arguments of `converse` / `converse_stream`: only what the caller set, nothing model-specific.

    `additionalModelRequestFields` is never sent: models reject fields they do not know (DeepSeek answers 400).
    """
    system: list[dict[str, str]] = []
    messages: list[dict[str, Any]] = []
    for message in params.messages:
        if not message.content.strip():
            continue
        block = {"text": message.content}
        if message.role == pb.Role.ROLE_SYSTEM:
            system.append(block)
        elif messages and messages[-1]["role"] == _ROLES[message.role]:
            messages[-1]["content"].append(block)
        else:
            messages.append({"role": _ROLES[message.role], "content": [block]})
    if not messages:
        raise _invalid_messages("'messages' must contain at least one user message with text.")
    if messages[0]["role"] != "user":
        raise _invalid_messages(
            "This model requires the conversation to start with a user message: "
            "the first non-system message with text is an assistant message."
        )
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
    return request


def _invalid_messages(message: str) -> GatewayError:
    return GatewayError(pb.ErrorReason.ERROR_REASON_INVALID_REQUEST, message, param="messages", provider=PROVIDER)


def converse_events(answer: Mapping[str, Any]) -> list[svc.StreamCompletionResponse]:
    """A whole Converse answer as the events a stream would have carried: reasoning and text in block order."""
    output = answer.get("output")
    message = output.get("message") if isinstance(output, Mapping) else None
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        raise UnusableAnswer("the answer has no output.message.content list")
    events: list[svc.StreamCompletionResponse] = []
    for block in content:
        if not isinstance(block, Mapping):
            raise UnusableAnswer("a content block is not an object")
        if "text" in block:
            events.extend(_text_event(block["text"]))
        elif "reasoningContent" in block:
            reasoning = block["reasoningContent"]
            text = reasoning.get("reasoningText", {}) if isinstance(reasoning, Mapping) else None
            if not isinstance(text, Mapping):
                raise UnusableAnswer("a reasoningContent block without reasoningText")
            events.extend(_reasoning_event(text.get("text", "")))  # redactedContent alone has no text to show
        # other blocks (toolUse, citations, ...) are never asked for: the request carries no tools
    events.append(finish_event(answer.get("stopReason"), answer.get("usage")))
    return events


class StreamFold:
    """ConverseStream events in, proto events out; the finish only once both messageStop and metadata arrived.

    Bedrock sends messageStart, contentBlockDelta..., contentBlockStop, messageStop (the stop reason), then metadata
    (usage). Unknown event types are skipped (botocore already skips unknown frames).
    """

    def __init__(self) -> None:
        self._stop_reason: object = None
        self._usage: object = None

    def feed(self, event: Mapping[str, Any]) -> list[svc.StreamCompletionResponse]:
        if "contentBlockDelta" in event:
            delta = event["contentBlockDelta"].get("delta")
            if not isinstance(delta, Mapping):
                raise UnusableAnswer("a contentBlockDelta without a delta")
            if "text" in delta:
                return _text_event(delta["text"])
            reasoning = delta.get("reasoningContent")
            if isinstance(reasoning, Mapping) and "text" in reasoning:
                return _reasoning_event(reasoning["text"])
            return []  # a reasoning signature, redacted reasoning, a tool-use or citation delta: nothing to show
        if "messageStop" in event:
            self._stop_reason = event["messageStop"].get("stopReason")
            if self._stop_reason is None:
                raise UnusableAnswer("messageStop without a stopReason")
        elif "metadata" in event:
            self._usage = event["metadata"].get("usage")
            if self._usage is None:
                raise UnusableAnswer("metadata without usage")
        return []

    def finish(self) -> svc.StreamCompletionResponse:
        """The finish event, once the stream ended; an error when it ended before messageStop or metadata."""
        if self._stop_reason is None:
            raise UnusableAnswer("the stream ended without messageStop")
        if self._usage is None:
            raise UnusableAnswer("the stream ended without metadata (usage)")
        return finish_event(self._stop_reason, self._usage)


def finish_event(stop_reason: object, usage: object) -> svc.StreamCompletionResponse:
    if not isinstance(stop_reason, str) or stop_reason not in FINISH_REASONS:
        raise UnusableAnswer(f"unknown stopReason {stop_reason!r}")
    finish = svc.CompletionFinish(finish_reason=FINISH_REASONS[stop_reason], usage=usage_of(usage))
    return svc.StreamCompletionResponse(finish=finish)


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


def _text_event(text: object) -> list[svc.StreamCompletionResponse]:
    if not isinstance(text, str):
        raise UnusableAnswer("a text block or delta whose text is not a string")
    return [svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text))] if text else []


def _reasoning_event(text: object) -> list[svc.StreamCompletionResponse]:
    if not isinstance(text, str):
        raise UnusableAnswer("reasoning text that is not a string")
    return [svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=text))] if text else []
