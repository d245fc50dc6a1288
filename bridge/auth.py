"""The caller's credential: `Authorization: Bearer <key>`, taken apart for the core, which alone decides on it.

The bridge checks no key: it forwards the header's key to the core in the call's `authorization` metadata, and the
core authenticates it (services/policy/gate.py), so an HTTP caller and a direct gRPC caller meet the same check.
The bridge refuses only what cannot be a key at all (no header, another scheme, bytes gRPC metadata cannot carry),
and names the presented key by its public id in its own log line.
"""

from __future__ import annotations

import hashlib
import re
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


def presented(header: str) -> Identity:
    """The key in an Authorization header; raises Refused (MISSING_KEY, or INVALID_KEY for what is not a key)."""
    if not header:
        raise Refused(Refusal.MISSING_KEY)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if (
        scheme.lower() != "bearer"
        or not token
        or len(token) > MAX_KEY_LENGTH
        or not (token.isascii() and token.isprintable())  # gRPC metadata carries printable ASCII only
    ):
        raise Refused(Refusal.INVALID_KEY)
    stored = _STORED_KEY.match(token)
    return Identity(stored.group(1) if stored else static_key_id(token), "Bearer " + token)
