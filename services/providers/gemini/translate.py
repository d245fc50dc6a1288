"""Gemini generateContent shapes to and from the core's proto, without the SDK: requests as the plain dicts
google-genai accepts (contents, systemInstruction and the generation config), and answers as the few facts the
provider reads from each response, folded into the core's events (finish reasons, usage, several candidates).

The parts with rules of their own live beside it, SDK-free too: function calling, call ids and thought signatures in
`tools`, the reasoning_effort table in `thinking`, upstream errors in `errors`.

Gemini never says which stop sequence ended a candidate (its finishReason is STOP either way), so a finish's
`stop_sequence` stays empty.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.errors import GatewayError
from services.providers.gemini import tools as gemini_tools
from services.providers.gemini.errors import PROVIDER, invalid
from services.providers.gemini.thinking import Thinking, thinking_config

log = logging.getLogger(__name__)

R = pb.ErrorReason
F = pb.FinishReason
E = pb.ReasoningEffort
_ROLES = {pb.Role.ROLE_USER: "user", pb.Role.ROLE_ASSISTANT: "model"}

# Gemini finishReason -> OpenAI finish_reason. STOP becomes TOOL_CALLS when the answer holds function calls.
# Reasons missing here are never reported as a finish: see UNUSABLE and finish_reason().
FINISH_REASONS = {
    "STOP": F.FINISH_REASON_STOP,
    "MAX_TOKENS": F.FINISH_REASON_LENGTH,
    # The answer was withheld or cut by a policy: a filter, in OpenAI's words.
    "SAFETY": F.FINISH_REASON_CONTENT_FILTER,
    "RECITATION": F.FINISH_REASON_CONTENT_FILTER,
    "BLOCKLIST": F.FINISH_REASON_CONTENT_FILTER,
    "PROHIBITED_CONTENT": F.FINISH_REASON_CONTENT_FILTER,
    "SPII": F.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_SAFETY": F.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_PROHIBITED_CONTENT": F.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_RECITATION": F.FINISH_REASON_CONTENT_FILTER,
    "MODEL_ARMOR": F.FINISH_REASON_CONTENT_FILTER,
    "LANGUAGE": F.FINISH_REASON_CONTENT_FILTER,  # an unsupported language: Gemini withholds the answer
    "ESCALATION": F.FINISH_REASON_CONTENT_FILTER,  # "filtered by an escalation rule"
    "PUP_LIMITED_DISABLED": F.FINISH_REASON_CONTENT_FILTER,  # the account is limited by the Prohibited Use Policy
    # Ended for a reason Gemini does not name. The answer so far is all there is, as after a stop.
    "OTHER": F.FINISH_REASON_STOP,
    "IMAGE_OTHER": F.FINISH_REASON_STOP,
    "NO_IMAGE": F.FINISH_REASON_STOP,
}
# The model failed to produce an answer the gateway can relay: a function call it could not form, one to a function
# the request did not declare (or after tool_choice "none"), more calls than Gemini allows, a history Gemini refused
# mid-answer, or no reason at all. An UPSTREAM_PROTOCOL error, never a finish the answer did not reach.
UNUSABLE = {
    "FINISH_REASON_UNSPECIFIED",
    "MALFORMED_FUNCTION_CALL",
    "UNEXPECTED_TOOL_CALL",
    "TOO_MANY_TOOL_CALLS",
    "MISSING_THOUGHT_SIGNATURE",
    "MALFORMED_RESPONSE",
    "CONTINUATION",  # the SDK follows continuations itself; one left over has no token to resume with
}
# Words in a finish reason newer than this table that mark a policy stop.
_FILTER_WORDS = ("SAFETY", "PROHIBITED", "BLOCK", "RECITATION")
# CompletionParams fields sent as they are (the penalties only when not 0, the default), by their name in Gemini's
# config; the field names are Literals so that HasField checks them.
_SAMPLING: tuple[tuple[Literal["temperature", "top_p", "max_tokens"], str], ...] = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("max_tokens", "max_output_tokens"),
)
_PENALTIES: tuple[tuple[Literal["presence_penalty", "frequency_penalty"], str], ...] = (
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
)


# --- The request ---------------------------------------------------------------------------------------------------


def to_request(
    params: pb.CompletionParams,
    model: str,
    thinking: Mapping[pb.ReasoningEffort.ValueType, Thinking],
    *,
    placeholder_signatures: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(contents, config) for generate_content; `model` is the public name, `thinking` the reasoning_effort table.

    System messages become systemInstruction's parts, in order; user and assistant turns become user and model
    turns, tool results user turns, consecutive ones of the same role merged into one. `placeholder_signatures`
    (for models that require thought signatures) signs the function calls Gemini did not sign: see `tools`.
    An assistant message's `reasoning` is not sent: Gemini takes no reasoning back, and the thought signatures it
    does need travel in the ids of its tool calls (`tools`).
    """
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the tool messages that answer the calls
    for index, message in enumerate(params.messages):
        if message.role == pb.Role.ROLE_SYSTEM:
            system.extend(_content(message, index, images=False))
            continue
        if message.role == pb.Role.ROLE_TOOL:
            role, parts = "user", [gemini_tools.function_response_part(message, index, names)]
        else:
            role, parts = _ROLES[message.role], _content(message, index, images=True)
            for call_index, call in enumerate(message.tool_calls):
                names[call.id] = call.name
                parts.append(gemini_tools.function_call_part(call, f"messages[{index}].tool_calls[{call_index}]"))
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    if placeholder_signatures:
        gemini_tools.sign_unsigned_calls(contents)
    if not contents:
        raise invalid(f"'{model}' needs at least one user or assistant message besides system messages.", "messages")
    config: dict[str, Any] = {}
    if system:
        config["system_instruction"] = {"parts": system}
    for ours, theirs in _SAMPLING:
        if params.HasField(ours):
            config[theirs] = getattr(params, ours)
    if params.HasField("top_k"):
        config["top_k"] = params.top_k
    if params.stop_sequences:
        config["stop_sequences"] = list(params.stop_sequences)
    if params.HasField("choice_count") and params.choice_count > 1:
        config["candidate_count"] = params.choice_count
    if params.HasField("seed"):
        if not -(2**31) <= params.seed < 2**31:  # Gemini's seed is an int32
            raise invalid(f"'seed' must fit in 32 bits for '{model}', got {params.seed}", "seed")
        config["seed"] = params.seed
    for penalty, theirs in _PENALTIES:
        if params.HasField(penalty) and getattr(params, penalty) != 0:  # 0 is the default: not sent
            config[theirs] = getattr(params, penalty)
    config.update(gemini_tools.tool_config(params))
    config.update(_response_format(params.response_format))
    if params.reasoning_effort != E.REASONING_EFFORT_UNSPECIFIED:
        config["thinking_config"] = thinking_config(params.reasoning_effort, thinking, model)
    elif params.HasField("reasoning_budget_tokens"):  # never both: the core refuses that
        # A budget asked for explicitly (Anthropic's thinking.budget_tokens) is thinking the caller wants to see.
        config["thinking_config"] = {"thinking_budget": params.reasoning_budget_tokens, "include_thoughts": True}
    return contents, config


