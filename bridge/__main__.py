"""`python -m bridge`: serve the OpenAI-compatible API with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import resource
import sys

import uvicorn

from bridge.app import create_app
from bridge.settings import Settings, SettingsError


def _raise_fd_limit() -> None:
    """Every open stream holds sockets; the usual soft limit of 1024 descriptors would cap them far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    _raise_fd_limit()
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"modelmax-bridge: {exc}")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bridge").info(
        "OpenAI-compatible API on http://%s:%d/v1 (core at %s, %d API key(s))",
        settings.host, settings.port, settings.core_target, len(settings.api_keys),
    )  # fmt: skip
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
