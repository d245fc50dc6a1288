"""The health probes: /healthz (the process is alive) and /readyz (the core answers SERVING). Public: no key."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from starlette.responses import JSONResponse, Response

from bridge.pipeline import Exchange

_CORE_SERVICE = "modelmax.v1.CompletionService"


async def healthz(exchange: Exchange) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(exchange: Exchange) -> Response:
    """Ready when the core answers its health check for CompletionService with SERVING."""
    try:
        reply = await exchange.gateway.health.Check(health_pb2.HealthCheckRequest(service=_CORE_SERVICE), timeout=1.0)
    except grpc.aio.AioRpcError as exc:
        return JSONResponse({"status": "unavailable", "core": exc.code().name}, status_code=503)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return JSONResponse({"status": "unavailable", "core": "NOT_SERVING"}, status_code=503)
    return JSONResponse({"status": "ok"})
