"""The Store protocol every policy backend implements (keys, usage, budgets), and the value types it speaks in.

Errors:

    StoreError
    ├── KeyNotFound       no key with that id
    ├── KeyRevoked        the key is revoked and cannot be changed or rotated
    └── MigrationError    the schema on disk and the migration files disagree
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol

from services.policy.keys import Budget, KeyRecord, KeySpec, require_aware
from services.policy.usage import UsageRecord

GroupBy = Literal["key", "model", "day"]
# A reservation that is never settled (its replica died mid-request) stops counting after this long. It must be
# longer than the longest request, or a slow request's reservation would lapse while it still runs.
DEFAULT_HOLD: Final = timedelta(minutes=15)
# A lapsed hold's row is kept this long after it lapses, so that a very late settle still counts its cost once.
FORGET_LAPSED: Final = timedelta(days=1)


class StoreError(Exception):
    """A policy store refused an operation."""


class KeyNotFound(StoreError):
    """No key has that id."""


class KeyRevoked(StoreError):
    """The key is revoked: revocation is final, so it can be neither updated nor rotated."""


class MigrationError(StoreError):
    """The migration files are malformed, or one already applied has since been edited."""


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET: Final = _Unset.UNSET


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """The fields `update_key` changes; a field left UNSET keeps its value (None is a value: "no limit")."""

    name: str | _Unset = UNSET
    owner: str | _Unset = UNSET
    expires_at: datetime | None | _Unset = UNSET
    allowed_models: frozenset[str] | None | _Unset = UNSET
    budget: Budget | None | _Unset = UNSET
    rpm: int | None | _Unset = UNSET
    tpm: int | None | _Unset = UNSET
    max_concurrent: int | None | _Unset = UNSET

    def apply(self, record: KeyRecord) -> KeyRecord:
        """`record` with these changes; the KeyRecord constructor validates the result."""
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(record, **{k: v for k, v in changed.items() if v is not UNSET})


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one in-flight request, until `settle` replaces it with the request's real cost."""

    id: str
    key_id: str
    period_start: datetime
    amount_micros: int


@dataclass(frozen=True, slots=True)
class BudgetState:
    """One key's budget window: settled spend and the reservations still held (unexpired)."""

    spent_micros: int
    held_micros: int


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """One row of a usage report. `cost_micros` sums the priced requests and is None when none was priced;
    `unpriced_requests` says how many requests the cost leaves out."""

    group: str  # the key id, the model name, or the UTC day as YYYY-MM-DD
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_micros: int | None
    unpriced_requests: int


class Store(Protocol):
    """Keys, usage and budgets in one database. Implementations: SQLiteStore and PostgresStore.

    Every datetime is timezone-aware. Stores are opened with `await XStore.open(...)`, which applies pending
    migrations, and are safe to share between the tasks of one event loop.
    """

    async def close(self) -> None: ...

    # keys
    async def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """Returns the record and the whole key: the only time the secret exists outside the caller's hands."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...
    async def find_by_hash(self, secret_hash: str) -> KeyRecord | None: ...
    async def list_keys(self, *, owner: str | None = None, include_revoked: bool = True) -> list[KeyRecord]: ...
    async def update_key(self, key_id: str, changes: KeyChanges) -> KeyRecord: ...

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Sets `revoked_at` (idempotent: a second revocation keeps the first time)."""
        ...

    async def rotate_key(self, key_id: str) -> tuple[KeyRecord, str]:
        """A new secret for the same id; the old secret stops working (after each replica's cache TTL)."""
        ...

    # usage
    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        """Writes a batch in one transaction; a record whose request_id is already stored is skipped."""
        ...

    async def usage_report(
        self, start: datetime, end: datetime, group_by: GroupBy, *, key_id: str | None = None
    ) -> list[UsageTotals]:
        """Totals of requests started in [start, end), one row per group, ordered by group; only `key_id`'s
        requests when it is given (an index on (key_id, started_at) serves it)."""
        ...

    async def spent(self, key_id: str, since: datetime) -> int:
        """Micro-USD of priced usage recorded for the key since `since` (unpriced requests add nothing)."""
        ...

    # budgets
    async def reserve(
        self, key_id: str, amount_micros: int, period_start: datetime, limit_micros: int, *, hold: timedelta = ...
    ) -> Reservation | None:
        """Holds `amount_micros` against the key's budget window starting `period_start`, or returns None.

        The rule: admit when the window's settled spend plus its live (unexpired) holds is still below
        `limit_micros`, whatever the amount. The check and the insert of the hold run under one lock per window
        (a row lock in PostgreSQL, the database write lock in SQLite) shared by every process on the database, so
        the admissions form one sequence in which each saw all earlier ones: the last admitted brought the total
        from below the limit to at most limit + its own amount. A budget is therefore never passed by more than one
        reservation, and a request whose estimate is larger than what is left still runs while anything is left.
        A hold that is never settled (its replica died) stops counting after `hold`.
        """
        ...

    async def settle(self, reservation: Reservation, actual_micros: int) -> bool:
        """Replaces the hold with the real cost; False (and nothing counted) if it was already settled."""
        ...

    async def budget_state(self, key_id: str, period_start: datetime) -> BudgetState: ...


def check_reserve_args(amount_micros: int, period_start: datetime, limit_micros: int, hold: timedelta) -> None:
    """The argument checks both backends make before touching the database."""
    require_aware("period_start", period_start)
    if amount_micros < 0 or limit_micros <= 0 or hold <= timedelta(0):
        raise ValueError(f"need amount >= 0, limit > 0, hold > 0; got {amount_micros}, {limit_micros}, {hold}")


def check_report_args(start: datetime, end: datetime, group_by: str) -> None:
    require_aware("start", start)
    require_aware("end", end)
    if group_by not in ("key", "model", "day"):
        raise ValueError(f"group_by must be key, model or day, got {group_by!r}")


# Columns shared by both schemas, in the order of the values below. Each backend encodes what its driver cannot:
# SQLite gets datetimes as UTC text and the model list as JSON; asyncpg takes both as they are.
KEY_COLUMNS: Final = (
    "id", "secret_hash", "name", "owner", "kind", "created_at", "expires_at", "revoked_at", "allowed_models",
    "budget_micros", "budget_period", "rpm", "tpm", "max_concurrent",
)  # fmt: skip
USAGE_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(UsageRecord))
TOKEN_COLUMNS: Final = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")


def key_values(r: KeyRecord) -> list[Any]:
    models = None if r.allowed_models is None else sorted(r.allowed_models)
    budget = [r.budget.amount_micros, r.budget.period] if r.budget else [None, None]
    head = [r.id, r.secret_hash, r.name, r.owner, r.kind, r.created_at, r.expires_at, r.revoked_at, models]
    return [*head, *budget, r.rpm, r.tpm, r.max_concurrent]


def key_from_row(row: Mapping[str, Any]) -> KeyRecord:
    """A KeyRecord from a row whose datetimes are datetimes and whose `allowed_models` is a list or None."""
    models, amount = row["allowed_models"], row["budget_micros"]
    return KeyRecord(
        **{c: row[c] for c in KEY_COLUMNS if c not in ("allowed_models", "budget_micros", "budget_period")},
        allowed_models=None if models is None else frozenset(models),
        budget=None if amount is None else Budget(amount, row["budget_period"]),
    )


def usage_values(r: UsageRecord) -> list[Any]:
    return [getattr(r, c) for c in USAGE_COLUMNS]
