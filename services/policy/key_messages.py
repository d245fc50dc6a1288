"""KeyService's messages and the key model, both ways: ApiKey and UsageTotals from records, and each field of a
request checked and turned into the key model's values, an INVALID_REQUEST naming the field by its proto path
when it cannot be (services/policy/admin.py, the servicer, uses these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from google.protobuf import timestamp_pb2

from modelmax.v1 import key_service_pb2 as ks
from services.errors import invalid_request
from services.policy.gate import Principal
from services.policy.keys import Budget, KeyKind, KeyRecord, KeySpec, Period
from services.policy.store import UsageTotals

MAX_TEXT: Final = 256  # characters of a key's name or owner
MAX_TIMESTAMP_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last instant a datetime holds
KIND: Final[dict[KeyKind, ks.KeyKind.ValueType]] = {
    "inference": ks.KeyKind.KEY_KIND_INFERENCE,
    "management": ks.KeyKind.KEY_KIND_MANAGEMENT,
}
PERIOD: Final[dict[Period, ks.BudgetPeriod.ValueType]] = {
    "day": ks.BudgetPeriod.BUDGET_PERIOD_DAY,
    "month": ks.BudgetPeriod.BUDGET_PERIOD_MONTH,
    "total": ks.BudgetPeriod.BUDGET_PERIOD_TOTAL,
}
PERIOD_OF: Final = {value: name for name, value in PERIOD.items()}
# What only an inference key may have: (KeyRecord field, ApiKey field).
INFERENCE_ONLY: Final = (
    ("allowed_models", "allowed_models"),
    ("budget", "budget"),
    ("rpm", "rpm"),
    ("tpm", "tpm"),
    ("max_concurrent", "max_concurrent"),
)


# proto from the key model


def api_key(record: KeyRecord, now: datetime) -> ks.ApiKey:
    """A stored key as the API shows it (never its hash)."""
    if record.revoked_at is not None:
        state = ks.KeyState.KEY_STATE_REVOKED
    elif record.is_active(now):
        state = ks.KeyState.KEY_STATE_ACTIVE
    else:
        state = ks.KeyState.KEY_STATE_EXPIRED
    key = ks.ApiKey(
        id=record.id,
        name=record.name,
        owner=record.owner,
        kind=KIND[record.kind],
        state=state,
        create_time=to_timestamp(record.created_at),
    )
    if record.expires_at is not None:
        key.expire_time.CopyFrom(to_timestamp(record.expires_at))
    if record.revoked_at is not None:
        key.revoke_time.CopyFrom(to_timestamp(record.revoked_at))
    if record.allowed_models is not None:
        key.allowed_models.SetInParent()  # an empty list is still a list: no model, not every model
        key.allowed_models.models.extend(sorted(record.allowed_models))
    if record.budget is not None:
        key.budget.CopyFrom(ks.Budget(amount_micros=record.budget.amount_micros, period=PERIOD[record.budget.period]))
    if record.rpm is not None:
        key.rpm = record.rpm
    if record.tpm is not None:
        key.tpm = record.tpm
    if record.max_concurrent is not None:
        key.max_concurrent = record.max_concurrent
    return key


def static_api_key(principal: Principal) -> ks.ApiKey:
    return ks.ApiKey(
        id=principal.key_id,
        name=principal.name,
        kind=KIND[principal.kind],
        state=ks.KeyState.KEY_STATE_ACTIVE,
        static_key=True,
    )


def usage_totals(row: UsageTotals) -> ks.UsageTotals:
    totals = ks.UsageTotals(
        group=row.group,
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        cached_tokens=row.cached_tokens,
        completion_tokens=row.completion_tokens,
        reasoning_tokens=row.reasoning_tokens,
        unpriced_requests=row.unpriced_requests,
    )
    if row.cost_micros is not None:  # unset stays unset: an unpriced cost is unknown, not 0
        totals.cost_micros = row.cost_micros
    return totals


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


# the key model from proto, field by field (each error names its field)


def required_id(key_id: str, field: str) -> str:
    if not key_id:
        raise invalid_request(f"'{field}' is required: the id of the key.", field=field)
    return key_id


def checked_name(name: str) -> str:
    if not name.strip():
        raise invalid_request("'key.name' is required and must not be blank.", field="key.name")
    if len(name) > MAX_TEXT:
        raise invalid_request(f"'key.name' must be at most {MAX_TEXT} characters.", field="key.name")
    return name


def checked_owner(owner: str) -> str:
    if len(owner) > MAX_TEXT:
        raise invalid_request(f"'key.owner' must be at most {MAX_TEXT} characters.", field="key.owner")
    return owner


def expiry_of(key: ks.ApiKey, now: datetime) -> datetime | None:
    if not key.HasField("expire_time"):
        return None
    when = to_datetime(key.expire_time, "key.expire_time")
    if when <= now:
        raise invalid_request(
            "'key.expire_time' must be in the future (revoke a key to stop it now).", field="key.expire_time"
        )
    return when


def budget_of_key(key: ks.ApiKey) -> Budget | None:
    if not key.HasField("budget"):
        return None
    return budget_from(key.budget.amount_micros, key.budget.period)


def budget_part(key: ks.ApiKey, paths: set[str], current: KeyRecord) -> Budget:
    """The current budget with the part the mask names changed ("budget.amount_micros" or "budget.period")."""
    if current.budget is None:
        field = "key.budget.amount_micros" if "budget.amount_micros" in paths else "key.budget.period"
        raise invalid_request(
            f"'{field}' cannot be changed alone: the key has no budget (set the whole budget, amount and period).",
            field=field,
        )
    amount = key.budget.amount_micros if "budget.amount_micros" in paths else current.budget.amount_micros
    period = key.budget.period if "budget.period" in paths else PERIOD[current.budget.period]
    return budget_from(amount, period)


def budget_from(amount: int, period: ks.BudgetPeriod.ValueType) -> Budget:
    if amount <= 0:
        raise invalid_request(
            f"'key.budget.amount_micros' must be more than 0, got {amount} (leave the budget unset for none).",
            field="key.budget.amount_micros",
        )
    name = PERIOD_OF.get(period)
    if name is None:
        raise invalid_request("'key.budget.period' must be day, month or total.", field="key.budget.period")
    return Budget(amount, name)


def limit_of(given: bool, value: int, field: str) -> int | None:
    if not given:
        return None
    if value <= 0:
        raise invalid_request(
            f"'key.{field}' must be at least 1, got {value} (leave it unset for no limit).", field=f"key.{field}"
        )
    return value


def check_kind(kind: KeyKind, key: KeySpec | KeyRecord) -> None:
    if kind != "management":
        return
    for attribute, field in INFERENCE_ONLY:
        if getattr(key, attribute) is not None:
            raise invalid_request(
                f"A management key cannot have 'key.{field}': it manages keys and never calls models.",
                field=f"key.{field}",
            )


def instant(given: bool, stamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    if not given:
        raise invalid_request(f"'{field}' is required.", field=field)
    return to_datetime(stamp, field)


def to_datetime(stamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A Timestamp as an aware datetime, from 1970 (the stores compare times as text with four-digit years) to the
    year 9999."""
    if not (0 <= stamp.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        raise invalid_request(f"'{field}' must be a time from 1970 to 9999.", field=field)
    return stamp.ToDatetime(tzinfo=UTC)
