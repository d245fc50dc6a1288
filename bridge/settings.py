"""The bridge's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from startup.tls import TlsFileError, check_ca, check_key_pair, read_pem

N = TypeVar("N", int, float)

# The core accepts gRPC messages up to MODELMAX_MAX_BODY_BYTES plus this (services/settings.py says why): the bridge
# sends no larger, so a request whose proto outgrows its JSON is a 413 here rather than a round trip to be refused.
MESSAGE_HEADROOM_BYTES = 64 * 1024


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
    # The HTTP transport's limits (bridge/transport.py): a longer request head is a 431; a head or a body that is not
    # in within its time is a 408; connections beyond the cap get a 503; idle keep-alive connections are closed.
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 60.0
    keepalive_seconds: float = 5.0
    max_connections: int = 4096
    # Request body bytes the process holds at once, being read or parsed; beyond it a fast 503 (bridge/pipeline.py).
    max_buffered_bytes: int = 32 * 1024 * 1024
    # Anthropic streams: a `ping` event when the core has sent nothing for this long (a model thinking), so proxies
    # and load balancers with idle timeouts keep the connection.
    ping_seconds: float = 10.0
    # TLS to the core: the CA (PEM) its certificate must chain to; "" for a plaintext channel.
    core_tls_ca_file: str = ""
    # The name the core's certificate must carry, when it is not the host of `core_target`.
    core_tls_server_name: str = ""
    # mTLS: the bridge's client certificate chain and private key (PEM), both or neither; need core_tls_ca_file.
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message the bridge sends the core: the core's own receive limit."""
        return self.max_body_bytes + MESSAGE_HEADROOM_BYTES

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
            max_header_bytes=_number(env, "MODELMAX_BRIDGE_MAX_HEADER_BYTES", 16 * 1024, int),
            max_headers=_number(env, "MODELMAX_BRIDGE_MAX_HEADERS", 100, int),
            header_timeout_seconds=_number(env, "MODELMAX_BRIDGE_HEADER_TIMEOUT_SECONDS", 10.0, float),
            body_timeout_seconds=_number(env, "MODELMAX_BRIDGE_BODY_TIMEOUT_SECONDS", 60.0, float),
            keepalive_seconds=_number(env, "MODELMAX_BRIDGE_KEEPALIVE_SECONDS", 5.0, float),
            max_connections=_number(env, "MODELMAX_BRIDGE_MAX_CONNECTIONS", 4096, int),
            max_buffered_bytes=_number(env, "MODELMAX_BRIDGE_MAX_BUFFERED_BYTES", 32 * 1024 * 1024, int),
            ping_seconds=_number(env, "MODELMAX_BRIDGE_PING_SECONDS", 10.0, float),
            core_tls_ca_file=env.get("MODELMAX_CORE_TLS_CA_FILE", "").strip(),
            core_tls_server_name=env.get("MODELMAX_CORE_TLS_SERVER_NAME", "").strip(),
            tls_cert_file=env.get("MODELMAX_BRIDGE_TLS_CERT_FILE", "").strip(),
            tls_key_file=env.get("MODELMAX_BRIDGE_TLS_KEY_FILE", "").strip(),
        ).checked()

    def checked(self) -> Settings:
        """These settings, once their TLS files are known to be usable; SettingsError naming the variable if not."""
        if self.max_buffered_bytes < self.max_body_bytes:
            raise SettingsError(
                f"MODELMAX_BRIDGE_MAX_BUFFERED_BYTES={self.max_buffered_bytes} is below MODELMAX_MAX_BODY_BYTES="
                f"{self.max_body_bytes}: a request of the largest allowed size could never be read"
            )
        self.core_tls()
        return self

    def core_tls(self) -> CoreTls | None:
        """What the channel to the core needs for TLS, read from the files; None for a plaintext channel."""
        ca, cert, key = self.core_tls_ca_file, self.tls_cert_file, self.tls_key_file
        if bool(cert) != bool(key):
            unset = "MODELMAX_BRIDGE_TLS_KEY_FILE" if cert else "MODELMAX_BRIDGE_TLS_CERT_FILE"
            raise SettingsError(
                "MODELMAX_BRIDGE_TLS_CERT_FILE and MODELMAX_BRIDGE_TLS_KEY_FILE must be set together (the client "
                f"certificate and its private key): {unset} is not set"
            )
        if not ca:
            for variable, value in (
                ("MODELMAX_BRIDGE_TLS_CERT_FILE", cert),
                ("MODELMAX_CORE_TLS_SERVER_NAME", self.core_tls_server_name),
            ):
                if value:
                    raise SettingsError(f"{variable} needs MODELMAX_CORE_TLS_CA_FILE: it is used only on a TLS channel")
            return None
        try:
            tls = CoreTls(
                root_certificates=read_pem("MODELMAX_CORE_TLS_CA_FILE", ca, "CERTIFICATE"),
                certificate_chain=read_pem("MODELMAX_BRIDGE_TLS_CERT_FILE", cert, "CERTIFICATE") if cert else None,
                private_key=read_pem("MODELMAX_BRIDGE_TLS_KEY_FILE", key, "PRIVATE KEY") if key else None,
                server_name=self.core_tls_server_name,
            )
            check_ca("MODELMAX_CORE_TLS_CA_FILE", ca, tls.root_certificates)
            if cert:
                check_key_pair("MODELMAX_BRIDGE_TLS_CERT_FILE", cert, "MODELMAX_BRIDGE_TLS_KEY_FILE", key)
        except TlsFileError as exc:
            raise SettingsError(str(exc)) from None
        return tls


@dataclass(frozen=True, slots=True)
class CoreTls:
    """The PEM bytes a TLS channel to the core is made of."""

    root_certificates: bytes  # the CA the core's certificate must chain to
    certificate_chain: bytes | None  # the bridge's client certificate (mTLS), or None
    private_key: bytes | None
    server_name: str  # the name to verify instead of the target's host; "" for the host


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
