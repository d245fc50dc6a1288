"""The bridge's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)


class SettingsError(Exception):
    """An environment variable with a value the bridge cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the bridge reads from its environment. Nothing reads os.environ after start-up."""

    core_target: str = "127.0.0.1:50051"
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout_seconds: float = 600.0
    log_level: str = "INFO"
    # Prometheus /metrics port on `host`; None: no metrics endpoint (the default here, so tests opt in), 0: any.
    metrics_port: int | None = None
    # On SIGTERM: stop accepting, let open streams finish for this long, then close them.
    shutdown_grace_seconds: float = 30.0
    # Chat completions served at once; beyond it a fast 503 with Retry-After, never an unbounded queue.
    max_concurrent_requests: int = 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read MODELMAX_* variables. No API keys: the core checks the key of every call (and refuses to start
        without a key or a key store)."""
        return cls(
            core_target=env.get("MODELMAX_CORE_TARGET", "127.0.0.1:50051"),
            host=env.get("MODELMAX_BRIDGE_HOST", "127.0.0.1"),
            port=_number(env, "MODELMAX_BRIDGE_PORT", 8000, int),
            max_body_bytes=_number(env, "MODELMAX_MAX_BODY_BYTES", 8 * 1024 * 1024, int),
            request_timeout_seconds=_number(env, "MODELMAX_REQUEST_TIMEOUT_SECONDS", 600.0, float),
            log_level=env.get("MODELMAX_LOG_LEVEL", "INFO").upper(),
            metrics_port=None
            if env.get("MODELMAX_BRIDGE_METRICS_PORT", "").strip().lower() == "off"
            else _number(env, "MODELMAX_BRIDGE_METRICS_PORT", 9091, int, allow_zero=True),
            shutdown_grace_seconds=_number(env, "MODELMAX_BRIDGE_SHUTDOWN_GRACE_SECONDS", 30.0, float),
            max_concurrent_requests=_number(env, "MODELMAX_BRIDGE_MAX_CONCURRENT_REQUESTS", 1024, int),
        )


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N], *, allow_zero: bool = False) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value
