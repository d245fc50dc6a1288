"""The admin API's JSON objects, from KeyService messages: keys, the calling key's state, usage rows.

Money is given twice: exact integer micro-USD (`*_micros`, what to compute with) and an exact decimal string of USD
(`*_usd`, "5.00", "0.001234": what to show), never a float. Times are ISO-8601 UTC with a `Z`. An unknown cost (no
request in the row had a price) is null in both, never 0.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any, Final

from google.protobuf import timestamp_pb2

from modelmax.v1 import key_service_pb2 as ks

_KIND: Final = {ks.KeyKind.KEY_KIND_INFERENCE: "inference", ks.KeyKind.KEY_KIND_MANAGEMENT: "management"}
_STATE: Final = {
    ks.KeyState.KEY_STATE_ACTIVE: "active",
    ks.KeyState.KEY_STATE_EXPIRED: "expired",
    ks.KeyState.KEY_STATE_REVOKED: "revoked",
}
_PERIOD: Final = {
    ks.BudgetPeriod.BUDGET_PERIOD_DAY: "day",
    ks.BudgetPeriod.BUDGET_PERIOD_MONTH: "month",
    ks.BudgetPeriod.BUDGET_PERIOD_TOTAL: "total",
}
_GROUPING: Final = {
    ks.UsageGrouping.USAGE_GROUPING_KEY: "key",
    ks.UsageGrouping.USAGE_GROUPING_MODEL: "model",
    ks.UsageGrouping.USAGE_GROUPING_DAY: "day",
}


def key_json(key: ks.ApiKey) -> dict[str, Any]:
    """A key as the admin API shows it (never its secret)."""
    return {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "kind": _KIND.get(key.kind, "unknown"),
        "status": _STATE.get(key.state, "unknown"),
        "models": list(key.allowed_models.models) if key.HasField("allowed_models") else None,
        "budget": _budget_json(key.budget) if key.HasField("budget") else None,
        "rpm": key.rpm if key.HasField("rpm") else None,
        "tpm": key.tpm if key.HasField("tpm") else None,
        "max_concurrent": key.max_concurrent if key.HasField("max_concurrent") else None,
        "created_at": _time(key.create_time) if key.HasField("create_time") else None,
        "expires_at": _time(key.expire_time) if key.HasField("expire_time") else None,
        "revoked_at": _time(key.revoke_time) if key.HasField("revoke_time") else None,
    }


def created_json(key: ks.ApiKey, secret_key: str) -> dict[str, Any]:
    """A created or rotated key, with the whole key: the only response that carries it."""
    return {**key_json(key), "key": secret_key}


def current_key_json(reply: ks.GetCurrentKeyResponse) -> dict[str, Any]:
    """GET /v1/key's `data`: the key, this period's usage, and what is left of its budget."""
    key = reply.key
    shown = key_json(key)
    del shown["object"]
    shown["static"] = key.static_key
    usage = None
    if reply.HasField("usage"):
        usage = {
            "period": _PERIOD.get(reply.usage_period, "month"),
            "period_start": _time(reply.period_start_time),
            **_totals_json(reply.usage),
        }
        del usage["group"]
    shown["usage"] = usage
    status = reply.budget_status if reply.HasField("budget_status") else None
    shown["spent_micros"] = None if status is None else status.spent_micros
    shown["held_micros"] = None if status is None else status.held_micros
    shown["remaining_micros"] = None if status is None else status.remaining_micros
    shown["limit_remaining"] = None if status is None else usd(status.remaining_micros)  # OpenRouter's name
    return shown


def usage_json(reply: ks.GetUsageReportResponse, request: ks.GetUsageReportRequest) -> dict[str, Any]:
    """GET /v1/admin/usage: the rows, and the range and grouping they are for (defaults included)."""
    return {
        "object": "list",
        "from": _time(request.start_time),
        "to": _time(request.end_time),
        "group_by": _GROUPING[request.group_by],
        "data": [_totals_json(row) for row in reply.rows],
    }


def usd(micros: int) -> str:
    """Micro-USD as an exact decimal string of USD: cents always, then the decimals that are not trailing zeros
    (5000000 is "5.00", 1234 is "0.001234")."""
    dollars, fraction = divmod(abs(micros), 1_000_000)
    return f"{'-' if micros < 0 else ''}{dollars}.{f'{fraction:06d}'.rstrip('0'):0<2}"


def _budget_json(budget: ks.Budget) -> dict[str, Any]:
    return {
        "amount_usd": usd(budget.amount_micros),
        "amount_micros": budget.amount_micros,
        "period": _PERIOD.get(budget.period, "unknown"),
    }


def _totals_json(row: ks.UsageTotals) -> dict[str, Any]:
    cost = row.cost_micros if row.HasField("cost_micros") else None
    return {
        "group": row.group,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "cached_tokens": row.cached_tokens,
        "completion_tokens": row.completion_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cost_micros": cost,
        "cost_usd": None if cost is None else usd(cost),
        "unpriced_requests": row.unpriced_requests,
    }


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")
