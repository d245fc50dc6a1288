"""`python -m bridge`: serve the OpenAI-compatible API with uvicorn (bridge/server.py) until SIGTERM or SIGINT; traces
as OTEL_* says (startup/tracing.py)."""

from __future__ import annotations

import logging
import os
import socket
import sys

import uvicorn

from bridge.app import create_app
from bridge.server import uvicorn_config
from bridge.settings import Settings, SettingsError
from startup import configure_logging, raise_fd_limit, tracing


class _Server(uvicorn.Server):
    """uvicorn's server, exporting the buffered spans once it has drained: on a signal, uvicorn re-raises it when
    `serve` returns, which ends the process before anything after `run` would run."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        tracing.shutdown()


def main() -> None:
    raise_fd_limit()
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"modelmax-bridge: {exc}")
    configure_logging(settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
    try:
        tracing.configure("modelmax-bridge")
    except ValueError as exc:
        sys.exit(f"modelmax-bridge: {exc}")
    logging.getLogger("bridge").info(
        "OpenAI-compatible API on http://%s:%d/v1 (core at %s, which checks every key)",
        settings.host, settings.port, settings.core_target,
    )  # fmt: skip
    server = _Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        tracing.shutdown()  # a no-op once the server's shutdown did it
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the port, the lifespan or the config kept it from starting


if __name__ == "__main__":
    main()
