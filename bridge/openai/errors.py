"""OpenAIError, and the OpenAI dialect's only tables: the core's errors (gRPC status + ErrorInfo) to HTTP and
OpenAI's type/code, proto field paths to OpenAI `param`s, and the wording of the pipeline's refusals."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import grpc
from starlette.responses import Response

from bridge.auth import bearer
from bridge.core_errors import NO_LIMITS, error_info, rate_limit_headers, retry_delay
from bridge.dialect import Dialect, DialectError, Refusal, Refused
from modelmax.v1.completion_pb2 import ErrorReason

# ErrorReason -> (HTTP status, OpenAI error type, OpenAI error code). Covers every reason (a test checks).
# UPSTREAM_AUTH is the gateway's own credentials failing upstream: a server error, never a 401 to our client.
HTTP_ERROR: dict[int, tuple[int, str, str | None]] = {
    ErrorReason.ERROR_REASON_INVALID_REQUEST: (400, "invalid_request_error", None),
    ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorReason.ERROR_REASON_MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorReason.ERROR_REASON_RATE_LIMITED: (429, "rate_limit_error", "rate_limit_exceeded"),
    ErrorReason.ERROR_REASON_UPSTREAM_TIMEOUT: (504, "api_error", "upstream_timeout"),
    ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE: (503, "api_error", "upstream_unavailable"),
    ErrorReason.ERROR_REASON_UPSTREAM_AUTH: (500, "api_error", None),
    ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL: (502, "api_error", "upstream_protocol_error"),
    ErrorReason.ERROR_REASON_INTERNAL: (500, "api_error", "internal_error"),
    ErrorReason.ERROR_REASON_OVERLOADED: (503, "api_error", "overloaded"),
    ErrorReason.ERROR_REASON_UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    ErrorReason.ERROR_REASON_PERMISSION_DENIED: (403, "invalid_request_error", "permission_denied"),
    ErrorReason.ERROR_REASON_BUDGET_EXHAUSTED: (429, "insufficient_quota", "insufficient_quota"),
    ErrorReason.ERROR_REASON_POLICY_UNAVAILABLE: (503, "api_error", "policy_unavailable"),
    ErrorReason.ERROR_REASON_KEY_NOT_FOUND: (404, "invalid_request_error", "key_not_found"),
}
# Reasons a retry cannot cure: told to OpenAI's SDKs with `x-should-retry: false`, which they obey before the
# status (they retry every 429 otherwise, and an exhausted budget stays exhausted).
_NO_RETRY = frozenset({ErrorReason.ERROR_REASON_BUDGET_EXHAUSTED})

# gRPC failures that carry no ErrorInfo: they come from the channel itself, not from the core's logic.
_BY_GRPC_CODE: dict[grpc.StatusCode, tuple[int, str, str | None, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "api_error", "core_unavailable", "The gateway core is unavailable."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "api_error", "timeout", "The request timed out."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "invalid_request_error", None, "The request is too large."),
}
_INTERNAL = (500, "api_error", "internal_error", "The gateway failed to serve this request.")

# The core names a field by its CompletionParams path; OpenAI clients know it by their request's path. `[i]` and
# `[j]` stand for any index. A row matches a whole path or its start ("messages[0].parts[1].image" becomes
# "messages[0].content[1].image"); a path that no row matches is the same in both.
PARAM_OF_FIELD: tuple[tuple[str, str], ...] = (
    ("stop_sequences", "stop"),
    ("choice_count", "n"),
    ("tools[i].name", "tools[i].function.name"),
    ("tools[i].parameters", "tools[i].function.parameters"),
    ("messages[i].parts[j]", "messages[i].content[j]"),
    ("messages[i].tool_calls[j].name", "messages[i].tool_calls[j].function.name"),
    ("response_format.schema", "response_format.json_schema.schema"),
    ("response_format.name", "response_format.json_schema.name"),
)


def _field_pattern(field: str) -> re.Pattern[str]:
    pattern = re.escape(field).replace(r"\[i\]", r"\[(?P<i>\d+)\]").replace(r"\[j\]", r"\[(?P<j>\d+)\]")
    return re.compile(pattern + r"(?=$|[.\[])")


_PARAM_PATTERNS = tuple((_field_pattern(field), param) for field, param in PARAM_OF_FIELD)

# The pipeline's refusals in OpenAI's words: (HTTP status, message, type, code). The message may use the
# refusal's details ({limit}, {method}, {path}).
_REFUSALS: dict[Refusal, tuple[int, str, str, str | None]] = {
    Refusal.MISSING_KEY: (
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
        "missing_api_key",
    ),
    Refusal.INVALID_KEY: (401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    Refusal.DUPLICATE_HEADER: (
        400,
        "The {header} header was sent more than once; send it once.",
        "invalid_request_error",
        "duplicate_header",
    ),
    Refusal.OVERLOADED: (503, "The gateway is overloaded; retry shortly.", "api_error", "overloaded"),
    Refusal.UNSUPPORTED_MEDIA_TYPE: (
        415,
        "Unsupported content type: send the request body as application/json.",
        "invalid_request_error",
        "unsupported_media_type",
    ),
    Refusal.BODY_TOO_LARGE: (
        413,
        "The request body exceeds the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    ),
    Refusal.HEADERS_TOO_LARGE: (
        431,
        "The request's header block exceeds the limit of {limit} bytes.",
        "invalid_request_error",
        "request_header_fields_too_large",
    ),
    Refusal.REQUEST_TIMEOUT: (
        408,
        "The request {part} did not arrive in time; the connection is closed.",
        "invalid_request_error",
        "request_timeout",
    ),
    Refusal.BODY_INCOMPLETE: (
        400,
        "The request body ended before its Content-Length; the connection is closed.",
        "invalid_request_error",
        "incomplete_body",
    ),
    Refusal.NOT_FOUND: (404, "Unknown request URL: {method} {path}.", "invalid_request_error", None),
    Refusal.METHOD_NOT_ALLOWED: (405, "Method {method} is not allowed for {path}.", "invalid_request_error", None),
    Refusal.INTERNAL: (500, "The gateway failed to serve this request.", "api_error", "internal_error"),
}


class OpenAIError(DialectError):
    """An error as OpenAI clients expect it: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        *,
        retry: bool = True,
        limits: Mapping[str, str] = NO_LIMITS,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds; sent as Retry-After so OpenAI SDKs wait that long
        self.retry = retry  # False: `x-should-retry: false`, so OpenAI SDKs do not retry at all
        self.limits = limits  # the key's x-ratelimit-* headers, when the core sent them

    def headers(self) -> dict[str, str]:
        headers = {**self.limits} if self.retry else {**self.limits, "x-should-retry": "false"}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(0, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(0, math.ceil(self.retry_after * 1000)))  # what OpenAI SDKs read first
        return headers

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def response(self, headers: Mapping[str, str]) -> Response:
        return Response(
            self.body_bytes(), status_code=self.status, media_type="application/json",
            headers={**headers, **self.headers()},
        )  # fmt: skip


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def refusal_error(refused: Refused) -> OpenAIError:
    """A refusal of the pipeline, in OpenAI's words."""
    status, message, kind, code = _REFUSALS[refused.refusal]
    return OpenAIError(status, message.format_map(refused.details) if refused.details else message, kind, None, code)


