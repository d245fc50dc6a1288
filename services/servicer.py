"""CompletionService: routes a public model name to its provider and relays the provider's events."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

import grpc

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.errors import GatewayError
from services.images import ImageFetcher, remote_images
from services.metrics import CoreMetrics, Measurement, status_of
from services.providers import ProviderRegistry
from services.routing import NEXT_DEPLOYMENT, RETRYABLE, Deployment, Route
from services.validation import check_params

log = logging.getLogger(__name__)
requests_log = logging.getLogger("services.requests")

T = TypeVar("T")
_NO_REASON = pb.FinishReason.FINISH_REASON_UNSPECIFIED  # read on every request: looked up once
REQUEST_ID = "x-request-id"  # gRPC metadata key; the bridge sends the id it returns to its client
OVERHEAD = "x-modelmax-overhead-ms"  # trailing metadata: the core's own time
DEPLOYMENT = "x-modelmax-deployment"  # trailing metadata: the deployment that served
ATTEMPTS = "x-modelmax-attempts"  # trailing metadata: tries it took, retries and fallbacks included


class CompletionServicer(svc_grpc.CompletionServiceServicer):
    """Thin: validation, routing and the event contract (start, deltas, one finish) live here; I/O in providers."""

    def __init__(self, registry: ProviderRegistry, metrics: CoreMetrics, max_concurrent: int = 1024) -> None:
        self._registry = registry
        self._metrics = metrics
        self._max_concurrent = max_concurrent
        self._active = 0
        self._images = ImageFetcher(registry.catalog.remote_images)
        self._providers = {entry.name: entry.provider for entry in registry.catalog.entries}
        self._routes = {
            entry.name: Route(
                entry.name,
                [
                    Deployment(
                        f"{index}:{deployment.provider}:{deployment.model}",
                        deployment.provider,
                        provider,
                        deployment.weight,
                        deployment.timeouts,
                    )  # fmt: skip
                    for index, (deployment, provider) in enumerate(registry.deployments[entry.name])
                ],
                entry.retry,
                entry.cooldown,
            )
            for entry in registry.catalog.entries
        }

    async def StreamCompletion(  # noqa: N802 (gRPC method name)
        self, request: svc.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        params = request.params
        batches = request.accept_batches
        async with self._observe(params, context, stream=True) as measurement:
            async with aclosing(self._events(params, measurement, incremental=True)) as events:
                async for event in events:
                    if event.HasField("batch"):  # events the provider had ready together: one message if accepted
                        if batches:
                            yield event
                        else:
                            for inner in event.batch.events:
                                yield inner
                        continue
                    if event.HasField("finish"):
                        if not params.include_usage:
                            event.finish.ClearField("usage")
                        context.set_trailing_metadata(_trailers(measurement))
                    yield event  # awaits HTTP/2 flow control: this is the backpressure

    async def CreateCompletion(  # noqa: N802
        self, request: svc.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> svc.CreateCompletionResponse:
        response = svc.CreateCompletionResponse()
        pieces: list[str] = []  # choice 0's text: the common case stays two lists and no other allocation
        reasoning: list[str] = []
        more: _Fold | None = None  # the rest (tool calls, choices 1..n-1), created only when the answer has any
        async with self._observe(request.params, context, stream=False) as measurement:
            async with aclosing(self._events(request.params, measurement, incremental=False)) as events:
                async for event in events:
                    kind = event.WhichOneof("event")
                    if kind == "start":
                        response.id = event.start.id
                        response.model = event.start.model
                        response.created = event.start.created
                        response.deployment = event.start.deployment
                        response.attempts = event.start.attempts
                    elif kind == "finish":
                        finish = event.finish
                        response.finish_reason = finish.finish_reason
                        response.usage.CopyFrom(finish.usage)
                        for index, reason in enumerate(finish.additional_finish_reasons, 1):
                            response.additional_choices.add(index=index, finish_reason=reason)
                    else:  # a delta, reasoning or tool call, or a batch of them
                        for item in event.batch.events if kind == "batch" else (event,):
                            part = item.WhichOneof("event")
                            if part == "delta":
                                delta = item.delta
                                if delta.choice_index:
                                    more = more or _Fold()
                                    more.text(more.contents, delta.choice_index, delta.text)
                                else:
                                    pieces.append(delta.text)
                            elif part == "tool_call":
                                more = more or _Fold()
                                more.tool_call(item.tool_call)
                            elif part == "reasoning":
                                thought = item.reasoning
                                if thought.choice_index:
                                    more = more or _Fold()
                                    more.text(more.reasonings, thought.choice_index, thought.text)
                                else:
                                    reasoning.append(thought.text)
            response.content = "".join(pieces)
            response.reasoning_content = "".join(reasoning)
            if more is not None:
                more.fill(response, request.params.model)
            context.set_trailing_metadata(_trailers(measurement))
        return response

    async def aclose(self) -> None:
        """Release what the servicer owns (the remote-image session); called once, when the core stops."""
        await self._images.aclose()

    async def ListModels(  # noqa: N802
        self, request: svc.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> svc.ListModelsResponse:
        return svc.ListModelsResponse(
            models=[
                svc.ModelInfo(id=entry.name, provider=entry.provider, owned_by=entry.owned_by)
                for entry in self._registry.catalog.entries
            ]
        )

    async def _events(
        self, params: pb.CompletionParams, measurement: Measurement, *, incremental: bool
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        """The contract every caller sees: `start` once a provider produced output, its deltas, exactly one finish.

        Deployments are tried per the route: a retryable failure before the first output retries (with backoff)
        and then falls back to the next deployment, within the route's time budget. Once the first event has
        gone out, the completion stays on its deployment: a later failure ends it, never a splice of two
        upstreams. A provider stream that ends without a finish is an upstream protocol error, never a `stop`.
        """
        check_params(params)
        route = self._routes.get(params.model)
        if route is None:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_MODEL_NOT_FOUND,
                f"The model '{params.model}' does not exist or you do not have access to it.",
                param="model",
            )
        wanted = remote_images(params)
        if wanted:  # once per request, before any deployment is tried: a retry or fallback reuses the bytes
            await _waited(self._images.resolve(wanted), measurement)  # network time, not the core's overhead
        deadline = time.monotonic() + route.retry.budget_seconds
        attempts = 0
        failure: GatewayError | None = None
        for position, deployment in enumerate(route.plan()):
            if position > 0:
                self._metrics.fallbacks_of(measurement.model).inc()
            for try_index in range(route.retry.attempts):
                if try_index > 0:
                    self._metrics.retries_of(measurement.model, deployment.kind).inc()
                attempts += 1
                stream = deployment.provider.stream(params, incremental=incremental)
                limits = deployment.timeouts
                loop_now = asyncio.get_running_loop().time()
                end = None if limits.total_seconds is None else loop_now + limits.total_seconds
                first_by = end if limits.first_token_seconds is None else loop_now + limits.first_token_seconds
                if end is not None and first_by is not None:
                    first_by = min(first_by, end)
                try:
                    # Pre-stream failures surface here, and so does a provider that never starts answering.
                    first = await _step(stream, measurement, first_by, deployment.label)
                except GatewayError as exc:
                    await stream.aclose()
                    if exc.reason not in RETRYABLE and exc.reason not in NEXT_DEPLOYMENT:
                        raise  # the request itself is wrong: no other try would do better
                    route.failed(deployment)
                    failure = exc
                    if exc.reason not in RETRYABLE or try_index + 1 == route.retry.attempts:
                        break  # on to the next deployment
                    delay = route.backoff(try_index, exc.retry_after)
                    if time.monotonic() + delay >= deadline:
                        break
                    await asyncio.sleep(delay)
                    continue
                except BaseException:
                    await stream.aclose()
                    raise
                route.succeeded(deployment)
                measurement.deployment, measurement.attempts = deployment.label, attempts
                relay = self._relay(params, measurement, stream, first, deployment, attempts, end)
                async with aclosing(relay) as events:  # closed at once if our caller goes away
                    async for event in events:
                        yield event
                return
            if time.monotonic() >= deadline:
                break
        assert failure is not None
        raise failure

    async def _relay(
        self,
        params: pb.CompletionParams,
        measurement: Measurement,
        stream: AsyncIterator[svc.StreamCompletionResponse],
        first: svc.StreamCompletionResponse | None,
        deployment: Deployment,
        attempts: int,
        end: float | None,
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        """One started completion: `start`, then the provider's events up to its finish (by `end`, if set)."""
        try:
            if first is None:
                raise _protocol("the provider's stream ended before any output", params.model)
            yield svc.StreamCompletionResponse(
                start=svc.CompletionStart(
                    id=f"chatcmpl-{uuid.uuid4().hex}",
                    model=params.model,
                    created=int(time.time()),
                    deployment=deployment.label,
                    attempts=attempts,
                )
            )
            event: svc.StreamCompletionResponse | None = first
            while event is not None:
                if event.HasField("finish"):
                    if event.finish.finish_reason == _NO_REASON:
                        raise _protocol("the provider finished without a finish reason", params.model)
                    if params.choice_count > 1 or event.finish.additional_finish_reasons:
                        _check_choices(event.finish, params)
                    if event.finish.HasField("usage"):
                        measurement.prompt_tokens = event.finish.usage.prompt_tokens
                        measurement.completion_tokens = event.finish.usage.completion_tokens
                    yield event
                    return
                if event.HasField("batch"):
                    _check_batch(event.batch, params.model)
                measurement.token()  # the first output, whether one event or a batch: TTFT is when it arrived
                yield event
                event = await _step(stream, measurement, end, deployment.label)
            raise _protocol("the provider's stream ended before it finished", params.model)
        finally:
            await stream.aclose()  # closes the upstream call when the caller went away or failed

    @asynccontextmanager
    async def _observe(
        self, params: pb.CompletionParams, context: grpc.aio.ServicerContext, *, stream: bool
    ) -> AsyncIterator[Measurement]:
        """Measure one completion, turn its failure into a gRPC status, and record metrics and one log line."""
        provider = self._providers.get(params.model)
        measurement = Measurement(params.model if provider else "unknown", provider or "none")
        request_id = _request_id(context)
        inflight = self._metrics.inflight_of(measurement.model, measurement.provider)
        inflight.inc()
        self._active += 1
        status, upstream = "ok", None
        try:
            if self._active > self._max_concurrent:
                raise GatewayError(
                    pb.ErrorReason.ERROR_REASON_OVERLOADED, "The gateway is overloaded; retry shortly.", retry_after=1.0
                )
            yield measurement
        except GatewayError as exc:
            status = status_of(exc.reason)
            upstream = status if exc.provider else None
            await context.abort_with_status(exc.to_status())
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"  # the caller went away; the provider's stream was closed on the way out
            raise
        except Exception as exc:  # noqa: BLE001 (a bug: report INTERNAL, log once with the traceback)
            status = "internal"
            await context.abort_with_status(_internal(exc, params.model, request_id).to_status())
        finally:
            self._active -= 1
            inflight.dec()
            duration = measurement.record(self._metrics, status, upstream)
            if requests_log.isEnabledFor(logging.INFO):  # the line's fields cost more than the check
                requests_log.info(
                    "completion",
                    extra={
                        "request_id": request_id,
                        "model": measurement.model,
                        "provider": measurement.provider,
                        "user": params.user,  # the caller's id for its end user, as given (never prompts or keys)
                        "stream": stream,
                        "status": status,
                        "duration_ms": round(duration * 1000, 3),
                        "ttft_ms": None
                        if measurement.first_token is None
                        else round((measurement.first_token - measurement.started) * 1000, 3),
                        "prompt_tokens": measurement.prompt_tokens,
                        "completion_tokens": measurement.completion_tokens,
                        "overhead_ms": round(measurement.overhead() * 1000, 3),
                    },
                )


