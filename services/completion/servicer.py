"""CompletionService, thin: observe the call, check the request, dispatch it to a deployment, relay the events.

CountTokens shares the door (the same authentication, key check and validation, in the same order) but not the rest:
it generates nothing, so it is neither metered nor held against the key's rate limits or budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services import genai
from services.completion.count import count_tokens
from services.completion.fold import Fold
from services.completion.relay import relay
from services.completion.validation import MAX_USER, check_params, check_supported
from services.dispatch import Dispatcher, Route, build_routes
from services.errors import GatewayError, shown
from services.images import ImageFetcher, remote_images
from services.metrics import CoreMetrics, Measurement, status_of
from services.policy.gate import Admission, Outcome, Policy, Principal, Tokens, prompt_estimate
from services.policy.limits import Grant
from services.providers import ProviderRegistry, TokenCounter
from startup import tracing

log = logging.getLogger(__name__)
requests_log = logging.getLogger("services.requests")

T = TypeVar("T")
# gRPC metadata the core reads: the bridge sends the id it returns to its client. The caller's key comes in
# `authorization` (services/policy/gate.py), and its identity is what the key says, never what a caller claims.
REQUEST_ID = "x-request-id"
# Trailing metadata of a served completion.
OVERHEAD = "x-modelmax-overhead-ms"  # the core's own time
DEPLOYMENT = "x-modelmax-deployment"  # the deployment that served
ATTEMPTS = "x-modelmax-attempts"  # tries it took, retries and fallbacks included
_MAX_METADATA_VALUE = 128  # a longer request id is not trusted into logs
_SERVICE = "modelmax.v1.CompletionService"  # rpc.service of the core's spans, named "{rpc.service}/{rpc.method}"


@dataclass(slots=True)
class Call:
    """One completion call as the servicer follows it: its measurement, and who is calling once that is known."""

    request_id: str
    stream: bool
    measurement: Measurement
    principal: Principal | None = None
    admission: Admission | None = None
    grant: Grant | None = None  # its hold on the key's rate limits, settled when it ends
    limits: tuple[tuple[str, str], ...] = ()  # a unary call's x-ratelimit-* values, sent with its trailers
    trace: tracing.Context | None = None  # with tracing on: the context of the call's SERVER span, parent of tries


class CompletionServicer(svc_grpc.CompletionServiceServicer):
    """Per call: observe (metrics, one log line, errors to statuses), check, dispatch, relay. Nothing else."""

    def __init__(
        self,
        registry: ProviderRegistry,
        dispatcher: Dispatcher,
        metrics: CoreMetrics,
        policy: Policy,
        max_concurrent: int = 1024,
    ) -> None:
        self._registry = registry
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._policy = policy
        self._max_concurrent = max_concurrent
        self._active = 0
        self._images = ImageFetcher(registry.catalog.remote_images)

    async def StreamCompletion(  # noqa: N802 (gRPC method name)
        self,
        request: svc.StreamCompletionRequest,
        context: grpc.aio.ServicerContext[svc.StreamCompletionRequest, svc.StreamCompletionResponse],
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        params = request.params
        batches = request.accept_batches
        async with self._observe(params, context, stream=True) as call:
            async with aclosing(self._events(params, call, context, incremental=True)) as events:
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
                        context.set_trailing_metadata(_trailers(call.measurement))
                    yield event  # awaits HTTP/2 flow control: this is the backpressure

    async def CreateCompletion(  # noqa: N802
        self,
        request: svc.CreateCompletionRequest,
        context: grpc.aio.ServicerContext[svc.CreateCompletionRequest, svc.CreateCompletionResponse],
    ) -> svc.CreateCompletionResponse:
        fold = Fold()
        async with self._observe(request.params, context, stream=False) as call:
            async with aclosing(self._events(request.params, call, context, incremental=False)) as events:
                async for event in events:
                    fold.add(event)
            response = fold.result(request.params.model)
            context.set_trailing_metadata(_trailers(call.measurement) + call.limits)
        return response

    async def ListModels(  # noqa: N802
        self,
        request: svc.ListModelsRequest,
        context: grpc.aio.ServicerContext[svc.ListModelsRequest, svc.ListModelsResponse],
    ) -> svc.ListModelsResponse:
        try:
            principal = await self._policy.authenticate(context.invocation_metadata())
        except GatewayError as exc:
            await context.abort_with_status(exc.to_status())  # type: ignore[attr-defined]  # a grpc-stubs gap
            raise  # not reached: abort raises
        return svc.ListModelsResponse(
            models=[
                svc.ModelInfo(id=entry.name, provider=entry.provider, owned_by=entry.owned_by)
                for entry in self._registry.catalog.entries
                if principal.allows(entry.name)  # a key sees only the models it may use
            ]
        )

    async def CountTokens(  # noqa: N802
        self,
        request: svc.CountTokensRequest,
        context: grpc.aio.ServicerContext[svc.CountTokensRequest, svc.CountTokensResponse],
    ) -> svc.CountTokensResponse:
        params = request.params
        try:
            principal = await self._policy.authenticate(context.invocation_metadata())
            check_params(params)
            self._policy.check_model(principal, params.model)
            route = self._dispatcher.route(params.model)
            check_supported(params, route.supported, provider=route.kind)
            # Not admitted, limited or metered: nothing is generated or billed, and a caller sizing its prompt
            # before a completion must not spend the rate or budget that completion needs.
            deployment = route.deployments[0]  # the one a completion tries first when none is cooling down
            wanted = remote_images(params)
            if wanted and isinstance(deployment.provider, TokenCounter):  # an upstream count needs the bytes
                await self._images.resolve(wanted)
            tokens, estimated = await count_tokens(deployment.provider, params)
        except GatewayError as exc:
            await context.abort_with_status(exc.to_status())  # type: ignore[attr-defined]  # a grpc-stubs gap
            raise  # not reached: abort raises
        except Exception as exc:  # noqa: BLE001 (a bug: report INTERNAL, log once with the traceback)
            internal = _internal(exc, params.model, _request_id(context.invocation_metadata())).to_status()
            await context.abort_with_status(internal)  # type: ignore[attr-defined]  # as above
            raise  # not reached
        return svc.CountTokensResponse(input_tokens=tokens, estimated=estimated, deployment=deployment.label)

    async def aclose(self) -> None:
        """Release what the servicer owns (the remote-image session); called once, when the core stops."""
        await self._images.aclose()

    async def _events(
        self,
        params: pb.CompletionParams,
        call: Call,
        context: grpc.aio.ServicerContext[Any, Any],  # either completion RPC's
        *,
        incremental: bool,
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        """Check the request and the key's rights to it, dispatch it, and relay the started completion's events."""
        measurement = call.measurement
        check_params(params)
        assert call.principal is not None  # _observe authenticated the call
        self._policy.check_model(call.principal, params.model)
        route = self._dispatcher.route(params.model)
        check_supported(params, route.supported, provider=route.kind)
        admission = self._policy.admit(call.principal, params, route.price)
        call.grant = await self._policy.limit(call.principal, params, call.request_id)  # None: a key without limits
        if call.grant is not None and (limits := call.grant.usage.metadata()):
            if call.stream:  # the bridge's x-ratelimit-* headers go before the first SSE byte: before any event
                await context.send_initial_metadata(limits)
            else:  # a whole answer: with its trailers, since a send of their own costs a batch of gRPC's per call
                call.limits = limits
        if admission.budget is not None:
            await self._policy.reserve(admission, params)  # a store round trip, for keys with a budget only
        call.admission = admission  # from here on the request is metered, however it ends
        wanted = remote_images(params)
        if wanted:  # once per request, before any deployment is tried: a retry or fallback reuses the bytes
            await _waited(self._images.resolve(wanted), measurement)  # network time, not the core's overhead
        started = await self._dispatcher.dispatch(
            route, params, measurement, incremental=incremental, time_remaining=context.time_remaining(),
            trace=call.trace,
        )  # fmt: skip
        async with aclosing(relay(started, params, measurement)) as events:  # closed at once if our caller leaves
            async for event in events:
                yield event

    @asynccontextmanager
    async def _observe(
        self,
        params: pb.CompletionParams,
        context: grpc.aio.ServicerContext[Any, Any],  # either completion RPC's
        *,
        stream: bool,
    ) -> AsyncIterator[Call]:
        """Authenticate and measure one completion, turn its failure into a gRPC status, and record metrics, usage
        and one log line."""
        route = self._route_or_none(params.model)
        measurement = Measurement(params.model if route else "unknown", route.kind if route else "none", self._metrics)
        metadata = context.invocation_metadata()
        call = Call(_request_id(metadata), stream, measurement)
        span = None
        if tracing.current is not None:  # off, the call pays this one check
            span = _server_span(tracing.current, metadata, measurement, stream)
            call.trace = tracing.context_of(span)
        self._active += 1
        status, upstream = "ok", None
        try:
            if self._active > self._max_concurrent:
                raise GatewayError(
                    pb.ErrorReason.ERROR_REASON_OVERLOADED, "The gateway is overloaded; retry shortly.", retry_after=1.0
                )
            call.principal = await self._policy.authenticate(metadata)  # the store only when the cache misses
            measurement.key_id = call.principal.key_id
            yield call
        except GatewayError as exc:
            status = status_of(exc.reason)
            upstream = status if exc.provider else None
            if exc.headers:  # a key over its rate limit: its x-ratelimit-* values go with the refusal
                await context.send_initial_metadata(exc.headers)
            # grpc.aio's context has abort_with_status (grpc/aio/_base_server.py); grpc-stubs 1.53 does not declare it
            await context.abort_with_status(exc.to_status())  # type: ignore[attr-defined]
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"  # the caller went away; the provider's stream was closed on the way out
            raise
        except Exception as exc:  # noqa: BLE001 (a bug: report INTERNAL, log once with the traceback)
            status = "internal"
            internal = _internal(exc, params.model, call.request_id).to_status()
            await context.abort_with_status(internal)  # type: ignore[attr-defined]  # as above: a grpc-stubs gap
        finally:
            self._active -= 1
            if span is not None:
                _end_server_span(span, measurement, status)
            duration = measurement.record(status, upstream)
            if call.admission is not None and self._policy.writer is not None:  # admitted, with a store: metered
                self._policy.meter(call.admission, _outcome(call, status, duration), params)
            if call.grant is not None:
                self._policy.unlimit(call.grant, _used_tokens(measurement, params))
            principal = call.principal
            if requests_log.isEnabledFor(logging.INFO):  # the line's fields cost more than the check
                requests_log.info(
                    "completion",
                    extra={
                        "request_id": call.request_id,
                        "key_id": principal.key_id if principal else "",
                        "key_name": principal.name if principal else "",
                        "model": measurement.model,
                        "provider": measurement.provider,
                        "deployment": measurement.deployment,
                        "attempts": measurement.attempts,
                        # the caller's id for its end user, as given (never prompts or keys); cut if it was refused
                        "user": params.user if len(params.user) <= MAX_USER else shown(params.user),
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

    def _route_or_none(self, model: str) -> Route | None:
        try:
            return self._dispatcher.route(model)
        except GatewayError:
            return None


def create_servicer(
    registry: ProviderRegistry,
    metrics: CoreMetrics,
    policy: Policy,
    max_concurrent: int = 1024,
    routes: Mapping[str, Route] | None = None,
) -> CompletionServicer:
    """The servicer over the registry's routes (`routes`, when the caller built them to watch them too), checking
    every call with `policy` and recording into `metrics`."""
    routes = build_routes(registry) if routes is None else routes
    return CompletionServicer(registry, Dispatcher(routes, metrics), metrics, policy, max_concurrent)


def _server_span(
    tracer: tracing.Tracing, metadata: Iterable[tuple[str, str | bytes]] | None, m: Measurement, stream: bool
) -> tracing.Span:
    """The core's SERVER span of one completion call, child of the caller's (the bridge's) W3C trace context."""
    method = "StreamCompletion" if stream else "CreateCompletion"
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": _SERVICE,
        "rpc.method": method,
        "gen_ai.operation.name": genai.OPERATION_CHAT,
        "gen_ai.request.model": m.model,  # "unknown" for a name the catalog does not have, as in the metrics
    }
    parent = tracing.parent_in(tuple(metadata or ()))
    return tracer.start(f"{_SERVICE}/{method}", tracing.SpanKind.SERVER, parent, attributes)


