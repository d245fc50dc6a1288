"""Gemini's failures as GatewayErrors, without the SDK: the one table from upstream errors (google.rpc status names,
HTTP statuses) to ErrorReasons, the messages callers see, and the INVALID_REQUEST for a request Gemini cannot take.

Every other module of this package raises through here, so that every error names the same provider.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelmax.v1 import completion_pb2 as pb
from services.errors import UPSTREAM_MESSAGES, GatewayError, upstream_error

PROVIDER = "gemini"
R = pb.ErrorReason

# The one table of upstream failures: google.rpc status names first (they are the most specific), then the HTTP
# status. Anything neither knows is logged by the provider and reported as INTERNAL.
REASON_BY_STATUS = {
    "INVALID_ARGUMENT": R.ERROR_REASON_INVALID_REQUEST,
    "FAILED_PRECONDITION": R.ERROR_REASON_INVALID_REQUEST,  # e.g. no free tier in the caller's region
    "OUT_OF_RANGE": R.ERROR_REASON_INVALID_REQUEST,
    "UNAUTHENTICATED": R.ERROR_REASON_UPSTREAM_AUTH,
    "PERMISSION_DENIED": R.ERROR_REASON_UPSTREAM_AUTH,
    "NOT_FOUND": R.ERROR_REASON_MODEL_NOT_FOUND,
    "RESOURCE_EXHAUSTED": R.ERROR_REASON_RATE_LIMITED,
    "DEADLINE_EXCEEDED": R.ERROR_REASON_UPSTREAM_TIMEOUT,
    "INTERNAL": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "UNAVAILABLE": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
}
REASON_BY_CODE = {
    400: R.ERROR_REASON_INVALID_REQUEST,
    401: R.ERROR_REASON_UPSTREAM_AUTH,
    403: R.ERROR_REASON_UPSTREAM_AUTH,
    404: R.ERROR_REASON_MODEL_NOT_FOUND,
    408: R.ERROR_REASON_UPSTREAM_TIMEOUT,
    429: R.ERROR_REASON_RATE_LIMITED,
    500: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    502: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    503: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    504: R.ERROR_REASON_UPSTREAM_TIMEOUT,
}
# Caller-facing messages: the shared ones (only the caller's own mistakes forward Google's words), and a fixed one
# for an upstream error the tables above do not know, which the provider logs and reports as INTERNAL.
_MESSAGES = {**UPSTREAM_MESSAGES, R.ERROR_REASON_INTERNAL: "The gateway failed to serve '{model}'."}


def error(reason: pb.ErrorReason.ValueType, model: str, upstream_message: str = "") -> GatewayError:
    """The GatewayError for `reason`; `model` is the public name."""
    return upstream_error(
        reason, model=model, provider=PROVIDER, templates=_MESSAGES, upstream_message=upstream_message
    )


def error_reason(code: object, status: object, details: object) -> pb.ErrorReason.ValueType | None:
    """The reason for an upstream error (HTTP status, google.rpc status name, error body); None if unknown."""
    if _api_key_rejected(details):  # Google answers a bad key with 400 INVALID_ARGUMENT
        return R.ERROR_REASON_UPSTREAM_AUTH
    if isinstance(status, str) and status in REASON_BY_STATUS:
        return REASON_BY_STATUS[status]
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    if code in REASON_BY_CODE:
        return REASON_BY_CODE[code]
    return R.ERROR_REASON_UPSTREAM_UNAVAILABLE if 500 <= code < 600 else None


def _api_key_rejected(details: object) -> bool:
    """Whether an error body carries ErrorInfo.reason API_KEY_INVALID (or another API_KEY_* reason)."""
    error = details.get("error", details) if isinstance(details, Mapping) else None
    entries = error.get("details") if isinstance(error, Mapping) else None
    if not isinstance(entries, list):
        return False
    return any(isinstance(entry, Mapping) and str(entry.get("reason", "")).startswith("API_KEY_") for entry in entries)


def invalid(message: str, field: str) -> GatewayError:
    """A 400 INVALID_REQUEST naming `field`, the path of the offending field of CompletionParams (proto names), for
    a request refused before anything is sent."""
    return GatewayError(R.ERROR_REASON_INVALID_REQUEST, message, field=field, provider=PROVIDER)
