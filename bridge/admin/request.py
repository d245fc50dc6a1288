"""The admin API's requests: JSON bodies and query strings, parsed strictly into KeyService requests.

Strict, unlike the chat request (which ignores what it does not know, as OpenAI's SDKs add fields often): these are
our own endpoints, and a misspelt `budget_usd` that was silently ignored would create a key without a budget. So an
unknown field or query parameter, a repeated one, a wrong JSON type or a value the proto cannot carry is a 400 naming
its `param`. Ranges and rules (a budget above 0, models in the catalog, an expiry in the future) are the core's,
which applies them to gRPC callers too; its errors name proto fields, which `param_of` maps back to these names.

Money: `budget_usd` is an exact decimal (a JSON number or a string such as "5.00", at most 6 decimal places, read as
a Decimal, never a float); `budget_micros` is an integer of micro-USD. Times are ISO-8601 (`2026-07-01`,
`2026-07-01T12:00:00+02:00`); a time without an offset is UTC.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from google.protobuf import timestamp_pb2

from bridge.openai.errors import OpenAIError, bad_request
from bridge.openai.values import optional_string, reject_constant, required_string
from modelmax.v1 import key_service_pb2 as ks

_INT32_MAX: Final = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MICROS_PER_USD: Final = 1_000_000

_KINDS: Final = {"inference": ks.KeyKind.KEY_KIND_INFERENCE, "management": ks.KeyKind.KEY_KIND_MANAGEMENT}
PERIODS: Final = {
    "day": ks.BudgetPeriod.BUDGET_PERIOD_DAY,
    "month": ks.BudgetPeriod.BUDGET_PERIOD_MONTH,
    "total": ks.BudgetPeriod.BUDGET_PERIOD_TOTAL,
}
GROUPINGS: Final = {
    "key": ks.UsageGrouping.USAGE_GROUPING_KEY,
    "model": ks.UsageGrouping.USAGE_GROUPING_MODEL,
    "day": ks.UsageGrouping.USAGE_GROUPING_DAY,
}
_LIMITS: Final = ("rpm", "tpm", "max_concurrent")
_CREATE_FIELDS: Final = frozenset(
    {"name", "owner", "kind", "models", "budget_usd", "budget_micros", "period", "expires_at", *_LIMITS}
)
_UPDATE_FIELDS: Final = _CREATE_FIELDS - {"kind"}
_LIST_QUERY: Final = frozenset({"owner", "include_revoked"})
_USAGE_QUERY: Final = frozenset({"from", "to", "group_by"})

# KeyService field paths -> the admin API's params, matched as a whole path or its start ("key.allowed_models.
# models[2]" is "models[2]"). None: a field the caller did not name (the bridge built it). `{budget}` is whichever
# of budget_usd and budget_micros the request used.
_PARAM_OF_FIELD: Final = (
    ("key.allowed_models.models", "models"),
    ("key.allowed_models", "models"),
    ("key.budget.amount_micros", "{budget}"),
    ("key.budget.period", "period"),
    ("key.budget", "{budget}"),
    ("key.expire_time", "expires_at"),
    ("key.name", "name"),
    ("key.owner", "owner"),
    ("key.kind", "kind"),
    ("key.rpm", "rpm"),
    ("key.tpm", "tpm"),
    ("key.max_concurrent", "max_concurrent"),
    ("key.id", "id"),
    ("key_id", "id"),
    ("start_time", "from"),
    ("end_time", "to"),
    ("group_by", "group_by"),
)


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A parsed create or update body: the key's fields, and (for an update) the fields it changes."""

    key: ks.ApiKey
    update_mask: tuple[str, ...] = ()
    budget_param: str = "budget_usd"  # how the body named the budget's amount


def param_of(field: str, budget_param: str = "budget_usd") -> str | None:
    """The admin API's param for a KeyService field path, or None for one the caller did not name."""
    for prefix, param in _PARAM_OF_FIELD:
        if field == prefix or field.startswith((prefix + ".", prefix + "[")):
            return param.replace("{budget}", budget_param) + field[len(prefix) :]
    return None


