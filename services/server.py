"""The grpc.aio server: CompletionService, KeyService, grpc.health.v1 and (when enabled) reflection, on a plaintext,
TLS or mTLS port, with a graceful stop."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from modelmax.v1 import key_service_pb2, key_service_pb2_grpc
from services.catalog import load_catalog
from services.completion.servicer import create_servicer
from services.dispatch import build_routes
from services.metrics import CoreMetrics, watch_deployments, watch_policy, watch_queues
from services.policy import open_store
from services.policy.admin import KeyServicer
from services.policy.gate import Policy, StaticKeys
from services.policy.limits import MemoryLimiter
from services.policy.redis_limits import RedisLimiter
from services.providers import build_registry
from services.settings import Settings
from startup.inprocess import Both, Handlers
from startup.metrics_http import start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["CompletionService"].full_name
KEY_SERVICE_NAME = key_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
_HEALTH_MESSAGE_BYTES = 4096  # a HealthCheckRequest is a service name


class AioHealthServicer(Protocol):
    """What the core uses of grpcio-health-checking's asyncio servicer (`grpc_health.v1.health.aio`), which
    grpc-stubs 1.53 does not declare (its `health` stub has only the sync servicer, whose methods are not async)."""

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


class CoreServer:
    """A started core. `port` is the bound port (useful when settings asked for port 0)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: AioHealthServicer,
        stack: AsyncExitStack,
        metrics: CoreMetrics,
        metrics_port: int | None,
        health_port: int | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.metrics = metrics
        self.metrics_port = metrics_port  # the bound port of /metrics, or None when disabled
        self.health_port = health_port  # the bound port of the plaintext health-only server, or None
        self._health = health_servicer
        self._stack = stack

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within `grace` seconds, cancel the rest, close providers."""
        await self._health.enter_graceful_shutdown()
        try:
            await self.server.stop(grace)
        finally:
            await self._stack.aclose()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_core(settings: Settings, env: Mapping[str, str], handlers: Handlers | None = None) -> CoreServer:
    """Load the catalog, create every provider once, bind and start. Raises CatalogError on a bad catalog.

    `handlers` (the combined mode's, startup/combined.py) also gets every servicer, for the bridge in this process to
    call without the wire (startup/inprocess.py); the port serves the same servicers to every other caller."""
    stack = AsyncExitStack()
    try:
        settings.check()
        catalog = load_catalog(settings.catalog_path)
        store = await open_store(settings.database_url) if settings.database_url else None
        limiter = (
            RedisLimiter.from_url(settings.limits_redis_url, timeout=settings.limits_timeout_seconds)
            if settings.limits_redis_url
            else MemoryLimiter()
        )
        policy = Policy.open(
            StaticKeys(settings.api_keys),
            store,
            cache_ttl=settings.key_cache_ttl_seconds,
            fail_closed=settings.policy_fail_closed,
            max_buffer=settings.usage_buffer_records,
            limiter=limiter,
            limits_fail_closed=settings.limits_fail_closed,
        )
        stack.push_async_callback(policy.aclose)  # last out: the drain writes every usage record still buffered
        registry = await build_registry(catalog, env, stack)
        metrics = CoreMetrics(key_labels=settings.metrics_key_labels)
        watch_policy(metrics, policy)
        watch_queues(metrics, registry.providers)
        routes = build_routes(registry)
        watch_deployments(metrics, routes)  # the dispatcher's own routes: their cooldowns, read at each scrape
        tls = settings.server_tls()
        # gRPC refuses a larger message itself (RESOURCE_EXHAUSTED) from its length prefix, before reading it in.
        options: list[tuple[str, int]] = [("grpc.max_receive_message_length", settings.max_message_bytes)]
        if settings.max_connection_age_seconds > 0:
            # A GOAWAY after the connection's age: the client opens a new connection and re-resolves the core's name
            # (round robin over a headless Service then reaches pods added since). In-flight streams are not cut:
            # the grace (gRPC's default, unbounded; given here so it stays so) lets each run to its own deadline.
            options.append(("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_seconds * 1000))))
            options.append(("grpc.max_connection_age_grace_ms", 2**31 - 1))  # INT_MAX: gRPC's "infinite"
        server = grpc.aio.server(options=options)
        servicer = create_servicer(registry, metrics, policy, settings.max_concurrent_requests, routes)
        stack.push_async_callback(servicer.aclose)
        serving = server if handlers is None else cast(grpc.aio.Server, Both(server, handlers))
        svc_grpc.add_CompletionServiceServicer_to_server(servicer, serving)
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(policy, catalog.names()), serving)
        # grpc-stubs 1.53's grpc_health.v1.health stub has no `aio` (grpcio-health-checking's asyncio servicer).
        health_servicer: AioHealthServicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, serving)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, KEY_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        address = f"{settings.host}:{settings.port}"
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.private_key, tls.certificate_chain)],
                root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
        health_server, health_port = None, None
        if settings.health_port is not None:
            health_server, health_port = _health_server(settings, health_servicer, stack)
        metrics_port = None
        if settings.metrics_port is not None:  # on the core's event loop: no thread per scraping connection
            exporter = await start_metrics_server(metrics.registry, settings.host, settings.metrics_port)
            stack.push_async_callback(exporter.close)
            metrics_port = exporter.port
        await server.start()
        for name in ("", SERVICE_NAME, KEY_SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if health_server is not None:
            await health_server.start()
    except BaseException:
        await stack.aclose()
        raise
    mode = "plaintext" if tls is None else "TLS" if tls.client_ca is None else "mutual TLS"
    log.info(
        "core serving %s on %s:%d (%s, reflection %s; models: %s)",
        SERVICE_NAME, settings.host, port, mode, "on" if settings.reflection else "off", ", ".join(catalog.names()),
    )  # fmt: skip
    return CoreServer(server, port, health_servicer, stack, metrics, metrics_port, health_port)


def _health_server(
    settings: Settings, health_servicer: AioHealthServicer, stack: AsyncExitStack
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1 alone, bound to `settings.health_port`: Kubernetes' gRPC probes cannot
    speak TLS. It shares the main server's health servicer, so it reports what the main port would."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", _HEALTH_MESSAGE_BYTES)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    stack.push_async_callback(server.stop, None)  # after the main server's drain, during which it says NOT_SERVING
    return server, port