def _end_server_span(span: tracing.Span, m: Measurement, status: str) -> None:
    attributes: dict[str, str | int] = {"gen_ai.provider.name": genai.provider_name(m.provider)}
    if m.key_id:
        attributes["modelmax.key_id"] = m.key_id  # the key's public id, never the key
    if m.attempts:
        attributes["modelmax.attempts"] = m.attempts
        attributes["modelmax.deployment"] = m.deployment
    tracing.end(span, "" if status == "ok" else status, attributes)


def _trailers(measurement: Measurement) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a served completion: which deployment, after how many tries, the core's own time."""
    return (
        (DEPLOYMENT, measurement.deployment),
        (ATTEMPTS, str(measurement.attempts)),
        (OVERHEAD, f"{measurement.overhead() * 1000:.3f}"),
    )


def _request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The request id from the call's metadata; a direct caller that sent none still gets a traceable log line."""
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= _MAX_METADATA_VALUE:
            return value
    return uuid.uuid4().hex


def _outcome(call: Call, status: str, duration: float) -> Outcome:
    m = call.measurement
    usage = None
    if m.prompt_tokens is not None and m.completion_tokens is not None:
        usage = Tokens(m.prompt_tokens, m.completion_tokens, m.cached_tokens, m.reasoning_tokens)
    return Outcome(
        request_id=call.request_id,
        model=m.model,
        deployment=m.deployment,
        provider=m.provider,
        status=status,
        stream=call.stream,
        duration_s=duration,
        first_token_s=None if m.first_token is None else m.first_token - m.started,
        usage=usage,
        output_chars=m.output_chars,
        produced=m.first_token is not None,
    )


def _used_tokens(m: Measurement, params: pb.CompletionParams) -> int:
    """What a completion counts against its key's tokens per minute: the provider's usage, or for a stream cut
    before its usage came, the prompt's estimate and the output relayed (4 characters a token); 0 if nothing ran."""
    if m.prompt_tokens is not None and m.completion_tokens is not None:
        return m.prompt_tokens + m.completion_tokens
    if m.first_token is None:
        return 0
    return prompt_estimate(params) + -(-m.output_chars // 4)


async def _waited(step: Awaitable[T], measurement: Measurement) -> T:
    """Await a provider step, counting the time as the provider's, not the gateway's."""
    started = time.perf_counter()
    try:
        return await step
    finally:
        measurement.provider_wait += time.perf_counter() - started


def _internal(exc: Exception, model: str, request_id: str) -> GatewayError:
    log.exception("internal error serving model %s (request %s)", model, request_id, exc_info=exc)
    return GatewayError(pb.ErrorReason.ERROR_REASON_INTERNAL, "The gateway failed to serve this request.")
