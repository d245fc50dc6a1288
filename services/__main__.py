"""`python -m services`: run the ModelMax core until SIGTERM or SIGINT; traces as OTEL_* says (startup/tracing.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from services.catalog import CatalogError
from services.server import start_core
from services.settings import Settings, SettingsError
from startup import configure_logging, raise_fd_limit, tracing


async def _serve(settings: Settings) -> None:
    core = await start_core(settings, os.environ)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logging.getLogger("services").info("stopping: draining for up to %.0fs", settings.shutdown_grace_seconds)
    await core.stop(settings.shutdown_grace_seconds)


def main() -> None:
    raise_fd_limit()
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"modelmax-core: {exc}")
    configure_logging(settings.log_level, os.environ.get("MODELMAX_LOG_FORMAT", "json"))
    try:
        tracing.configure("modelmax-core")
    except ValueError as exc:
        sys.exit(f"modelmax-core: {exc}")
    try:
        uvloop.run(_serve(settings))  # grpc.aio runs on uvloop; its loop is measurably cheaper per call (BENCHMARKS.md)
    except (CatalogError, SettingsError) as exc:
        sys.exit(f"modelmax-core: bad configuration: {exc}")
    finally:
        tracing.shutdown()  # after the drain: the spans of the last streams go out too


if __name__ == "__main__":
    main()
