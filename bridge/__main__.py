"""`python -m bridge`: serve the OpenAI-compatible API with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import resource
import sys

import uvicorn
from pythonjsonlogger.json import JsonFormatter

from bridge.app import create_app
from bridge.settings import Settings, SettingsError


def _configure_logging(level: str, style: str) -> None:
    """One JSON object per line (fields from `extra` included), or plain text with MODELMAX_LOG_FORMAT=text."""
    handler = logging.StreamHandler()
    if style == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                          rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        )  # fmt: skip
    logging.basicConfig(level=level, handlers=[handler], force=True)


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
    _configure_logging(settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
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
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


if __name__ == "__main__":
    main()
