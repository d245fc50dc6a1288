"""The caller's credential (`Authorization: Bearer <key>`, or Anthropic's `x-api-key`), taken apart for the core,
which alone decides on it.

The bridge checks no key: it forwards the header's key to the core in the call's `authorization` metadata, and the
core authenticates it (services/policy/gate.py), so an HTTP caller and a direct gRPC caller meet the same check.
The bridge refuses only what cannot be a key at all (no header, another scheme, bytes gRPC metadata cannot carry),
and names the presented key by its public id in its own log line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.dialect import Refusal, Refused

MAX_KEY_LENGTH = 512  # a longer "key" is no key of ours, and would cost the core's metadata limits
_STORED_KEY = re.compile(r"mm-([a-z2-7]{12})-")  # services/policy/keys.py: mm-<id>-<secret>; the id is public


@dataclass(frozen=True, slots=True)
class Identity:
    """The key a caller presented: its public id (safe to log) and the bearer value the core checks."""

    key_id: str  # as presented, before the core's check: a refused request is logged with it too
    authorization: str  # "Bearer <key>": the metadata value for the core; never logged


def static_key_id(key: str) -> str:
    """A static key's id, as the core computes it (services.policy.gate.static_key_id): a fingerprint."""
    return "static-" + hashlib.sha256(key.encode()).hexdigest()[:12]


RawHeaders = Sequence[tuple[bytes, bytes]]  # an ASGI scope's headers: lower-case names, as sent


def presented(header: str) -> Identity:
    """The key in an Authorization header; raises Refused (MISSING_KEY, or INVALID_KEY for what is not a key)."""
    if not header:
        raise Refused(Refusal.MISSING_KEY)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        raise Refused(Refusal.INVALID_KEY)
    return _identity(token.strip())


def _identity(token: str) -> Identity:
    if (
        not token
        or len(token) > MAX_KEY_LENGTH
        or not (token.isascii() and token.isprintable())  # gRPC metadata carries printable ASCII only
    ):
        raise Refused(Refusal.INVALID_KEY)
    stored = _STORED_KEY.match(token)
    return Identity(stored.group(1) if stored else static_key_id(token), "Bearer " + token)


def bearer(headers: RawHeaders) -> Identity:
    """OpenAI's credential: one `Authorization: Bearer <key>` header."""
    found = [value for name, value in headers if name == b"authorization"]
    if len(found) > 1:  # two would let the first silently win: which credential is meant is unclear
        raise Refused(Refusal.DUPLICATE_HEADER, {"header": "Authorization"})
    return presented(found[0].decode("latin-1") if found else "")


def api_key_or_bearer(headers: RawHeaders) -> Identity:
    """Anthropic's credential: `x-api-key: <key>` (older SDKs, most tools) or `Authorization: Bearer <key>` (the 2.x
    SDKs and Claude Code's ANTHROPIC_AUTH_TOKEN). Each header at most once; both are accepted only when they carry
    the same key (a client may send both), since two different keys leave unclear which one is meant."""
    api_keys = [value for name, value in headers if name == b"x-api-key"]
    if not api_keys:
        return bearer(headers)
    if len(api_keys) > 1:
        raise Refused(Refusal.DUPLICATE_HEADER, {"header": "x-api-key"})
    identity = _identity(api_keys[0].decode("latin-1").strip())
    if any(name == b"authorization" for name, _ in headers) and bearer(headers) != identity:
        raise Refused(Refusal.DUPLICATE_HEADER, {"header": "x-api-key or Authorization"})
    return identity
