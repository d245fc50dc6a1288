"""Gemini generateContent shapes to and from the core's proto, without the SDK: requests as the plain dicts
google-genai accepts, answers as the few facts the provider reads from each response, and both mapping tables
(finish reasons, upstream errors)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.errors import GatewayError, upstream_error

log = logging.getLogger(__name__)

PROVIDER = "gemini"
R = pb.ErrorReason
F = pb.FinishReason
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
# The model failed to produce an answer the gateway can relay (it never offers tools, so any tool call is broken),
# or the upstream named no reason at all: an UPSTREAM_PROTOCOL error, never a finish the answer did not reach.
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

# The one table of upstream failures: google.rpc status names first (they are the most specific), then the HTTP
# status. Anything neither knows is logged by the provider and reported as INTERNAL.
REASON_BY_STATUS = {
    "INVALID_ARGUMENT": R.ERROR_REASON_INVALID_REQUEST,
    "FAILED_PRECONDITION": R.ERROR_REASON_INVALID_REQUEST,  # e.g. no free tier in the caller's region
    "OUT_OF_RANGE": R.ERROR_REASON_INVALID_REQUEST,
    "UNAUTHENTICATED": R.ERROR_REASON_UPSTREAM_AUTH,
    "PERMISSION_DENIED": R.ERROR_REASON_UPSTREAM_AUTH,
    "NOT_FOUND": R.ERROR_REASON_MODEL_NOT_FOUND,
    "RESOURCE_EXHAUSTED": R.ERROR_REASON_RATE_LIMITED,
    "DEADLINE_EXCEEDED": R.ERROR_REASON_UPSTREAM_TIMEOUT,
    "INTERNAL": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "UNAVAILABLE": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
}
REASON_BY_CODE = {
    400: R.ERROR_REASON_INVALID_REQUEST,
    401: R.ERROR_REASON_UPSTREAM_AUTH,
    403: R.ERROR_REASON_UPSTREAM_AUTH,
    404: R.ERROR_REASON_MODEL_NOT_FOUND,
    408: R.ERROR_REASON_UPSTREAM_TIMEOUT,
    429: R.ERROR_REASON_RATE_LIMITED,
    500: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    502: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    503: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    504: R.ERROR_REASON_UPSTREAM_TIMEOUT,
}
# Caller-facing messages. Only the caller's own mistakes (INVALID_REQUEST) forward Google's words; the rest would
# leak upstream details, and a credentials failure is the gateway's, never the caller's.
_MESSAGES = {
    R.ERROR_REASON_UPSTREAM_AUTH: "The upstream serving '{model}' rejected the gateway's credentials.",
    R.ERROR_REASON_MODEL_NOT_FOUND: "The upstream serving '{model}' does not know its model.",
    R.ERROR_REASON_RATE_LIMITED: "The upstream serving '{model}' is rate limiting requests; retry later.",
    R.ERROR_REASON_UPSTREAM_TIMEOUT: "The upstream serving '{model}' did not answer in time.",
    R.ERROR_REASON_UPSTREAM_UNAVAILABLE: "The upstream serving '{model}' is unavailable.",
    R.ERROR_REASON_UPSTREAM_PROTOCOL: "The upstream serving '{model}' sent an answer the gateway cannot use.",
    R.ERROR_REASON_INTERNAL: "The gateway failed to serve '{model}'.",
}


def error(reason: pb.ErrorReason.ValueType, model: str, upstream_message: str = "") -> GatewayError:
    """The GatewayError for `reason`; `model` is the public name."""
    return upstream_error(
        reason, model=model, provider=PROVIDER, templates=_MESSAGES, upstream_message=upstream_message
    )


def error_reason(code: object, status: object, details: object) -> pb.ErrorReason.ValueType | None:
    """The reason for an upstream error (HTTP status, google.rpc status name, error body); None if unknown."""
    if _api_key_rejected(details):  # Google answers a bad key with 400 INVALID_ARGUMENT
        return R.ERROR_REASON_UPSTREAM_AUTH
    if isinstance(status, str) and status in REASON_BY_STATUS:
        return REASON_BY_STATUS[status]
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    if code in REASON_BY_CODE:
        return REASON_BY_CODE[code]
    return R.ERROR_REASON_UPSTREAM_UNAVAILABLE if 500 <= code < 600 else None


def _api_key_rejected(details: object) -> bool:
    """Whether an error body carries ErrorInfo.reason API_KEY_INVALID (or another API_KEY_* reason)."""
    error = details.get("error", details) if isinstance(details, Mapping) else None
    entries = error.get("details") if isinstance(error, Mapping) else None
    if not isinstance(entries, list):
        return False
    return any(isinstance(entry, Mapping) and str(entry.get("reason", "")).startswith("API_KEY_") for entry in entries)


def to_request(params: pb.CompletionParams, model: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(contents, config) for generate_content: system messages become systemInstruction's parts, in order; user
    and assistant turns become user and model turns, consecutive ones of the same role merged into one."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    for message in params.messages:
        if message.role == pb.Role.ROLE_SYSTEM:
            system.append({"text": message.content})
            continue
        role = _ROLES[message.role]
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": message.content})
        else:
            contents.append({"role": role, "parts": [{"text": message.content}]})
    if not contents:
        raise GatewayError(
            R.ERROR_REASON_INVALID_REQUEST,
            f"'{model}' needs at least one user or assistant message besides system messages.",
            param="messages",
            provider=PROVIDER,
        )
    config: dict[str, Any] = {}
    if system:
        config["system_instruction"] = {"parts": system}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "max_output_tokens")):
        if params.HasField(ours):
            config[theirs] = getattr(params, ours)
    if params.stop_sequences:
        config["stop_sequences"] = list(params.stop_sequences)
    return contents, config


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """usageMetadata's counts; None where Gemini did not report one. totalTokenCount is not read: see usage()."""

    prompt: int | None = None
    candidates: int | None = None
    thoughts: int | None = None
    cached: int | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """What the gateway reads from one GenerateContentResponse (a stream chunk, or a whole answer)."""

    parts: tuple[tuple[bool, str], ...] = ()  # (is a thought, text), in order; parts without text left out
    function_call: bool = False  # the candidate holds a functionCall part
    finish_reason: str | None = None  # candidates[0].finishReason
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


