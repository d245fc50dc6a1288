"""create_app: the route table, the one long-lived gRPC channel (the lifespan), and the ASGI entry point."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2_grpc
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send, StatelessLifespan

from bridge.admin import ADMIN_ROUTES
from bridge.anthropic.errors import DIALECT as ANTHROPIC
from bridge.anthropic.messages.routes import count_tokens, messages
from bridge.health import healthz, readyz
from bridge.metrics import BridgeMetrics
from bridge.openai.chat.routes import chat_completions
from bridge.openai.errors import DIALECT as OPENAI
from bridge.openai.models import list_models, retrieve_model
from bridge.pipeline import Gateway, Route, RouteTable, serve
from bridge.settings import Settings
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from modelmax.v1 import key_service_pb2_grpc
from startup.metrics_http import start_metrics_server

# Every route the bridge serves. Each goes through the whole pipeline (bridge/pipeline.py); `public` routes, the
# Kubernetes probes, are let through without a key and without a slot. A dialect adds its own entries here.
ROUTES = RouteTable(
    [
        Route("POST", "/v1/chat/completions", chat_completions, OPENAI, json_body=True, metered=True),
        Route("POST", "/v1/messages", messages, ANTHROPIC, json_body=True, metered=True),
        Route("POST", "/v1/messages/count_tokens", count_tokens, ANTHROPIC, json_body=True),
        Route("GET", "/v1/models", list_models, OPENAI),
        Route("GET", "/v1/models/{model_id}", retrieve_model, OPENAI),
        *ADMIN_ROUTES,
        Route("GET", "/healthz", healthz, OPENAI, public=True),
        Route("GET", "/readyz", readyz, OPENAI, public=True),
    ],
    fallback=OPENAI,  # words the 404 of a path no route declares
)

# Answers from the core, which the bridge trusts (over TLS, it has verified the core's certificate): a unary answer
# with several choices and their logprobs can be far larger than gRPC's default 4 MiB. What the bridge sends is capped
# by settings.max_message_bytes, the core's own receive limit.
_GRPC_RECEIVE_BYTES = 64 * 1024 * 1024


def create_app(
    settings: Settings, metrics: BridgeMetrics | None = None, channel: grpc.aio.Channel | None = None
) -> BridgeApp:
    """The bridge app. Its metrics are served on `settings.metrics_port` (if set) for the life of the app.

    `channel` is the core's when it is given (the combined mode's in-process one, startup/inprocess.py); otherwise the
    lifespan opens one to `settings.core_target`."""
    given = channel
    metrics = metrics or BridgeMetrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert isinstance(app, BridgeApp)
        # Calls are balanced over every address the target resolves to (round robin; one address: as before). With
        # a headless Service (dns:///<name>:<port>) those are the core pods. gRPC's DNS resolver re-resolves when a
        # connection goes away: a core pod leaving, or the core's max connection age sending a GOAWAY every few
        # minutes (MODELMAX_CORE_MAX_CONNECTION_AGE_SECONDS), which is how pods added later get traffic. It re-resolves
        # at most every 5 s (gRPC's default is 30 s): CoreDNS's TTL, so a rollout's new pods are found promptly.
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", _GRPC_RECEIVE_BYTES),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.dns_min_time_between_resolutions_ms", 5000),
        ]
        tls = settings.core_tls()  # the PEM files, read once: SettingsError naming the variable if one is unusable
        if given is not None:
            channel = given
        elif tls is None:
            channel = grpc.aio.insecure_channel(settings.core_target, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            credentials = grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)
            channel = grpc.aio.secure_channel(settings.core_target, credentials, options=options)
        app.gateway = Gateway(
            stub=svc_grpc.CompletionServiceStub(channel),  # an async stub, on an aio channel
            health=health_pb2_grpc.HealthStub(channel),
            max_body_bytes=settings.max_body_bytes,
            timeout=settings.request_timeout_seconds,
            metrics=metrics,
            max_concurrent=settings.max_concurrent_requests,
            keys=key_service_pb2_grpc.KeyServiceStub(channel),
            max_buffered_bytes=settings.max_buffered_bytes,
            ping_seconds=settings.ping_seconds,
        )
        gateway = app.gateway
        metrics.buffered_bytes.set_function(lambda: gateway.buffered)  # read at each scrape: free per request
        exporter = None
        if settings.metrics_port is not None:  # on this event loop: no thread per scraping connection
            exporter = await start_metrics_server(metrics.registry, settings.host, settings.metrics_port)
            app.state.metrics_port = exporter.port
        try:
            yield
        finally:
            if exporter is not None:
                await exporter.close()
            app.gateway = None
            await channel.close(grace=None)

    return BridgeApp(ROUTES, lifespan, metrics)


class BridgeApp(Starlette):
    """Starlette for its lifespan and `state`; every HTTP request is served by the pipeline, whatever its route.

    Starlette's error middleware, exception middleware and router would each add a frame and a wrapped `send` to
    every request and every chunk of a stream, and keep their state alive for as long as a stream is open; the
    pipeline's own dispatch is a dict lookup and plain calls, with the same Request and Response types.
    """

    def __init__(self, routes: RouteTable, lifespan: StatelessLifespan[Starlette], metrics: BridgeMetrics) -> None:
        super().__init__(lifespan=lifespan)
        self.route_table = routes
        self.metrics = metrics  # the transport (bridge/transport.py) counts its refusals here too
        self.gateway: Gateway | None = None  # while the lifespan runs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            gateway = self.gateway
            if gateway is None:
                raise RuntimeError("the bridge serves requests only inside its lifespan")
            await serve(gateway, self.route_table, scope, receive, send)
            return
        scope["app"] = self
        await self.router(scope, receive, send)  # the lifespan (websockets find no route there)