def parse_create(body: bytes) -> KeyRequest:
    """POST /v1/admin/keys: {name, owner?, kind?, models?, budget_usd? | budget_micros?, period?, expires_at?,
    rpm?, tpm?, max_concurrent?}; null is the same as leaving a field out."""
    data = _body(body, _CREATE_FIELDS)
    given = {name: value for name, value in data.items() if value is not None}
    key = ks.ApiKey(name=required_string(given.get("name"), "name"), owner=optional_string(given.get("owner"), "owner"))
    if "kind" in given:
        kind = given["kind"]
        if not isinstance(kind, str) or kind not in _KINDS:
            raise bad_request("Invalid value for 'kind': expected 'inference' or 'management'.", param="kind")
        key.kind = _KINDS[kind]
    if "models" in given:
        _allow(key, given["models"])
    if "expires_at" in given:
        key.expire_time.CopyFrom(_timestamp(given["expires_at"], "expires_at"))
    for name in _LIMITS:
        if name in given:
            setattr(key, name, _int32(given[name], name))
    amount, budget_param = _amount(given)
    if amount is not None:
        key.budget.CopyFrom(ks.Budget(amount_micros=amount, period=_period(given.get("period", "month"))))
    elif "period" in given:
        raise bad_request("'period' is the period of a budget: give 'budget_usd' or 'budget_micros' too.", "period")
    return KeyRequest(key, budget_param=budget_param)


def parse_update(body: bytes, key_id: str) -> KeyRequest:
    """PATCH /v1/admin/keys/{id}: the fields to change, each as in create but `kind`; null clears one: no owner,
    no expiry, every model, no budget, no limit (a name and a budget's period cannot be cleared)."""
    data = _body(body, _UPDATE_FIELDS)
    if not data:
        raise bad_request("The request body names no field to change.")
    key = ks.ApiKey(id=key_id)
    mask: list[str] = []
    if "name" in data:
        key.name = required_string(data["name"], "name")
        mask.append("name")
    if "owner" in data:
        key.owner = optional_string(data["owner"], "owner")
        mask.append("owner")
    if "models" in data:
        if data["models"] is not None:
            _allow(key, data["models"])
        mask.append("allowed_models")
    if "expires_at" in data:
        if data["expires_at"] is not None:
            key.expire_time.CopyFrom(_timestamp(data["expires_at"], "expires_at"))
        mask.append("expire_time")
    for name in _LIMITS:
        if name in data:
            if data[name] is not None:
                setattr(key, name, _int32(data[name], name))
            mask.append(name)
    if "budget_usd" in data and "budget_micros" in data:
        raise bad_request("Give the budget once: 'budget_usd' or 'budget_micros', not both.", param="budget_micros")
    budget_param = "budget_micros" if "budget_micros" in data else "budget_usd"
    cleared = budget_param in data and data[budget_param] is None
    amount, _ = _amount(data)
    period = _period(data["period"]) if "period" in data else None  # null too is refused: a budget has a period
    if cleared:
        if period is not None:
            raise bad_request(f"'{budget_param}' is null (no budget): leave out 'period'.", param="period")
        mask.append("budget")
    elif amount is not None and period is not None:
        key.budget.CopyFrom(ks.Budget(amount_micros=amount, period=period))
        mask.append("budget")
    elif amount is not None:
        key.budget.amount_micros = amount
        mask.append("budget.amount_micros")
    elif period is not None:
        key.budget.period = period
        mask.append("budget.period")
    return KeyRequest(key, tuple(mask), budget_param)


def parse_list_query(query: Iterable[tuple[str, str]]) -> ks.ListKeysRequest:
    """GET /v1/admin/keys?owner=&include_revoked=true|false."""
    params = _query(query, _LIST_QUERY)
    request = ks.ListKeysRequest(include_revoked=_flag(params.get("include_revoked"), "include_revoked"))
    if "owner" in params:
        request.owner = params["owner"]
    return request


def parse_usage_query(query: Iterable[tuple[str, str]], now: datetime) -> ks.GetUsageReportRequest:
    """GET /v1/admin/usage?from=&to=&group_by=key|model|day; by default from the 1st of this month (UTC) to now,
    by key."""
    params = _query(query, _USAGE_QUERY)
    start = params.get("from")
    end = params.get("to")
    group_by = params.get("group_by", "key")
    if group_by not in GROUPINGS:
        raise bad_request("Invalid value for 'group_by': expected 'key', 'model' or 'day'.", param="group_by")
    first = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return ks.GetUsageReportRequest(
        start_time=_timestamp(start, "from") if start is not None else _stamp(first),
        end_time=_timestamp(end, "to") if end is not None else _stamp(now),
        group_by=GROUPINGS[group_by],
    )


# JSON and query strings


def _body(body: bytes, known: frozenset[str]) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=reject_constant, object_pairs_hook=_no_repeats)
    except _Repeated as exc:
        raise bad_request(f"The field '{exc.name}' is given more than once.", param=exc.name) from None
    except (ValueError, RecursionError):
        raise bad_request("We could not parse the JSON body of your request: send a JSON object.") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    unknown = sorted(data.keys() - known)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    return data


