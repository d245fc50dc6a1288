"""Authentication: `Authorization: Bearer <key>` against the configured keys, in constant time, to an Identity."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.dialect import Refusal, Refused

STATIC = "static"  # the name of every key from the bridge's own settings (MODELMAX_API_KEY(S), the keys file)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling. Both fields are safe to log and to send to the core; the key itself never leaves here."""

    key_id: str  # stable and non-secret: the same key always has the same id
    name: str


def static_key_id(key: str) -> str:
    """A configured key's id: a short fingerprint, stable across restarts, that does not reveal the key."""
    return "static-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyChecker:
    """Holds the configured keys as bytes and compares against every one, so timing says nothing about which
    matched (or whether one did)."""

    def __init__(self, keys: Iterable[str]) -> None:
        # One Identity per key, made once: authenticating a request allocates nothing.
        self._keys = tuple((key.encode(), Identity(static_key_id(key), STATIC)) for key in keys)

    def authenticate(self, header: str) -> Identity:
        """The identity of the key in an Authorization header; raises Refused (MISSING_KEY or INVALID_KEY)."""
        if not header:
            raise Refused(Refusal.MISSING_KEY)
        scheme, _, token = header.partition(" ")
        presented = token.strip().encode()
        found: Identity | None = None
        for key, identity in self._keys:  # no early exit
            if hmac.compare_digest(presented, key):
                found = identity
        if found is None or scheme.lower() != "bearer":
            raise Refused(Refusal.INVALID_KEY)
        return found
