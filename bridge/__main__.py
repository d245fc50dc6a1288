"""`python -m bridge`: serve the OpenAI-compatible API with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from bridge.app import create_app
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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


if __name__ == "__main__":
    main()
