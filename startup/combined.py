"""`python -m startup.combined` (`modelmax run --combined`): the core and the bridge in one process, on one event loop.

The core starts as `python -m services` would (its gRPC port, health, metrics, for every internal caller) and also
hands its servicers to an in-process channel (startup/inprocess.py); the bridge serves the HTTP APIs as
`python -m bridge` would, calling the core through that channel: the same messages, metadata, deadlines,
cancellation and statuses, without serialisation or HTTP/2. Both read their usual MODELMAX_* settings
(MODELMAX_CORE_TARGET is not used). SIGTERM drains the bridge first (uvicorn's graceful shutdown: no new requests,
streams run out), then the core (its in-flight calls, then the usage records still buffered), then the traces.

One process uses one CPU. On a node with more, run more pods (or more replicas of this Deployment): a second
process per pod would need both ports shared through SO_REUSEPORT, which grpc.aio and uvicorn do not give one
process group to balance, and Kubernetes' Service already balances over pods.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import cast

import grpc
import uvicorn
import uvloop

from bridge.app import create_app
from bridge.server import uvicorn_config
from bridge.settings import Settings as BridgeSettings
from bridge.settings import SettingsError as BridgeSettingsError
from services.catalog import CatalogError
from services.server import CoreServer, start_core
from services.settings import Settings as CoreSettings
from services.settings import SettingsError as CoreSettingsError
from startup import configure_logging, raise_fd_limit, tracing
from startup.inprocess import Channel, Handlers

log = logging.getLogger("startup.combined")


class _Server(uvicorn.Server):
    """uvicorn's server, stopping the core once the bridge has drained. uvicorn re-raises the stopping signal when
    `serve` returns, which ends the process: the core's drain must happen inside the shutdown."""

    def __init__(self, config: uvicorn.Config, core: CoreServer, grace: float) -> None:
        super().__init__(config)
        self.core, self.grace = core, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            log.info("stopping the core: draining for up to %.0fs", self.grace)
            await self.core.stop(self.grace)
            tracing.shutdown()  # after both drains: the spans of the last streams go out too


async def serve(core_settings: CoreSettings, bridge_settings: BridgeSettings) -> bool:
    """Run both until SIGTERM or SIGINT; False if the bridge did not start (its port, its lifespan)."""
    handlers = Handlers()
    core = await start_core(core_settings, os.environ, handlers)
    channel = cast(grpc.aio.Channel, Channel(handlers, max_send_bytes=bridge_settings.max_message_bytes))
    server = _Server(uvicorn_config(create_app(bridge_settings, channel=channel), bridge_settings), core,
                     core_settings.shutdown_grace_seconds)  # fmt: skip
    try:
        await server.serve()
    finally:
        if not server.started:  # it never got to its shutdown, which stops the core
            await core.stop(None)
    return server.started


def main() -> None:
    raise_fd_limit()
    try:
        core_settings = CoreSettings.from_env(os.environ)
        bridge_settings = BridgeSettings.from_env(os.environ)
    except (CoreSettingsError, BridgeSettingsError) as exc:
        sys.exit(f"modelmax: {exc}")
    configure_logging(bridge_settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
    try:
        tracing.configure("modelmax")
    except ValueError as exc:
        sys.exit(f"modelmax: {exc}")
    log.info(
        "OpenAI-compatible API on http://%s:%d/v1 and the core's gRPC port %d, in one process",
        bridge_settings.host, bridge_settings.port, core_settings.port,
    )  # fmt: skip
    try:
        started = uvloop.run(serve(core_settings, bridge_settings))
    except KeyboardInterrupt:
        started = True
    except (CatalogError, CoreSettingsError) as exc:
        sys.exit(f"modelmax: bad configuration: {exc}")
    finally:
        tracing.shutdown()  # a no-op once the shutdown did it
    if not started:
        sys.exit(3)


if __name__ == "__main__":
    main()