class _Call:
    """One tool call being folded: id and name from its first delta, the arguments' pieces in order."""

    __slots__ = ("id", "name", "arguments")

    def __init__(self, id: str, name: str, arguments: str) -> None:  # noqa: A002 (the proto's field name)
        self.id = id
        self.name = name
        self.arguments = [arguments]


class _Fold:
    """What CreateCompletion folds beyond choice 0's text and reasoning: tool calls, and choices 1..n-1."""

    __slots__ = ("contents", "reasonings", "calls")

    def __init__(self) -> None:
        self.contents: dict[int, list[str]] = {}  # choice index -> text pieces
        self.reasonings: dict[int, list[str]] = {}
        self.calls: dict[tuple[int, int], _Call] = {}  # (choice index, call index) -> call

    @staticmethod
    def text(into: dict[int, list[str]], choice: int, text: str) -> None:
        pieces = into.get(choice)
        if pieces is None:
            into[choice] = [text]
        else:
            pieces.append(text)

    def tool_call(self, delta: svc.ToolCallDelta) -> None:
        key = (delta.choice_index, delta.index)
        call = self.calls.get(key)
        if call is None:
            self.calls[key] = _Call(delta.id, delta.name, delta.arguments)
        else:
            call.arguments.append(delta.arguments)

    def fill(self, response: svc.CreateCompletionResponse, model: str) -> None:
        """Write the folded parts into `response` (choice 0) and its additional_choices (already one per reason)."""
        count = 1 + len(response.additional_choices)

        def choice(index: int) -> svc.CreateCompletionResponse | svc.Choice:
            if not 0 <= index < count:
                raise _protocol(f"the provider sent choice {index} of {count}", model)
            return response if index == 0 else response.additional_choices[index - 1]

        for index, pieces in self.contents.items():
            choice(index).content = "".join(pieces)
        for index, pieces in self.reasonings.items():
            choice(index).reasoning_content = "".join(pieces)
        for (index, _), call in sorted(self.calls.items(), key=lambda item: item[0]):
            choice(index).tool_calls.add(id=call.id, name=call.name, arguments="".join(call.arguments))