def _content(message: pb.Message, index: int, *, images: bool) -> list[dict[str, Any]]:
    """A message's text and image parts, in order. An assistant message that only called tools has none."""
    if not message.parts:
        if not message.content and message.tool_calls:
            return []
        return [{"text": message.content}]
    parts: list[dict[str, Any]] = []
    for part_index, part in enumerate(message.parts):
        if part.HasField("image"):
            where = f"messages[{index}].parts[{part_index}]"
            if not images:
                raise invalid("Gemini takes images only in user messages.", where)
            if not part.image.data:  # the core fetches remote images before a provider sees them
                raise invalid("The image was not fetched.", where)
            parts.append({"inlineData": {"mimeType": part.image.media_type, "data": part.image.data}})
        else:
            parts.append({"text": part.text})
    return parts


def _response_format(response_format: pb.ResponseFormat) -> dict[str, Any]:
    """responseMimeType (and responseJsonSchema, the schema as given) for structured output. Gemini always decodes
    to the schema, so `strict` is honoured either way; `name` and `description` have no place upstream."""
    kind = response_format.type
    if kind == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return {"response_mime_type": "application/json"}
    if kind == pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        config: dict[str, Any] = {"response_mime_type": "application/json"}
        if response_format.schema:
            config["response_json_schema"] = gemini_tools.schema(response_format.schema, "response_format")
        return config
    return {}


# --- The answer ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """usageMetadata's counts; None where Gemini did not report one. totalTokenCount is not read: see usage()."""

    prompt: int | None = None
    candidates: int | None = None
    thoughts: int | None = None
    cached: int | None = None


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """A functionCall part, as Gemini sent it."""

    name: str
    arguments: str  # args as compact JSON text
    id: str | None = None
    signature: bytes | None = None  # the part's thoughtSignature


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the gateway reads from one candidate of one response."""

    index: int  # the choice it is
    parts: tuple[tuple[bool, str] | FunctionCall, ...] = ()  # in order: (is a thought, text), or a function call
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """What the gateway reads from one GenerateContentResponse (a stream chunk, or a whole answer)."""

    candidates: tuple[Candidate, ...] = ()
    block_reason: str | None = None  # promptFeedback.blockReason: the prompt was refused, no candidates
    usage: UsageCounts | None = None


def usage(counts: UsageCounts) -> pb.Usage:
    """OpenAI usage from Gemini's: thinking is billed as output, and total is always prompt + completion (Gemini's
    totalTokenCount also counts toolUsePromptTokenCount, which OpenAI's usage has no place for)."""
    prompt = counts.prompt or 0
    completion = (counts.candidates or 0) + (counts.thoughts or 0)
    out = pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    if counts.thoughts is not None:
        out.reasoning_tokens = counts.thoughts
    if counts.cached is not None:
        out.cached_tokens = counts.cached
    return out


