"""create_app: the Starlette application, its one long-lived gRPC channel, and OpenAI-shaped error responses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.auth import KeyChecker
from bridge.errors import OpenAIError
from bridge.metrics import BridgeMetrics, Observation
from bridge.routes import CHAT_COMPLETIONS, REQUEST_ID, ROUTES, Gateway, chat_completions
from bridge.settings import Settings
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc

log = logging.getLogger(__name__)

# gRPC's default 4 MiB message limit would turn a large but allowed body into a channel error.
_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024


def create_app(settings: Settings, metrics: BridgeMetrics | None = None) -> Starlette:
    """The bridge app. Its metrics are served on `settings.metrics_port` (if set) for the life of the app."""
    metrics = metrics or BridgeMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(
            settings.core_target,
            options=[
                ("grpc.max_send_message_length", _GRPC_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _GRPC_MESSAGE_BYTES),
            ],
        )
        app.state.gateway = Gateway(
            stub=svc_grpc.CompletionServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
            keys=KeyChecker(settings.api_keys),
            max_body_bytes=settings.max_body_bytes,
            timeout=settings.request_timeout_seconds,
            metrics=metrics,
            max_concurrent=settings.max_concurrent_requests,
        )
        try:  # the catalog's names may be metric labels; names the core never served stay "unknown"
            reply = await app.state.gateway.stub.ListModels(svc.ListModelsRequest(), timeout=2.0)
            metrics.known_models.update(model.id for model in reply.models)
        except grpc.aio.AioRpcError:
            pass  # the core is not up yet: models become labels as the core serves them
        exporter = None
        if settings.metrics_port is not None:
            exporter, thread = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
            app.state.metrics_port = exporter.server_port
        try:
            yield
        finally:
            if exporter is not None:
                exporter.shutdown()
                exporter.server_close()
                thread.join(5)
            await channel.close()

    return BridgeApp(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            OpenAIError: _openai_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )


class BridgeApp(Starlette):
    """Starlette, except that `POST /v1/chat/completions` (the hot path) is served without the middleware stack.

    Starlette's error middleware, exception middleware, router and route wrapper each add a frame and a wrapped
    `send` to every request and to every chunk of a stream, and their state stays alive as long as a stream is
    open. The chat-completions handler already turns every failure into an OpenAI error response itself, so it is
    called directly, with the same error handlers; every other route goes through Starlette as usual.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_COMPLETIONS and scope["method"] == "POST":
            scope["app"] = self
            request = Request(scope, receive)
            try:
                response = await chat_completions(request)
            except OpenAIError as exc:
                response = await _openai_error(request, exc)
            except Exception as exc:  # noqa: BLE001 (a bug: logged once by the handler, answered with a 500)
                response = await _unexpected_error(request, exc)
            try:
                await response(scope, receive, send)
            finally:
                # Recorded once the last byte is out: the duration is the client's, and the metrics and log line
                # are not on its critical path. A no-op when the request already finished (streams, errors).
                seen: Observation | None = getattr(request.state, "observation", None)
                if seen is not None:
                    seen.finish(response.status_code)
            return
        await super().__call__(scope, receive, send)


def _finish(request: Request, status: int) -> dict[str, str]:
    """Record a chat completion that ended in an error response; the headers every response carries."""
    seen: Observation | None = getattr(request.state, "observation", None)
    if seen is None:
        return {}
    seen.finish(status)
    return {REQUEST_ID: seen.request_id}


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    headers = {**_finish(request, exc.status), **exc.headers()}
    return Response(exc.body_bytes(), status_code=exc.status, media_type="application/json", headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    messages = {
        404: f"Unknown request URL: {request.method} {request.url.path}.",
        405: f"Method {request.method} is not allowed for {request.url.path}.",
    }
    message = messages.get(exc.status_code, exc.detail)
    error = OpenAIError(exc.status_code, message, "invalid_request_error", None, None)
    return Response(error.body_bytes(), status_code=exc.status_code, media_type="application/json",
                    headers=exc.headers)  # fmt: skip


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = OpenAIError(500, "The gateway failed to serve this request.", "api_error", None, "internal_error")
    return Response(error.body_bytes(), status_code=500, media_type="application/json", headers=_finish(request, 500))
