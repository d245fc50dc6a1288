"""The bridge's HTTP server: uvicorn, configured once here for `python -m bridge`, `modelmax run` and the tests."""

from __future__ import annotations

from typing import Any

import uvicorn

from bridge.app import ROUTES, BridgeApp
from bridge.settings import Settings
from bridge.transport import TransportLimits, protocol_class


def limits_of(settings: Settings) -> TransportLimits:
    return TransportLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_seconds=settings.header_timeout_seconds,
        body_seconds=settings.body_timeout_seconds,
        max_connections=settings.max_connections,
    )


def uvicorn_config(app: BridgeApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn on uvloop with httptools' parser, bounded by bridge/transport.py; `overrides` for tests."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "loop": "uvloop",
        "http": protocol_class(limits_of(settings), ROUTES.fallback, app.metrics.transport_refusals),
        "ws": "none",  # no websocket routes: an upgrade request is a plain 400
        "timeout_keep_alive": settings.keepalive_seconds,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_seconds),
        **overrides,
    }
    return uvicorn.Config(app, **options)