class _Repeated(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a repeated name (which json.loads would let the last one win)."""
    data: dict[str, Any] = {}
    for name, value in pairs:
        if name in data:
            raise _Repeated(name)
        data[name] = value
    return data


def _query(query: Iterable[tuple[str, str]], known: frozenset[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in query:
        if name not in known:
            raise bad_request(f"Unrecognized query parameter supplied: {name}", param=name)
        if name in params:
            raise bad_request(f"The query parameter '{name}' is given more than once.", param=name)
        params[name] = value
    return params


# values


def _int32(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"Invalid type for '{param}': expected an integer.", param=param)
    if not -_INT32_MAX <= value <= _INT32_MAX:
        raise bad_request(f"Invalid value for '{param}': {value} is out of range.", param=param)
    return value


def _flag(value: str | None, param: str) -> bool:
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise bad_request(f"Invalid value for '{param}': expected 'true' or 'false'.", param=param)


def _allow(key: ks.ApiKey, value: Any) -> None:
    """Set the key's allowed models from a JSON array of names (an empty array is kept: the core refuses it)."""
    if not isinstance(value, list):
        raise bad_request("Invalid type for 'models': expected an array of model names, or null for every model.",
                          param="models")  # fmt: skip
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise bad_request(f"Invalid type for 'models[{index}]': expected a string.", param=f"models[{index}]")
    key.allowed_models.SetInParent()
    key.allowed_models.models.extend(value)


def _period(value: Any) -> ks.BudgetPeriod.ValueType:
    if not isinstance(value, str) or value not in PERIODS:
        raise bad_request("Invalid value for 'period': expected 'day', 'month' or 'total'.", param="period")
    return PERIODS[value]


def _amount(data: dict[str, Any]) -> tuple[int | None, str]:
    """The budget's amount in micro-USD from `budget_usd` or `budget_micros` (not both), and the param it came from."""
    usd, micros = data.get("budget_usd"), data.get("budget_micros")
    if usd is not None and micros is not None:
        raise bad_request("Give the budget once: 'budget_usd' or 'budget_micros', not both.", param="budget_micros")
    if micros is not None:
        if isinstance(micros, bool) or not isinstance(micros, int):
            raise bad_request("Invalid type for 'budget_micros': expected an integer.", param="budget_micros")
        return _int64(micros, "budget_micros"), "budget_micros"
    if usd is None:
        return None, "budget_usd"
    return _int64(_usd_micros(usd), "budget_usd"), "budget_usd"


def _usd_micros(value: Any) -> int:
    """USD as written (5, 0.25, "0.25") in micro-USD, exactly."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise bad_request("Invalid type for 'budget_usd': expected a number or a decimal string.", "budget_usd")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite():
        raise bad_request(f"Invalid value for 'budget_usd': expected an amount of USD such as 5 or 0.25, got "
                          f"{str(value)[:64]!r}.", param="budget_usd")  # fmt: skip
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise bad_request("Invalid value for 'budget_usd': at most 6 decimal places (budgets are counted in "
                          "micro-USD).", param="budget_usd")  # fmt: skip
    if abs(amount) > _INT64_MAX:  # far out of range: no need to scale it (a huge exponent would take long)
        raise bad_request("Invalid value for 'budget_usd': out of range.", param="budget_usd")
    return int(amount.scaleb(6))


def _int64(value: int, param: str) -> int:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise bad_request(f"Invalid value for '{param}': out of range.", param=param)
    return value


def _timestamp(value: Any, param: str) -> timestamp_pb2.Timestamp:
    """An ISO-8601 date (midnight UTC) or time (UTC unless it says otherwise)."""
    if not isinstance(value, str):
        raise bad_request(f"Invalid type for '{param}': expected an ISO-8601 date or time string.", param=param)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _bad_time(param, value) from None
    if when.utcoffset() is None:
        when = when.replace(tzinfo=UTC)
    try:
        return _stamp(when)
    except (ValueError, OverflowError):  # before year 1 or after 9999 once in UTC
        raise _bad_time(param, value) from None


def _bad_time(param: str, value: str) -> OpenAIError:
    return bad_request(f"Invalid value for '{param}': expected an ISO-8601 date or time (2026-07-01, "
                       f"2026-07-01T12:00:00Z), got {value[:64]!r}.", param=param)  # fmt: skip


def _stamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp
