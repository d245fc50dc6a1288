"""The core's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

N = TypeVar("N", int, float)

DEFAULT_CATALOG = str(Path(__file__).with_name("default_catalog.yaml"))


class SettingsError(Exception):
    """An environment variable with a value the core cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the core reads from its environment. Nothing reads os.environ after start-up."""

    catalog_path: str = DEFAULT_CATALOG
    host: str = "127.0.0.1"
    port: int = 50051
    shutdown_grace_seconds: float = 30.0
    log_level: str = "INFO"
    # Prometheus /metrics port on `host`; None: no metrics endpoint (the default here, so tests opt in), 0: any.
    metrics_port: int | None = None
    # Completions served at once; beyond it a fast OVERLOADED (503 + Retry-After), never an unbounded queue.
    max_concurrent_requests: int = 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            catalog_path=env.get("MODELMAX_CATALOG", DEFAULT_CATALOG),
            host=env.get("MODELMAX_CORE_HOST", "127.0.0.1"),
            port=_number(env, "MODELMAX_CORE_PORT", 50051, int),
            shutdown_grace_seconds=_number(env, "MODELMAX_CORE_SHUTDOWN_GRACE_SECONDS", 30.0, float),
            log_level=env.get("MODELMAX_LOG_LEVEL", "INFO").upper(),
            metrics_port=_metrics_port(env, "MODELMAX_CORE_METRICS_PORT", 9090),
            max_concurrent_requests=_number(env, "MODELMAX_CORE_MAX_CONCURRENT_REQUESTS", 1024, int),
        )


def _metrics_port(env: Mapping[str, str], name: str, default: int) -> int | None:
    """A metrics port; "off" disables the endpoint."""
    if env.get(name, "").strip().lower() == "off":
        return None
    return _number(env, name, default, int)


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N]) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value
