"""KeyCache: each process's short-lived cache of key lookups, and the checks that accept or refuse a presented key.

The TTL is the documented bound on revocation: a key revoked (or rotated, or changed) on one replica is refused by
every other replica at most `ttl` seconds later, 5 s by default, because no replica serves a cached record older
than that. The replica that made the change can call `invalidate` to make it immediate there.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from services.policy.keys import KeyKind, KeyRecord, parse_key, verify_key

DEFAULT_TTL = 5.0  # seconds: the bound on how long a revoked key keeps working on another replica
DEFAULT_NEGATIVE_TTL = 1.0  # unknown ids: short, since a key created a moment ago on another replica is unknown here
DEFAULT_MAX_ENTRIES = 10_000

RefusalReason = Literal["malformed", "unknown", "wrong_secret", "revoked", "expired", "wrong_kind"]
log = logging.getLogger(__name__)


class KeyLookup(Protocol):
    async def get_key(self, key_id: str) -> KeyRecord | None: ...


class KeyRefused(Exception):
    """The presented key cannot be used. `key_id` is safe to log (None when the key was malformed); the secret
    never appears in the message."""

    def __init__(self, reason: RefusalReason, key_id: str | None) -> None:
        super().__init__(f"key {key_id or '<malformed>'} refused: {reason}")
        self.reason: RefusalReason = reason
        self.key_id = key_id


@dataclass(frozen=True, slots=True)
class _Entry:
    fetched: float  # on the monotonic clock, taken before the read: the record is no older than this
    record: KeyRecord | None  # None: the store has no such id


class KeyCache:
    """Authenticates presented keys, looking each key id up in the store at most once per `ttl` seconds.

    Entries are keyed by the public id and hold the record, hash included, so a wrong secret for a real id is
    refused from the cache in constant time. A wrong secret does re-read a record cached for `negative_ttl` or
    longer, so a key rotated on another replica works here within `negative_ttl`, while guessing secrets costs the
    database at most one read per id per `negative_ttl`. At most `max_entries` ids are kept, the least recently
    used evicted first, so a flood of random ids costs memory only up to the bound.
    """

    def __init__(
        self,
        store: KeyLookup,
        *,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if ttl <= 0 or negative_ttl < 0 or max_entries <= 0:
            raise ValueError("need ttl > 0, negative_ttl >= 0 and max_entries > 0")
        self._store = store
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._now = now
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def ttl(self) -> float:
        return self._ttl

    def __len__(self) -> int:
        return len(self._entries)

    async def authenticate(self, presented: str, *, kind: KeyKind = "inference") -> KeyRecord:
        """The record of a usable key of `kind`, or KeyRefused saying why not.

        Management and inference keys never stand in for each other: a management key is refused for inference
        and the other way round, so a leaked inference key cannot mint keys, and an admin key is not spent on calls.
        """
        parsed = parse_key(presented)
        if parsed is None:
            raise KeyRefused("malformed", None)
        record = await self.lookup(parsed.key_id)
        if record is None:
            raise KeyRefused("unknown", parsed.key_id)
        if not verify_key(presented, record.secret_hash):
            record = await self.lookup(parsed.key_id, max_age=self._negative_ttl)  # rotated since it was cached?
            if record is None:
                raise KeyRefused("unknown", parsed.key_id)
            if not verify_key(presented, record.secret_hash):
                raise KeyRefused("wrong_secret", record.id)
        if record.revoked_at is not None:
            raise KeyRefused("revoked", record.id)
        if record.expires_at is not None and self._now() >= record.expires_at:
            raise KeyRefused("expired", record.id)  # checked on every call: expiry needs no cache refresh
        if record.kind != kind:
            raise KeyRefused("wrong_kind", record.id)
        return record

    async def lookup(self, key_id: str, *, max_age: float | None = None) -> KeyRecord | None:
        """The store's record for `key_id` as of at most `ttl` seconds ago (`negative_ttl` if it had none), or
        `max_age` when that is shorter."""
        now = self._clock()
        entry = self._entries.get(key_id)
        if entry is not None and now - entry.fetched < self._max_age(entry, max_age):
            self._entries.move_to_end(key_id)
            self.hits += 1
            return entry.record
        self.misses += 1
        record = await self._store.get_key(key_id)
        # `now` was taken before the read, so an entry's age bounds how stale its record is
        self._entries[key_id] = _Entry(now, record)
        self._entries.move_to_end(key_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return record

    def _max_age(self, entry: _Entry, max_age: float | None) -> float:
        ttl = self._ttl if entry.record is not None else self._negative_ttl
        return ttl if max_age is None else min(ttl, max_age)

    def stale(self, presented: str) -> KeyRecord | None:
        """The cached record of `presented` whatever its age, if the secret matches: what a fail-open gateway
        serves while the store is unreachable. Revocation and expiry are left to the caller to check."""
        parsed = parse_key(presented)
        entry = None if parsed is None else self._entries.get(parsed.key_id)
        if entry is None or entry.record is None or not verify_key(presented, entry.record.secret_hash):
            return None
        return entry.record

    def invalidate(self, key_id: str) -> None:
        """Forget `key_id`, so this process sees a change it made itself at once."""
        self._entries.pop(key_id, None)

    def clear(self) -> None:
        self._entries.clear()
