"""`python -m bridge`: serve the OpenAI-compatible API with uvicorn (bridge/server.py) until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from bridge.app import create_app
from bridge.server import uvicorn_config
from bridge.settings import Settings, SettingsError
from startup import configure_logging, raise_fd_limit


def main() -> None:
    raise_fd_limit()
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"modelmax-bridge: {exc}")
    configure_logging(settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
    logging.getLogger("bridge").info(
        "OpenAI-compatible API on http://%s:%d/v1 (core at %s, which checks every key)",
        settings.host, settings.port, settings.core_target,
    )  # fmt: skip
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the port, the lifespan or the config kept it from starting


if __name__ == "__main__":
    main()
