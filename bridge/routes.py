"""HTTP handlers: /v1/chat/completions, /v1/models, and the health endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.auth import KeyChecker
from bridge.errors import OpenAIError, from_rpc_error, overloaded
from bridge.metrics import BridgeMetrics, Observation, request_id_from
from bridge.openai_request import parse_chat_request
from bridge.sse import SSEResponse, client_gone, open_stream
from bridge.translate import completion_json, model_json, to_params
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc

CHAT_COMPLETIONS = "/v1/chat/completions"
REQUEST_ID = "x-request-id"  # sent to the core as gRPC metadata and returned on every response
OVERHEAD = "x-modelmax-overhead-ms"  # the gateway's own time (bridge + core) on non-streaming responses
DEPLOYMENT = "x-modelmax-deployment"  # which catalog deployment served: "<position>:<provider>:<model>"
ATTEMPTS = "x-modelmax-attempts"  # tries it took, retries and fallbacks included


@dataclass(slots=True)
class Gateway:
    """What the handlers share for the life of the process: one channel to the core, and the settings they need."""

    stub: svc_grpc.CompletionServiceStub
    health: health_pb2_grpc.HealthStub
    keys: KeyChecker
    max_body_bytes: int
    timeout: float
    metrics: BridgeMetrics
    max_concurrent: int = 1024
    active: int = 0  # chat completions being served now

    def admit(self) -> Callable[[], None]:
        """Take a slot or refuse at once; returns the idempotent release of the slot."""
        if self.active >= self.max_concurrent:
            raise overloaded()
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def chat_completions(request: Request) -> Response:
    gateway = _gateway(request)
    seen = Observation(gateway.metrics, request_id_from(request.headers.get(REQUEST_ID)))
    request.state.observation = seen  # the error handlers finish it, with the status they send
    gateway.keys.check(request)
    release = gateway.admit()
    streaming = False
    try:
        response = await _chat_completion(request, gateway, seen, release)
        streaming = isinstance(response, SSEResponse)
        return response
    finally:
        if not streaming:
            release()  # a stream releases its slot when it ends


async def _chat_completion(
    request: Request, gateway: Gateway, seen: Observation, release: Callable[[], None]
) -> Response:
    _check_content_type(request)
    chat = parse_chat_request(await _read_body(request, gateway.max_body_bytes))
    seen.model, seen.stream = chat.model, chat.stream
    params = to_params(chat)
    metadata = ((REQUEST_ID, seen.request_id),)
    if chat.stream:
        request_message = svc.StreamCompletionRequest(params=params, accept_batches=True)  # see sse._events
        return await open_stream(gateway.stub, request_message, gateway.timeout, metadata, seen, release)
    call = gateway.stub.CreateCompletion(
        svc.CreateCompletionRequest(params=params), timeout=gateway.timeout, metadata=metadata
    )
    watcher = asyncio.ensure_future(client_gone(request.receive))
    # A client that leaves stops the generation it asked for (a watcher cancelled at the end has nothing to stop).
    watcher.add_done_callback(lambda gone: gone.cancelled() or call.cancel())
    waiting = time.perf_counter()
    try:
        response = await call
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and watcher.done() and not watcher.cancelled():
            seen.finish(499)
            return Response(status_code=499)  # nobody is listening any more
        raise from_rpc_error(exc) from None
    finally:
        seen.core_wait += time.perf_counter() - waiting
        watcher.cancel()
    seen.core_overhead_ms = _core_overhead_ms(trailing)
    reply = Response(
        orjson.dumps(completion_json(response)),  # the hot path's one JSON document: orjson, ~4x the stdlib
        media_type="application/json",
        headers={
            REQUEST_ID: seen.request_id,
            OVERHEAD: f"{seen.overhead_ms():.3f}",
            DEPLOYMENT: response.deployment,
            ATTEMPTS: str(response.attempts),
        },
    )
    return reply  # BridgeApp finishes the observation once the reply is sent


def _core_overhead_ms(trailing: object) -> float | None:
    for key, value in trailing or ():  # type: ignore[attr-defined]
        if key == OVERHEAD:
            try:
                return float(value)
            except ValueError:
                return None
    return None


async def list_models(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.keys.check(request)
    models = await _models(gateway)
    gateway.metrics.known_models.update(model.id for model in models)
    return JSONResponse({"object": "list", "data": [model_json(model) for model in models]})


async def retrieve_model(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.keys.check(request)
    model_id = request.path_params["model_id"]
    for model in await _models(gateway):
        if model.id == model_id:
            return JSONResponse(model_json(model))
    raise OpenAIError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model",
                      "model_not_found")  # fmt: skip


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the core answers its health check for CompletionService with SERVING."""
    gateway = _gateway(request)
    try:
        reply = await gateway.health.Check(
            health_pb2.HealthCheckRequest(service="modelmax.v1.CompletionService"), timeout=1.0
        )
    except grpc.aio.AioRpcError as exc:
        return JSONResponse({"status": "unavailable", "core": exc.code().name}, status_code=503)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return JSONResponse({"status": "unavailable", "core": "NOT_SERVING"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def _models(gateway: Gateway) -> list[svc.ModelInfo]:
    try:
        reply = await gateway.stub.ListModels(svc.ListModelsRequest(), timeout=10.0)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return list(reply.models)


def _check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise OpenAIError(415, "Unsupported content type: send the request body as application/json.",
                          param=None, code="unsupported_media_type")  # fmt: skip


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = OpenAIError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


ROUTES = [
    Route(CHAT_COMPLETIONS, chat_completions, methods=["POST"]),  # served by BridgeApp directly; kept for 405s
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