class Answer:
    """Turns one answer's chunks into events: reasoning and content deltas as they come, then one finish."""

    def __init__(self, model: str) -> None:
        self._model = model  # the public name, for error messages
        self._finish: str | None = None
        self._blocked = False
        self._function_call = False
        self._usage: UsageCounts | None = None

    def events(self, chunk: Chunk) -> Iterator[svc.StreamCompletionResponse]:
        """The deltas of one chunk; remembers its finish reason and usage (the last chunk's usage wins)."""
        for thought, text in chunk.parts:
            if thought:
                yield svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=text))
            else:
                yield svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text))
        self._function_call = self._function_call or chunk.function_call
        if chunk.finish_reason is not None:
            self._finish = chunk.finish_reason
        if chunk.block_reason is not None:
            self._blocked = True
        if chunk.usage is not None:
            self._usage = chunk.usage

    def finish(self) -> svc.StreamCompletionResponse:
        """The last event; raises UPSTREAM_PROTOCOL when the answer ended without a usable finish reason."""
        if self._blocked and self._finish is None:
            # A refused prompt is answered like a filtered answer: empty content, finish_reason content_filter.
            reason: pb.FinishReason.ValueType | None = F.FINISH_REASON_CONTENT_FILTER
        elif self._finish is None:  # cut short: never a fabricated stop
            raise self._unusable("ended its answer without a finish reason")
        else:
            reason = finish_reason(self._finish, self._function_call)
            if reason is None:
                raise self._unusable(f"ended its answer with finish reason {self._finish}, which cannot be relayed")
        finish = svc.CompletionFinish(finish_reason=reason)
        if self._usage is not None:
            finish.usage.CopyFrom(usage(self._usage))
        return svc.StreamCompletionResponse(finish=finish)

    def _unusable(self, what: str) -> GatewayError:
        log.warning("gemini upstream for %s %s", self._model, what)
        return GatewayError(
            R.ERROR_REASON_UPSTREAM_PROTOCOL, f"The upstream serving '{self._model}' {what}.", provider=PROVIDER
        )
