"""The PEM files of TLS settings, read and checked once at start-up by both processes (their settings modules turn
TlsFileError into their own SettingsError): a missing file, a file without the expected block, a certificate and a
key that do not belong together, or a CA that does not parse stops the process with the variable named, rather
than failing handshakes later."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsFileError(Exception):
    """A TLS setting's file is unusable; the message names the variable."""


def read_pem(variable: str, path: str, kind: str) -> bytes:
    """The PEM file `variable` names, holding a `kind` block ("CERTIFICATE", or "PRIVATE KEY", which also matches
    "RSA PRIVATE KEY" and "EC PRIVATE KEY")."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{variable}={path!r} cannot be read: {exc.strerror}") from None
    if f"{kind}-----".encode() not in data or b"-----BEGIN " not in data:
        raise TlsFileError(f"{variable}={path!r} holds no PEM {kind.lower()}")
    return data


def check_key_pair(cert_variable: str, cert: str, key_variable: str, key: str) -> None:
    """Refuse a certificate and key that do not belong together, or a key encrypted with a passphrase (gRPC
    cannot use one)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")  # never a prompt
    except ssl.SSLError as exc:
        raise TlsFileError(
            f"{cert_variable}={cert!r} and {key_variable}={key!r} are not a certificate and its unencrypted private "
            f"key: {exc.reason or exc}"
        ) from None


def check_ca(variable: str, path: str, data: bytes) -> None:
    """Refuse a CA file whose certificates do not parse."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise TlsFileError(f"{variable}={path!r} holds no valid PEM CA certificate: {exc.reason or exc}") from None
