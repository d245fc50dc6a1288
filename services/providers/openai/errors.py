"""The `openai` provider's failures as GatewayErrors, without I/O: the one table from an upstream's HTTP status and
error names to ErrorReasons, the fields of an OpenAI-shaped error body, and Retry-After.

The adapter raises through here, so that every error names the same provider and reads the same way.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

from modelmax.v1 import completion_pb2 as pb
from services.errors import UPSTREAM_MESSAGES, GatewayError, upstream_error

PROVIDER = "openai"
R = pb.ErrorReason
# The longest Retry-After passed on (seconds). A longer one (a year, 1e300) is an upstream's way of saying "not soon";
# as a number it only overflows whatever reads it: the dispatcher's sleep, the caller's own Retry-After header.
RETRY_AFTER_LIMIT = 3600.0

# The one table of upstream failures. The HTTP status decides; error.code / error.type names (OpenAI's, and the
# servers' own) refine a 400 and classify in-stream errors, which carry no status.
_REASON_BY_STATUS = {
    400: R.ERROR_REASON_INVALID_REQUEST,
    413: R.ERROR_REASON_INVALID_REQUEST,
    422: R.ERROR_REASON_INVALID_REQUEST,
    401: R.ERROR_REASON_UPSTREAM_AUTH,
    403: R.ERROR_REASON_UPSTREAM_AUTH,
    404: R.ERROR_REASON_MODEL_NOT_FOUND,
    408: R.ERROR_REASON_UPSTREAM_TIMEOUT,
    429: R.ERROR_REASON_RATE_LIMITED,
    504: R.ERROR_REASON_UPSTREAM_TIMEOUT,
}
_REASON_BY_NAME = {
    "context_length_exceeded": R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED,  # OpenAI error.code
    "exceed_context_size_error": R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED,  # llama.cpp server error.type
    "invalid_request_error": R.ERROR_REASON_INVALID_REQUEST,
    "model_not_found": R.ERROR_REASON_MODEL_NOT_FOUND,
    "rate_limit_exceeded": R.ERROR_REASON_RATE_LIMITED,
    "rate_limit_error": R.ERROR_REASON_RATE_LIMITED,
    "insufficient_quota": R.ERROR_REASON_RATE_LIMITED,
    "invalid_api_key": R.ERROR_REASON_UPSTREAM_AUTH,
    "authentication_error": R.ERROR_REASON_UPSTREAM_AUTH,
    "permission_error": R.ERROR_REASON_UPSTREAM_AUTH,
}


def error(reason: pb.ErrorReason.ValueType, model: str, upstream_message: str = "") -> GatewayError:
    """The GatewayError for `reason`; `model` is the public name."""
    return upstream_error(
        reason, model=model, provider=PROVIDER, templates=UPSTREAM_MESSAGES, upstream_message=upstream_message
    )


def error_reason(status: int | None, code: object, kind: object) -> pb.ErrorReason.ValueType:
    """Map an upstream failure (HTTP status, error.code, error.type) through the tables above."""
    if status is None and isinstance(code, int) and not isinstance(code, bool):
        status = code  # vLLM and llama.cpp put the HTTP status in error.code
    named = next((_REASON_BY_NAME[n] for n in (code, kind) if isinstance(n, str) and n in _REASON_BY_NAME), None)
    if status is None:
        reason = named or R.ERROR_REASON_UPSTREAM_UNAVAILABLE
    elif status in _REASON_BY_STATUS:
        reason = _REASON_BY_STATUS[status]
        if reason == R.ERROR_REASON_INVALID_REQUEST and named == R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED:
            reason = named
    else:
        reason = R.ERROR_REASON_UPSTREAM_UNAVAILABLE if status >= 500 else R.ERROR_REASON_UPSTREAM_PROTOCOL
    return reason


def body_fields(body: bytes) -> tuple[object, object, str]:
    """(error.code, error.type, error.message) of an HTTP error body; empty when it is not OpenAI's shape."""
    try:
        document = json.loads(body)
    except ValueError:
        return None, None, ""
    return error_fields(document) if isinstance(document, dict) else (None, None, "")


def error_fields(document: dict[str, Any]) -> tuple[object, object, str]:
    """(error.code, error.type, error.message) of an error document, an HTTP error body or an in-stream error."""
    error = document.get("error", document)  # {"error": {...}} (OpenAI, newer vLLM) or flat (older vLLM)
    if isinstance(error, str):
        return None, None, error
    if not isinstance(error, dict):
        return None, None, ""
    message = error.get("message")
    return error.get("code"), error.get("type"), message if isinstance(message, str) else ""


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date, within [0, RETRY_AFTER_LIMIT].

    None when it is neither, or not finite (`inf`, `nan`, `1e999`: float() reads them, no upstream means them)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_LIMIT)
