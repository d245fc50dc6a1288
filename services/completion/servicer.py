"""CompletionService, thin: observe the call, check the request, dispatch it to a deployment, relay the events."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.completion.fold import Fold
from services.completion.relay import relay
from services.completion.validation import MAX_USER, check_params, check_supported, shown
from services.dispatch import Dispatcher, Route, build_routes
from services.errors import GatewayError
from services.images import ImageFetcher, remote_images
from services.metrics import CoreMetrics, Measurement, status_of
from services.providers import ProviderRegistry

log = logging.getLogger(__name__)
requests_log = logging.getLogger("services.requests")

T = TypeVar("T")
# gRPC metadata the core reads: the bridge sends the id it returns to its client, and the caller's identity (the
# API key's public id and name, never the key itself).
REQUEST_ID = "x-request-id"
KEY_ID = "x-modelmax-key-id"
KEY_NAME = "x-modelmax-key-name"
# Trailing metadata of a served completion.
OVERHEAD = "x-modelmax-overhead-ms"  # the core's own time
DEPLOYMENT = "x-modelmax-deployment"  # the deployment that served
ATTEMPTS = "x-modelmax-attempts"  # tries it took, retries and fallbacks included
_MAX_METADATA_VALUE = 128  # longer request ids and identity values are not trusted into logs


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as the call's metadata says: for log lines and metrics, never for a secret."""

    request_id: str
    key_id: str = ""
    key_name: str = ""


class CompletionServicer(svc_grpc.CompletionServiceServicer):
    """Per call: observe (metrics, one log line, errors to statuses), check, dispatch, relay. Nothing else."""

    def __init__(
        self, registry: ProviderRegistry, dispatcher: Dispatcher, metrics: CoreMetrics, max_concurrent: int = 1024
    ) -> None:
        self._registry = registry
        self._dispatcher = dispatcher
        self._metrics = metrics
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
        async with self._observe(params, context, stream=True) as measurement:
            async with aclosing(self._events(params, measurement, context, incremental=True)) as events:
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
        self,
        request: svc.CreateCompletionRequest,
        context: grpc.aio.ServicerContext[svc.CreateCompletionRequest, svc.CreateCompletionResponse],
    ) -> svc.CreateCompletionResponse:
        fold = Fold()
        async with self._observe(request.params, context, stream=False) as measurement:
            async with aclosing(self._events(request.params, measurement, context, incremental=False)) as events:
                async for event in events:
                    fold.add(event)
            response = fold.result(request.params.model)
            context.set_trailing_metadata(_trailers(measurement))
        return response

    async def ListModels(  # noqa: N802
        self,
        request: svc.ListModelsRequest,
        context: grpc.aio.ServicerContext[svc.ListModelsRequest, svc.ListModelsResponse],
    ) -> svc.ListModelsResponse:
        return svc.ListModelsResponse(
            models=[
                svc.ModelInfo(id=entry.name, provider=entry.provider, owned_by=entry.owned_by)
                for entry in self._registry.catalog.entries
            ]
        )

    async def aclose(self) -> None:
        """Release what the servicer owns (the remote-image session); called once, when the core stops."""
        await self._images.aclose()

    async def _events(
        self,
        params: pb.CompletionParams,
        measurement: Measurement,
        context: grpc.aio.ServicerContext[Any, Any],  # either completion RPC's
        *,
        incremental: bool,
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        """Check the request, dispatch it, and relay the started completion's events."""
        check_params(params)
        route = self._dispatcher.route(params.model)
        check_supported(params, route.supported, provider=route.kind)
        wanted = remote_images(params)
        if wanted:  # once per request, before any deployment is tried: a retry or fallback reuses the bytes
            await _waited(self._images.resolve(wanted), measurement)  # network time, not the core's overhead
        started = await self._dispatcher.dispatch(
            route, params, measurement, incremental=incremental, time_remaining=context.time_remaining()
        )
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
    ) -> AsyncIterator[Measurement]:
        """Measure one completion, turn its failure into a gRPC status, and record metrics and one log line."""
        route = self._route_or_none(params.model)
        measurement = Measurement(params.model if route else "unknown", route.kind if route else "none", self._metrics)
        caller = _caller(context.invocation_metadata())
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
            # grpc.aio's context has abort_with_status (grpc/aio/_base_server.py); grpc-stubs 1.53 does not declare it
            await context.abort_with_status(exc.to_status())  # type: ignore[attr-defined]
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"  # the caller went away; the provider's stream was closed on the way out
            raise
        except Exception as exc:  # noqa: BLE001 (a bug: report INTERNAL, log once with the traceback)
            status = "internal"
            internal = _internal(exc, params.model, caller.request_id).to_status()
            await context.abort_with_status(internal)  # type: ignore[attr-defined]  # as above: a grpc-stubs gap
        finally:
            self._active -= 1
            duration = measurement.record(status, upstream)
            if requests_log.isEnabledFor(logging.INFO):  # the line's fields cost more than the check
                requests_log.info(
                    "completion",
                    extra={
                        "request_id": caller.request_id,
                        "key_id": caller.key_id,
                        "key_name": caller.key_name,
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


def create_servicer(registry: ProviderRegistry, metrics: CoreMetrics, max_concurrent: int = 1024) -> CompletionServicer:
    """The servicer over the registry's routes, recording into `metrics`."""
    return CompletionServicer(registry, Dispatcher(build_routes(registry), metrics), metrics, max_concurrent)


def _trailers(measurement: Measurement) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a served completion: which deployment, after how many tries, the core's own time."""
    return (
        (DEPLOYMENT, measurement.deployment),
        (ATTEMPTS, str(measurement.attempts)),
        (OVERHEAD, f"{measurement.overhead() * 1000:.3f}"),
    )


def _caller(metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
    """The request id and identity from the call's metadata, in one pass; a direct caller that sent no request id
    still gets a traceable log line."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in (REQUEST_ID, KEY_ID, KEY_NAME) and isinstance(value, str) and 0 < len(value) <= _MAX_METADATA_VALUE:
            found[key] = value
    return Caller(found.get(REQUEST_ID) or uuid.uuid4().hex, found.get(KEY_ID, ""), found.get(KEY_NAME, ""))


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
