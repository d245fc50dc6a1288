"""OpenAIError and the only table from the core's error reasons (gRPC status + ErrorInfo) to HTTP and OpenAI."""

from __future__ import annotations

import json
import math

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelmax.v1.completion_pb2 import ErrorReason

ERROR_DOMAIN = "modelmax.v1"

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
}

# gRPC failures that carry no ErrorInfo: they come from the channel itself, not from the core's logic.
_BY_GRPC_CODE: dict[grpc.StatusCode, tuple[int, str, str | None, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "api_error", "core_unavailable", "The gateway core is unavailable."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "api_error", "timeout", "The request timed out."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "invalid_request_error", None, "The request is too large."),
}


class OpenAIError(Exception):
    """An error as OpenAI clients expect it: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds; sent as Retry-After so OpenAI SDKs wait that long

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(0, math.ceil(self.retry_after)))}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


def overloaded(retry_after: float = 1.0) -> OpenAIError:
    return OpenAIError(503, "The gateway is overloaded; retry shortly.", "api_error", None, "overloaded", retry_after)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """Map a failed core call to an OpenAIError: by ErrorInfo.reason when the core sent one, else by status code."""
    info = _error_info(exc)
    if info is not None and info.reason in ErrorReason.keys():
        status, kind, code = HTTP_ERROR[ErrorReason.Value(info.reason)]
        retry_after = _seconds(info.metadata.get("retry_after"))
        return OpenAIError(status, exc.details() or kind, kind, info.metadata.get("param") or None, code, retry_after)
    status, kind, code, message = _BY_GRPC_CODE.get(
        exc.code(), (500, "api_error", "internal_error", "The gateway failed to serve this request.")
    )
    return OpenAIError(status, message, kind, None, code)


def _seconds(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(exc)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info
    return None
