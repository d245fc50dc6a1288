"""API keys: the `mm-<id>-<secret>` format, its hash, and the KeyRecord and Budget a store keeps for each key."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, get_args

KeyKind = Literal["inference", "management"]
Period = Literal["day", "month", "total"]

PREFIX = "mm"
ID_LENGTH = 12
SECRET_BYTES = 32  # token_urlsafe(32) is 43 characters: 256 bits of randomness
# Lowercase RFC 4648 base32 letters: no 0/1/8/9 (nothing to misread), no `-`, so the id is a safe log and metric label.
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
# The id has a fixed length and no `-`, so the secret (url-safe base64, which may contain `-`) is whatever follows it.
_KEY = re.compile(rf"{PREFIX}-([a-z2-7]{{{ID_LENGTH}}})-([A-Za-z0-9_-]{{32,256}})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A presented key split into its public id and its secret (which is never logged)."""

    key_id: str
    secret: str = field(repr=False)


def generate_key() -> tuple[str, str]:
    """A new random key: returns (key_id, the whole key `mm-<id>-<secret>`)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    return key_id, f"{PREFIX}-{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"


def with_new_secret(key_id: str) -> str:
    """A whole key for an existing id (rotation keeps the id, so logs and usage stay joined)."""
    return f"{PREFIX}-{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_key(presented: str) -> ParsedKey | None:
    """The id and secret of a well-formed key, or None: callers may log `key_id` but never `presented`."""
    match = _KEY.fullmatch(presented)  # not match() with `$`, which would accept a trailing newline
    return ParsedKey(match.group(1), match.group(2)) if match else None


def hash_key(whole_key: str) -> str:
    """SHA-256 (hex) of the whole key, which is all a store keeps.

    A fast unsalted hash is right here, unlike for passwords: the secret is 256 random bits, so there is no
    dictionary to try and brute force is out of reach whatever the hash costs, while a slow KDF (bcrypt, argon2)
    would add tens of milliseconds to every request that misses the cache. Being unsalted and deterministic also
    makes the hash a lookup key (`find_by_hash`, a unique index).
    """
    return hashlib.sha256(whole_key.encode()).hexdigest()


def verify_key(presented: str, secret_hash: str) -> bool:
    """Whether `presented` hashes to `secret_hash`, compared in constant time."""
    return hmac.compare_digest(hash_key(presented).encode(), secret_hash.encode())


def window_start(period: Period, now: datetime) -> datetime:
    """The start (UTC) of the budget period that contains `now`: midnight, the 1st of the month, or the epoch."""
    now = now.astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return _EPOCH


def require_aware(name: str, value: datetime | None) -> None:
    """Refuse naive datetimes: both stores keep UTC instants, and a naive one has no defined instant."""
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending cap: `amount_micros` micro-USD (1e-6 USD) per calendar `period` (UTC), or in total."""

    amount_micros: int
    period: Period

    def __post_init__(self) -> None:
        if not 0 < self.amount_micros <= MAX_BUDGET_MICROS:
            raise ValueError(f"budget amount must be in 1..{MAX_BUDGET_MICROS} micro-USD, got {self.amount_micros}")
        if self.period not in get_args(Period):
            raise ValueError(f"budget period must be one of {get_args(Period)}, got {self.period!r}")

    def window_start(self, now: datetime) -> datetime:
        return window_start(self.period, now)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a caller chooses for a new key; the store adds the id, the secret and `created_at`."""

    name: str
    owner: str = ""  # free text: the project or customer the key is for
    kind: KeyKind = "inference"
    expires_at: datetime | None = None
    allowed_models: frozenset[str] | None = None  # None: every model in the catalog
    budget: Budget | None = None
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        _validate(self.kind, self.expires_at, self.allowed_models, self.budget, self.rpm, self.tpm, self.max_concurrent)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key. `secret_hash` is the only trace of the secret; the record never holds the secret itself."""

    id: str
    name: str
    owner: str
    kind: KeyKind
    created_at: datetime
    secret_hash: str = field(repr=False)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    allowed_models: frozenset[str] | None = None
    budget: Budget | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        require_aware("created_at", self.created_at)
        require_aware("revoked_at", self.revoked_at)
        _validate(self.kind, self.expires_at, self.allowed_models, self.budget, self.rpm, self.tpm, self.max_concurrent)

    def is_active(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def new_record(spec: KeySpec, now: datetime) -> tuple[KeyRecord, str]:
    """A record for `spec` with a fresh id and secret: returns (record, the whole key, to show once)."""
    key_id, whole = generate_key()
    record = KeyRecord(
        id=key_id,
        name=spec.name,
        owner=spec.owner,
        kind=spec.kind,
        created_at=now,
        secret_hash=hash_key(whole),
        expires_at=spec.expires_at,
        allowed_models=spec.allowed_models,
        budget=spec.budget,
        rpm=spec.rpm,
        tpm=spec.tpm,
        max_concurrent=spec.max_concurrent,
    )
    return record, whole


MAX_LIMIT = 2**31 - 1  # rpm, tpm and max_concurrent are 32-bit columns in PostgreSQL
MAX_BUDGET_MICROS = 2**63 - 1  # a 64-bit column in both stores


def _validate(
    kind: str, expires_at: datetime | None, models: frozenset[str] | None, budget: Budget | None, *limits: int | None
) -> None:
    if kind not in get_args(KeyKind):
        raise ValueError(f"key kind must be one of {get_args(KeyKind)}, got {kind!r}")
    require_aware("expires_at", expires_at)
    for limit in limits:
        if limit is not None and not 0 < limit <= MAX_LIMIT:
            raise ValueError(f"limits must be between 1 and {MAX_LIMIT}, or None; got {limit}")
    if kind == "management" and (models is not None or budget is not None or any(x is not None for x in limits)):
        raise ValueError("a management key runs no completions: it takes no models, budget or limits")