def _check_choices(finish: svc.CompletionFinish, params: pb.CompletionParams) -> None:
    """A finish gives one reason per choice the request asked for; a provider that lost one broke the contract."""
    wanted = max(params.choice_count, 1) - 1
    reasons = finish.additional_finish_reasons
    if len(reasons) != wanted or pb.FinishReason.FINISH_REASON_UNSPECIFIED in reasons:
        raise _protocol(f"the provider finished {1 + len(reasons)} choices of {wanted + 1}", params.model)


_BATCHABLE = frozenset({"delta", "reasoning", "tool_call"})


def _check_batch(batch: svc.EventBatch, model: str) -> None:
    """A provider's batch holds deltas, reasonings and tool calls only, and at least one (the proto's contract)."""
    if not batch.events or any(event.WhichOneof("event") not in _BATCHABLE for event in batch.events):
        raise _protocol("the provider sent a batch that is empty or holds other events", model)


def _trailers(measurement: Measurement) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a served completion: which deployment, after how many tries, the core's own time."""
    return (
        (DEPLOYMENT, measurement.deployment),
        (ATTEMPTS, str(measurement.attempts)),
        (OVERHEAD, f"{measurement.overhead() * 1000:.3f}"),
    )


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex  # a direct gRPC caller that sent none still gets a traceable log line


