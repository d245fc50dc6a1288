"""AnthropicError, and the Anthropic dialect's only tables: the core's errors (gRPC status + ErrorInfo) to HTTP and
Anthropic's error types, proto field paths to the Messages request's paths, the x-ratelimit-* values as Anthropic's
rate-limit headers, and the wording of the pipeline's refusals.

Anthropic's SDKs pick their exception class, and whether to retry, from the HTTP status alone (429 and >= 500
retry, 529 is `overloaded_error`), so every status here is the one Anthropic's API would answer for that cause.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

import grpc
from starlette.responses import Response

from bridge.auth import api_key_or_bearer
from bridge.core_errors import error_info, rate_limit_headers, retry_delay
from bridge.dialect import Dialect, DialectError, Refusal, Refused
from modelmax.v1.completion_pb2 import ErrorReason

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# ErrorReason -> (HTTP status, Anthropic error type). Covers every reason (a test checks).
# An exhausted budget is Anthropic's billing_error (402): no SDK retries it, and it stays exhausted.
HTTP_ERROR: dict[int, tuple[int, str]] = {
    ErrorReason.ERROR_REASON_INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorReason.ERROR_REASON_MODEL_NOT_FOUND: (404, "not_found_error"),
    ErrorReason.ERROR_REASON_RATE_LIMITED: (429, "rate_limit_error"),
    ErrorReason.ERROR_REASON_UPSTREAM_TIMEOUT: (504, "api_error"),
    ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE: (503, "api_error"),
    ErrorReason.ERROR_REASON_UPSTREAM_AUTH: (500, "api_error"),
    ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL: (502, "api_error"),
    ErrorReason.ERROR_REASON_INTERNAL: (500, "api_error"),
    ErrorReason.ERROR_REASON_OVERLOADED: (529, "overloaded_error"),
    ErrorReason.ERROR_REASON_UNAUTHENTICATED: (401, "authentication_error"),
    ErrorReason.ERROR_REASON_PERMISSION_DENIED: (403, "permission_error"),
    ErrorReason.ERROR_REASON_BUDGET_EXHAUSTED: (402, "billing_error"),
    ErrorReason.ERROR_REASON_POLICY_UNAVAILABLE: (503, "api_error"),
    ErrorReason.ERROR_REASON_KEY_NOT_FOUND: (404, "not_found_error"),
}

# gRPC failures that carry no ErrorInfo: they come from the channel itself, not from the core's logic.
_BY_GRPC_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "api_error", "The gateway core is unavailable."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "api_error", "The request timed out."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "request_too_large", "The request is too large."),
}
_INTERNAL = (500, "api_error", "The gateway failed to serve this request.")

# The pipeline's refusals in Anthropic's words: (HTTP status, error type, message using the refusal's details).
_REFUSALS: dict[Refusal, tuple[int, str, str]] = {
    Refusal.MISSING_KEY: (401, "authentication_error", "x-api-key header is required"),
    Refusal.INVALID_KEY: (401, "authentication_error", "invalid x-api-key"),
    Refusal.DUPLICATE_HEADER: (400, "invalid_request_error", "{header}: the credential was sent more than once"),
    Refusal.OVERLOADED: (529, "overloaded_error", "Overloaded"),
    Refusal.UNSUPPORTED_MEDIA_TYPE: (
        415, "invalid_request_error", "Unsupported content type: send the request body as application/json."
    ),
    Refusal.BODY_TOO_LARGE: (413, "request_too_large", "Request exceeds the maximum size of {limit} bytes."),
    Refusal.HEADERS_TOO_LARGE: (431, "invalid_request_error", "The header block exceeds {limit} bytes."),
    Refusal.REQUEST_TIMEOUT: (408, "invalid_request_error", "The request {part} did not arrive in time."),
    Refusal.BODY_INCOMPLETE: (400, "invalid_request_error", "The request body ended before its Content-Length."),
    Refusal.NOT_FOUND: (404, "not_found_error", "Not found: {method} {path}"),
    Refusal.METHOD_NOT_ALLOWED: (405, "invalid_request_error", "Method {method} is not allowed for {path}."),
    Refusal.INTERNAL: (500, "api_error", "Internal server error"),
}  # fmt: skip

# The core's x-ratelimit-* values (durations such as "6m0s" until the window ends) as Anthropic's headers, whose
# resets are RFC 3339 times.
_ANTHROPIC_LIMIT = {
    "x-ratelimit-limit-requests": "anthropic-ratelimit-requests-limit",
    "x-ratelimit-remaining-requests": "anthropic-ratelimit-requests-remaining",
    "x-ratelimit-reset-requests": "anthropic-ratelimit-requests-reset",
    "x-ratelimit-limit-tokens": "anthropic-ratelimit-tokens-limit",
    "x-ratelimit-remaining-tokens": "anthropic-ratelimit-tokens-remaining",
    "x-ratelimit-reset-tokens": "anthropic-ratelimit-tokens-reset",
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class AnthropicError(DialectError):
    """An error as Anthropic's clients expect it: an HTTP status and {"type": "error", "error": {type, message}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 (Anthropic's field name)
        retry_after: float | None = None,
        limits: Mapping[str, str] = _NO_HEADERS,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.retry_after = retry_after  # seconds; sent as retry-after, which Anthropic's SDKs honour
        self.limits = limits  # the key's anthropic-ratelimit-* headers, when the core sent them

    def headers(self) -> dict[str, str]:
        headers = {**self.limits}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(0, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(0, math.ceil(self.retry_after * 1000)))
        return headers

    def body(self) -> dict[str, object]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":"), ensure_ascii=False).encode()

    def response(self, headers: Mapping[str, str]) -> Response:
        return Response(
            self.body_bytes(), status_code=self.status, media_type="application/json",
            headers={**headers, **self.headers()},
        )  # fmt: skip


