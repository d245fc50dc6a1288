"""CompletionService: routes a public model name to its provider and relays the provider's events."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.errors import GatewayError
from services.providers import ProviderRegistry
from services.validation import check_params

log = logging.getLogger(__name__)


class CompletionServicer(svc_grpc.CompletionServiceServicer):
    """Thin: validation, routing and the event contract (start, deltas, one finish) live here; I/O in providers."""

    def __init__(self, registry: ProviderRegistry) -> None:
        self._registry = registry

    async def StreamCompletion(  # noqa: N802 (gRPC method name)
        self, request: svc.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        params = request.params
        try:
            async with aclosing(_events(self._registry, params, incremental=True)) as events:
                async for event in events:
                    if event.HasField("finish") and not params.include_usage:
                        event.finish.ClearField("usage")
                    yield event  # awaits HTTP/2 flow control: this is the backpressure
        except GatewayError as exc:
            await context.abort_with_status(exc.to_status())
        except Exception as exc:  # noqa: BLE001 (a bug: report INTERNAL, log once with the traceback)
            await context.abort_with_status(_internal(exc, params.model).to_status())

    async def CreateCompletion(  # noqa: N802
        self, request: svc.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> svc.CreateCompletionResponse:
        response = svc.CreateCompletionResponse()
        pieces: list[str] = []
        reasoning: list[str] = []
        try:
            async with aclosing(_events(self._registry, request.params, incremental=False)) as events:
                async for event in events:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        pieces.append(event.delta.text)
                    elif kind == "reasoning":
                        reasoning.append(event.reasoning.text)
                    elif kind == "start":
                        response.id = event.start.id
                        response.model = event.start.model
                        response.created = event.start.created
                    else:
                        response.finish_reason = event.finish.finish_reason
                        response.usage.CopyFrom(event.finish.usage)
        except GatewayError as exc:
            await context.abort_with_status(exc.to_status())
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(_internal(exc, request.params.model).to_status())
        response.content = "".join(pieces)
        response.reasoning_content = "".join(reasoning)
        return response

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
    registry: ProviderRegistry, params: pb.CompletionParams, *, incremental: bool
) -> AsyncIterator[svc.StreamCompletionResponse]:
    """The contract every caller sees: `start` once the provider produced output, its deltas, exactly one finish.

    A provider stream that ends without a finish is an upstream protocol error, never a fabricated `stop`.
    """
    check_params(params)
    provider = registry.for_model(params.model)
    stream = provider.stream(params, incremental=incremental)
    try:
        first = await anext(stream, None)  # pre-stream failures surface here, before any event is sent
        if first is None:
            raise _protocol("the provider's stream ended before any output", params.model)
        yield svc.StreamCompletionResponse(
            start=svc.CompletionStart(id=f"chatcmpl-{uuid.uuid4().hex}", model=params.model, created=int(time.time()))
        )
        event = first
        while event is not None:
            yield event
            if event.HasField("finish"):
                if event.finish.finish_reason == pb.FinishReason.FINISH_REASON_UNSPECIFIED:
                    raise _protocol("the provider finished without a finish reason", params.model)
                return
            event = await anext(stream, None)
        raise _protocol("the provider's stream ended before it finished", params.model)
    finally:
        await stream.aclose()  # closes the upstream call when the caller went away or failed


def _protocol(message: str, model: str) -> GatewayError:
    log.warning("upstream protocol error for model %s: %s", model, message)
    return GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL, message)


def _internal(exc: Exception, model: str) -> GatewayError:
    log.exception("internal error serving model %s", model, exc_info=exc)
    return GatewayError(pb.ErrorReason.ERROR_REASON_INTERNAL, "The gateway failed to serve this request.")