async def _step(
    stream: AsyncIterator[svc.StreamCompletionResponse], measurement: Measurement, by: float | None, label: str
) -> svc.StreamCompletionResponse | None:
    """The provider's next event, or UPSTREAM_TIMEOUT if it does not come by loop time `by`."""
    started = time.perf_counter()  # the wait is the provider's time, not the gateway's (as _waited, inline: hot)
    try:
        if by is None:
            return await anext(stream, None)
        try:
            async with asyncio.timeout_at(by):
                return await anext(stream, None)
        except TimeoutError:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_UPSTREAM_TIMEOUT, f"The deployment {label} did not answer in time."
            ) from None
    finally:
        measurement.provider_wait += time.perf_counter() - started


async def _waited(step: Awaitable[T], measurement: Measurement) -> T:
    """Await a provider step, counting the time as the provider's, not the gateway's."""
    started = time.perf_counter()
    try:
        return await step
    finally:
        measurement.provider_wait += time.perf_counter() - started


def _protocol(message: str, model: str) -> GatewayError:
    log.warning("upstream protocol error for model %s: %s", model, message)
    return GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL, message)


def _internal(exc: Exception, model: str, request_id: str) -> GatewayError:
    log.exception("internal error serving model %s (request %s)", model, request_id, exc_info=exc)
    return GatewayError(pb.ErrorReason.ERROR_REASON_INTERNAL, "The gateway failed to serve this request.")
