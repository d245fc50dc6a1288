"""`python -m services`: run the ModelMax core until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

import uvloop
from pythonjsonlogger.json import JsonFormatter

from services.catalog import CatalogError
from services.server import start_core
from services.settings import Settings, SettingsError


async def _serve(settings: Settings) -> None:
    core = await start_core(settings, os.environ)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logging.getLogger("services").info("stopping: draining for up to %.0fs", settings.shutdown_grace_seconds)
    await core.stop(settings.shutdown_grace_seconds)


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
        sys.exit(f"modelmax-core: {exc}")
    _configure_logging(settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
    try:
        uvloop.run(_serve(settings))  # grpc.aio runs on uvloop; its loop is measurably cheaper per call (BENCHMARKS.md)
    except (CatalogError, SettingsError) as exc:
        sys.exit(f"modelmax-core: bad configuration: {exc}")


if __name__ == "__main__":
    main()
