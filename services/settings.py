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
    # Static API keys (MODELMAX_API_KEY, MODELMAX_API_KEYS, MODELMAX_API_KEYS_FILE): every model, no budget.
    api_keys: tuple[str, ...] = ()
    # The policy store (keys, usage, budgets): sqlite:///path or postgresql://...; "" for static keys only.
    database_url: str = ""
    # While the store is unreachable: refuse what cannot be checked (True) or serve and meter later (False).
    policy_fail_closed: bool = False
    key_cache_ttl_seconds: float = 5.0  # the bound on how long a revoked key keeps working on another replica
    usage_buffer_records: int = 10_000  # usage records waiting for the store; beyond it they are dropped (counted)

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
            api_keys=static_keys(env),
            database_url=env.get("MODELMAX_DATABASE_URL", "").strip(),
            policy_fail_closed=_flag(env, "MODELMAX_POLICY_FAIL_CLOSED"),
            key_cache_ttl_seconds=_number(env, "MODELMAX_KEY_CACHE_TTL_SECONDS", 5.0, float),
            usage_buffer_records=_number(env, "MODELMAX_USAGE_BUFFER_RECORDS", 10_000, int),
        )

    def check(self) -> None:
        """Refuse settings the core cannot serve with: it never starts open to anyone."""
        if not self.api_keys and not self.database_url:
            raise SettingsError(
                "no API key configured: set MODELMAX_API_KEY (one key), MODELMAX_API_KEYS (comma-separated) or "
                "MODELMAX_API_KEYS_FILE (one key per line), or MODELMAX_DATABASE_URL for keys in a database; the "
                "core refuses to serve without a key"
            )
        if self.key_cache_ttl_seconds <= 0 or self.usage_buffer_records <= 0:
            raise SettingsError("MODELMAX_KEY_CACHE_TTL_SECONDS and MODELMAX_USAGE_BUFFER_RECORDS must be positive")


def static_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """The static keys from MODELMAX_API_KEYS (comma-separated), MODELMAX_API_KEY and MODELMAX_API_KEYS_FILE (one
    per line; `#` comments, indented or not), without duplicates."""
    keys = [k.strip() for k in env.get("MODELMAX_API_KEYS", "").split(",") if k.strip()]
    if env.get("MODELMAX_API_KEY", "").strip():
        keys.append(env["MODELMAX_API_KEY"].strip())
    keys_file = env.get("MODELMAX_API_KEYS_FILE", "")
    if keys_file:
        try:
            lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"MODELMAX_API_KEYS_FILE={keys_file!r} cannot be read: {exc.strerror}") from None
        stripped = (line.strip() for line in lines)  # an indented "# ..." is a comment too, not a key
        keys.extend(line for line in stripped if line and not line.startswith("#"))
    if any(len(key) < 16 for key in keys):
        raise SettingsError("API keys must be at least 16 characters long")
    return tuple(dict.fromkeys(keys))


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} must be true or false")


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
