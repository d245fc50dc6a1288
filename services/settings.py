"""The core's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from startup.tls import TlsFileError, check_ca, check_key_pair, read_pem

N = TypeVar("N", int, float)

DEFAULT_CATALOG = str(Path(__file__).with_name("default_catalog.yaml"))
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # MODELMAX_MAX_BODY_BYTES, the bridge's default too
# A gRPC message may be this much larger than the largest HTTP body the bridge accepts. The proto encoding of a chat
# request is no larger than its JSON (field tags and varint lengths are shorter than JSON's keys and quotes; escapes
# decode to fewer bytes; base64 images decode to 3/4 of their size); the one way it grows is a number in exponent
# notation inside a JSON Schema, which the bridge re-serializes (`1e15` becomes `1000000000000000.0`). The headroom
# absorbs thousands of those; a request that grows past it is refused (413) by the bridge's own send limit.
MESSAGE_HEADROOM_BYTES = 64 * 1024


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
    # Where keys' rate limits are counted: "" in this process (one replica), or a redis:// URL shared by a fleet.
    limits_redis_url: str = ""
    limits_timeout_seconds: float = 0.25  # one Redis round trip at most; then the fail mode below
    limits_fail_closed: bool = False  # Redis unreachable: refuse keys with limits (True) or serve them unlimited
    # The bridge's body limit (MODELMAX_MAX_BODY_BYTES): a gRPC caller gets no larger a request in than an HTTP one.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # TLS on the gRPC port: PEM certificate chain and private key, both or neither; "" for plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # mTLS: only clients with a certificate from this CA (PEM) can connect at all; needs the two above.
    tls_client_ca_file: str = ""
    # A second port on `host`, plaintext, serving grpc.health.v1 alone: for Kubernetes' gRPC probes, which cannot
    # speak TLS. None: none (health is served on the main port in every mode), 0: any.
    health_port: int | None = None
    # Server reflection lists every service and message to whoever reaches the port: off unless asked for.
    reflection: bool = False
    # Each client connection is sent a GOAWAY after this long (0: never), so clients reconnect and re-resolve the
    # core's name: a bridge balancing over a headless Service then finds core pods added since it connected.
    max_connection_age_seconds: float = 300.0
    # The per-key counters (modelmax_core_key_requests_total, _key_tokens_total): a series per key and model, so
    # an operator with many keys turns them off (MODELMAX_METRICS_KEY_LABELS=false).
    metrics_key_labels: bool = True

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message the core receives: the bridge's body limit plus MESSAGE_HEADROOM_BYTES."""
        return self.max_body_bytes + MESSAGE_HEADROOM_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            catalog_path=env.get("MODELMAX_CATALOG", DEFAULT_CATALOG),
            host=env.get("MODELMAX_CORE_HOST", "127.0.0.1"),
            port=_number(env, "MODELMAX_CORE_PORT", 50051, int),
            shutdown_grace_seconds=_number(env, "MODELMAX_CORE_SHUTDOWN_GRACE_SECONDS", 30.0, float),
            log_level=env.get("MODELMAX_LOG_LEVEL", "INFO").upper(),
            metrics_port=_optional_port(env, "MODELMAX_CORE_METRICS_PORT", 9090),
            max_concurrent_requests=_number(env, "MODELMAX_CORE_MAX_CONCURRENT_REQUESTS", 1024, int),
            api_keys=static_keys(env),
            database_url=env.get("MODELMAX_DATABASE_URL", "").strip(),
            policy_fail_closed=_flag(env, "MODELMAX_POLICY_FAIL_CLOSED"),
            key_cache_ttl_seconds=_number(env, "MODELMAX_KEY_CACHE_TTL_SECONDS", 5.0, float),
            usage_buffer_records=_number(env, "MODELMAX_USAGE_BUFFER_RECORDS", 10_000, int),
            limits_redis_url=env.get("MODELMAX_LIMITS_REDIS_URL", "").strip(),
            limits_timeout_seconds=_number(env, "MODELMAX_LIMITS_TIMEOUT_SECONDS", 0.25, float),
            limits_fail_closed=_flag(env, "MODELMAX_LIMITS_FAIL_CLOSED"),
            max_body_bytes=_number(env, "MODELMAX_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, int),
            tls_cert_file=env.get("MODELMAX_CORE_TLS_CERT_FILE", "").strip(),
            tls_key_file=env.get("MODELMAX_CORE_TLS_KEY_FILE", "").strip(),
            tls_client_ca_file=env.get("MODELMAX_CORE_TLS_CLIENT_CA_FILE", "").strip(),
            health_port=_optional_port(env, "MODELMAX_CORE_HEALTH_PORT", None),
            reflection=_flag(env, "MODELMAX_CORE_REFLECTION"),
            max_connection_age_seconds=_number(env, "MODELMAX_CORE_MAX_CONNECTION_AGE_SECONDS", 300.0, float),
            metrics_key_labels=_flag(env, "MODELMAX_METRICS_KEY_LABELS", default=True),
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
        if self.max_body_bytes <= 0:
            raise SettingsError(f"MODELMAX_MAX_BODY_BYTES={self.max_body_bytes} must be positive")
        if self.max_connection_age_seconds < 0:
            raise SettingsError(
                f"MODELMAX_CORE_MAX_CONNECTION_AGE_SECONDS={self.max_connection_age_seconds} must be 0 (never) or more"
            )
        if self.health_port is not None and self.health_port != 0 and self.health_port == self.port:
            raise SettingsError("MODELMAX_CORE_HEALTH_PORT must differ from MODELMAX_CORE_PORT")
        self.server_tls()  # the files exist, are readable, and hold a certificate and its key

    def server_tls(self) -> ServerTls | None:
        """The core's TLS identity read from its files, or None for plaintext. Raises SettingsError naming the
        variable whose file is missing, unreadable or not what it should hold."""
        cert, key, client_ca = self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file
        if bool(cert) != bool(key):
            unset = "MODELMAX_CORE_TLS_KEY_FILE" if cert else "MODELMAX_CORE_TLS_CERT_FILE"
            raise SettingsError(
                "MODELMAX_CORE_TLS_CERT_FILE and MODELMAX_CORE_TLS_KEY_FILE must be set together (the certificate "
                f"chain and its private key): {unset} is not set"
            )
        if client_ca and not cert:
            raise SettingsError(
                "MODELMAX_CORE_TLS_CLIENT_CA_FILE (mutual TLS) needs MODELMAX_CORE_TLS_CERT_FILE and "
                "MODELMAX_CORE_TLS_KEY_FILE: client certificates are checked only on a TLS port"
            )
        if not cert:
            return None
        try:
            tls = ServerTls(
                certificate_chain=read_pem("MODELMAX_CORE_TLS_CERT_FILE", cert, "CERTIFICATE"),
                private_key=read_pem("MODELMAX_CORE_TLS_KEY_FILE", key, "PRIVATE KEY"),
                client_ca=read_pem("MODELMAX_CORE_TLS_CLIENT_CA_FILE", client_ca, "CERTIFICATE") if client_ca else None,
            )
            check_key_pair("MODELMAX_CORE_TLS_CERT_FILE", cert, "MODELMAX_CORE_TLS_KEY_FILE", key)
            if tls.client_ca is not None:
                check_ca("MODELMAX_CORE_TLS_CLIENT_CA_FILE", client_ca, tls.client_ca)
        except TlsFileError as exc:
            raise SettingsError(str(exc)) from None
        return tls


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The PEM bytes of the core's TLS identity, and of the CA its clients' certificates must chain to (mTLS)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None  # set: a client without a certificate from this CA cannot complete the handshake


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


def _flag(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _optional_port(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """An optional port; "off" (or, with no default, unset) disables the endpoint."""
    raw = env.get(name, "").strip().lower()
    if raw == "off" or (default is None and raw == ""):
        return None
    return _number(env, name, default or 0, int)


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