DIALECT = Dialect("openai", refusal_error, bearer)


def param_of(field: str) -> str:
    """The OpenAI `param` of a CompletionParams field path."""
    for pattern, param in _PARAM_PATTERNS:
        match = pattern.match(field)
        if match is not None:
            indexes = match.groupdict()
            for name, index in indexes.items():
                param = param.replace(f"[{name}]", f"[{index}]")
            return param + field[match.end() :]
    return field


def from_rpc_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """Map a failed core call to an OpenAIError: by ErrorInfo.reason when the core sent one, else by status code.

    The core names the offending field by its proto path; the error names it as the OpenAI request did, both in
    `param` and where the message quotes it.
    """
    info = error_info(exc)
    if info is not None and info.reason in ErrorReason.keys():
        reason = ErrorReason.Value(info.reason)
        status, kind, code = HTTP_ERROR[reason]
        message = exc.details() or kind
        field = info.metadata.get("field", "")
        param = param_of(field) if field else None
        if param is not None and param != field:
            message = message.replace(f"'{field}'", f"'{param}'")
        if status >= 500:
            param = None  # the message may quote the request's field (a strict schema the model broke); OpenAI's
            # `param` names only what the caller got wrong
        retry_after = retry_delay(info)
        limits = rate_limit_headers(exc.initial_metadata())
        return OpenAIError(
            status, message, kind, param, code, retry_after, retry=reason not in _NO_RETRY, limits=limits
        )
    status, kind, code, message = _BY_GRPC_CODE.get(exc.code(), _INTERNAL)
    return OpenAIError(status, message, kind, None, code)
