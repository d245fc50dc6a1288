"""Process start-up shared by the core and the bridge: log format and the open-file limit.

The two components never import each other; what both processes need before serving lives here instead. The
`modelmax` command (`startup.cli`) is the one module that knows both; nothing here imports it.
"""

from __future__ import annotations

import logging
import resource

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str, style: str) -> None:
    """One JSON object per line (fields from `extra` included), or plain text when `style` is "text"."""
    handler = logging.StreamHandler()
    if style == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def raise_fd_limit() -> None:
    """Every open stream holds sockets; the usual soft limit of 1024 descriptors would cap them far too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