def invalid(path: str, message: str) -> AnthropicError:
    """A 400 naming the request's field as Anthropic does: "messages.0.content: ..." (or just the message)."""
    return AnthropicError(400, f"{path}: {message}" if path else message)


def refusal_error(refused: Refused) -> AnthropicError:
    """A refusal of the pipeline, in Anthropic's words."""
    status, kind, message = _REFUSALS[refused.refusal]
    return AnthropicError(status, message.format_map(refused.details) if refused.details else message, kind)


DIALECT = Dialect("anthropic", refusal_error, api_key_or_bearer)


def from_rpc_error(exc: grpc.aio.AioRpcError, field_names: Mapping[str, str] | None = None) -> AnthropicError:
    """Map a failed core call to an AnthropicError: by ErrorInfo.reason when the core sent one, else by status code.

    The core names the offending field by its proto path; `field_names` (from the translation of this request)
    turns that into the Messages request's path, which the message then names instead.
    """
    info = error_info(exc)
    if info is not None and info.reason in ErrorReason.keys():
        status, kind = HTTP_ERROR[ErrorReason.Value(info.reason)]
        message = exc.details() or kind
        field = info.metadata.get("field", "")
        if field and status < 500:
            path = request_path(field, field_names or {})
            message = message.replace(f"'{field}'", f"'{path}'")
            message = f"{path}: {message}"
        limits = anthropic_limits(rate_limit_headers(exc.initial_metadata()))
        return AnthropicError(status, message, kind, retry_delay(info), limits)
    status, kind, message = _BY_GRPC_CODE.get(exc.code(), _INTERNAL)
    return AnthropicError(status, message, kind)


def request_path(field: str, field_names: Mapping[str, str]) -> str:
    """A CompletionParams field path as the Messages request names it: the longest known prefix is replaced
    ("messages[3].parts[1]" -> "messages.1.content.2"), and the rest written with dots ("[0]" -> ".0")."""
    best = ""
    for prefix in field_names:
        if len(prefix) > len(best) and (field == prefix or field.startswith((prefix + ".", prefix + "["))):
            best = prefix
    rest = field[len(best) :]
    head = field_names[best] if best else ""
    rest = re.sub(r"\[(\d+)\]", r".\1", rest)
    return (head + rest).lstrip(".") if head else rest.lstrip(".")


def anthropic_limits(limits: Mapping[str, str]) -> Mapping[str, str]:
    """x-ratelimit-* headers as anthropic-ratelimit-* ones; a reset becomes the RFC 3339 time it falls at."""
    if not limits:
        return _NO_HEADERS
    out: dict[str, str] = {}
    now = time.time()
    for name, value in limits.items():
        anthropic = _ANTHROPIC_LIMIT.get(name)
        if anthropic is None:
            continue
        if anthropic.endswith("-reset"):
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
            value = datetime.fromtimestamp(math.ceil(now + seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out[anthropic] = value
    return out