def finish_reason(name: str, function_call: bool) -> pb.FinishReason.ValueType | None:
    """OpenAI's finish reason for Gemini's; None when the answer is unusable (see UNUSABLE)."""
    if name in UNUSABLE:
        return None
    reason = FINISH_REASONS.get(name)
    if reason is None:  # a reason newer than this table
        log.warning("unknown Gemini finish reason %r", name)
        reason = F.FINISH_REASON_CONTENT_FILTER if any(w in name for w in _FILTER_WORDS) else F.FINISH_REASON_STOP
    if reason == F.FINISH_REASON_STOP and function_call:
        return F.FINISH_REASON_TOOL_CALLS
    return reason


@dataclass(slots=True)
class _Choice:
    """One candidate's progress."""

    finish: str | None = None
    calls: int = 0  # function calls seen, relayed or not


@dataclass(slots=True)
class Answer:
    """Turns one answer's chunks into events: reasoning, content and tool-call deltas as they come, then one finish.

    `choices` is how many candidates the request asked for; `parallel_tool_calls=False` relays only each candidate's
    first function call (Gemini has no switch for it).
    """

    model: str  # the public name, for error messages
    choices: int = 1
    parallel_tool_calls: bool = True
    _state: list[_Choice] = field(init=False)
    _blocked: bool = field(init=False, default=False)
    _usage: UsageCounts | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._state = [_Choice() for _ in range(self.choices)]

    def events(self, chunk: Chunk) -> Iterator[svc.StreamCompletionResponse]:
        """The deltas of one chunk; remembers finish reasons and usage (the last chunk's usage wins)."""
        for candidate in chunk.candidates:
            if not 0 <= candidate.index < self.choices:
                raise self._unusable(f"sent candidate {candidate.index}, which the request did not ask for")
            state = self._state[candidate.index]
            for part in candidate.parts:
                if isinstance(part, FunctionCall):
                    if self.parallel_tool_calls or state.calls == 0:
                        yield svc.StreamCompletionResponse(
                            tool_call=self._tool_call(candidate.index, state.calls, part)
                        )
                    state.calls += 1
                elif part[0]:
                    yield svc.StreamCompletionResponse(
                        reasoning=svc.ReasoningDelta(text=part[1], choice_index=candidate.index)
                    )
                else:
                    yield svc.StreamCompletionResponse(
                        delta=svc.ContentDelta(text=part[1], choice_index=candidate.index)
                    )
            if candidate.finish_reason is not None:
                state.finish = candidate.finish_reason
        if chunk.block_reason is not None:
            self._blocked = True
        if chunk.usage is not None:
            self._usage = chunk.usage

    def _tool_call(self, choice: int, index: int, call: FunctionCall) -> svc.ToolCallDelta:
        """A whole call in one delta: Gemini sends each functionCall complete."""
        if not call.name:
            raise self._unusable("sent a function call without a name")
        call_id = gemini_tools.mint_call_id(call.id, call.signature)
        return svc.ToolCallDelta(choice_index=choice, index=index, id=call_id, name=call.name, arguments=call.arguments)

    def finish(self) -> svc.StreamCompletionResponse:
        """The last event; raises UPSTREAM_PROTOCOL when a candidate ended without a usable finish reason."""
        reasons: list[pb.FinishReason.ValueType] = []
        for choice, state in enumerate(self._state):
            which = f" (candidate {choice})" if choice else ""
            if self._blocked and state.finish is None:
                # A refused prompt is answered like a filtered answer: empty content, finish_reason content_filter.
                reasons.append(F.FINISH_REASON_CONTENT_FILTER)
                continue
            if state.finish is None:  # cut short: never a fabricated stop
                raise self._unusable(f"ended its answer without a finish reason{which}")
            reason = finish_reason(state.finish, state.calls > 0)
            if reason is None:
                raise self._unusable(
                    f"ended its answer with finish reason {state.finish}{which}, which cannot be relayed"
                )
            reasons.append(reason)
        finish = svc.CompletionFinish(
            choices=[svc.ChoiceFinish(index=index, finish_reason=reason) for index, reason in enumerate(reasons)]
        )
        if self._usage is not None:
            finish.usage.CopyFrom(usage(self._usage))
        return svc.StreamCompletionResponse(finish=finish)

    def _unusable(self, what: str) -> GatewayError:
        log.warning("gemini upstream for %s %s", self.model, what)
        return GatewayError(
            R.ERROR_REASON_UPSTREAM_PROTOCOL, f"The upstream serving '{self.model}' {what}.", provider=PROVIDER
        )
