"""The event contract every caller sees: `start` once a provider produced output, its events, exactly one finish."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services import genai
from services.dispatch import Started, next_event
from services.errors import GatewayError
from services.metrics import Measurement, status_of

log = logging.getLogger(__name__)

_NO_REASON = pb.FinishReason.FINISH_REASON_UNSPECIFIED  # read on every request: looked up once
_BATCHABLE = frozenset({"delta", "reasoning", "tool_call"})


async def relay(
    started: Started, params: pb.CompletionParams, measurement: Measurement
) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
    """One started completion: `start`, then the provider's events up to its finish (by `started.end`, if set).

    A provider stream that ends without a finish, or finishes without a reason for every choice asked, broke the
    contract: UPSTREAM_PROTOCOL, never an invented `stop`. Closing this generator closes the provider's stream, and
    however it ends, it ends the started attempt (its duration and span): with the usage once the finish is out.
    """
    stream, deployment = started.stream, started.deployment
    error = "cancelled"  # unless the finish went out, or a failure says otherwise
    usage: pb.Usage | None = None
    reasons: tuple[str, ...] = ()
    fold = None
    if started.attempt.captures_content:  # the answer, for an operator who opted in (fold imports this module)
        from services.completion.fold import Fold

        fold = Fold()
    output: str | None = None
    try:
        if started.first is None:
            raise protocol_error("the provider's stream ended before any output", params.model)
        yield svc.StreamCompletionResponse(
            start=svc.CompletionStart(
                model=params.model, created=int(time.time()), deployment=deployment.label, attempts=started.attempts
            )
        )
        event: svc.StreamCompletionResponse | None = started.first
        while event is not None:
            if event.HasField("finish"):
                check_finish(event.finish, params)
                if event.finish.HasField("usage"):
                    usage = event.finish.usage
                    measurement.prompt_tokens = usage.prompt_tokens
                    measurement.completion_tokens = usage.completion_tokens
                    measurement.cached_tokens = usage.cached_tokens
                    measurement.reasoning_tokens = usage.reasoning_tokens
                if started.attempt.span is not None:  # the names only a span records
                    reasons = tuple(_reason_name(choice.finish_reason) for choice in event.finish.choices)
                if fold is not None:
                    fold.add(event)
                    output = genai.output_messages(fold.result(params.model).choices, reasons)
                error = ""  # complete: a caller that leaves now has had the whole answer
                yield event
                return
            if event.HasField("batch"):
                _check_batch(event.batch, params.model)
                measurement.output_chars += sum(map(_chars, event.batch.events))
            else:
                measurement.output_chars += _chars(event)
            measurement.token()  # the first output, whether one event or a batch: TTFT is when it arrived
            if fold is not None:
                fold.add(event)
            yield event
            event = await next_event(stream, measurement, started.end, deployment.label)
        raise protocol_error("the provider's stream ended before it finished", params.model)
    except GatewayError as exc:
        error = status_of(exc.reason)
        raise
    except Exception:
        error = "internal"
        raise
    finally:
        try:
            await stream.aclose()  # closes the upstream call when the caller went away or failed
        finally:
            started.attempt.end(error, usage, reasons, output)


def _reason_name(reason: pb.FinishReason.ValueType) -> str:
    """gen_ai.response.finish_reasons' words: "stop", "length", "tool_calls", "content_filter"."""
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def _chars(event: svc.StreamCompletionResponse) -> int:
    """The characters of output one event carries."""
    kind = event.WhichOneof("event")
    if kind == "delta":
        return len(event.delta.text)
    if kind == "reasoning":
        return len(event.reasoning.text)
    if kind == "tool_call":
        return len(event.tool_call.name) + len(event.tool_call.arguments)
    return 0


def check_finish(finish: svc.CompletionFinish, params: pb.CompletionParams) -> None:
    """A finish gives one reason per choice the request asked for, in index order; a provider that lost one (or
    sent none) broke the contract."""
    choices = finish.choices
    wanted = max(params.choice_count, 1)
    if len(choices) == 1 == wanted and choices[0].index == 0:  # the common case, checked without a loop
        if choices[0].finish_reason == _NO_REASON:
            raise protocol_error("the provider finished without a finish reason", params.model)
        return
    if not choices or any(choice.finish_reason == _NO_REASON for choice in choices):
        raise protocol_error("the provider finished without a finish reason", params.model)
    if len(choices) != wanted or any(choice.index != index for index, choice in enumerate(choices)):
        raise protocol_error(f"the provider finished {len(choices)} choices of {wanted}", params.model)


def _check_batch(batch: svc.EventBatch, model: str) -> None:
    """A provider's batch holds deltas, reasonings and tool calls only, and at least one (the proto's contract)."""
    if not batch.events or any(event.WhichOneof("event") not in _BATCHABLE for event in batch.events):
        raise protocol_error("the provider sent a batch that is empty or holds other events", model)


def protocol_error(message: str, model: str) -> GatewayError:
    log.warning("upstream protocol error for model %s: %s", model, message)
    return GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL, message)
