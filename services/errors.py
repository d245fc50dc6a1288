"""GatewayError, the one error type the core reports, and its single mapping to google.rpc.Status (AIP-193).

    Exception
    ├── GatewayError(reason)      a failure the caller should see; `reason` picks the gRPC code (GRPC_CODE)
    │     ├── the caller's        INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED, MODEL_NOT_FOUND (`field` names the
    │     │                       CompletionParams field by its proto path)
    │     ├── the upstream's      RATE_LIMITED, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE, UPSTREAM_AUTH,
    │     │                       UPSTREAM_PROTOCOL (raised by a provider: `provider` is set)
    │     ├── the key's           UNAUTHENTICATED, PERMISSION_DENIED, BUDGET_EXHAUSTED (services/policy/gate.py)
    │     └── the gateway's       OVERLOADED, POLICY_UNAVAILABLE, INTERNAL
    └── anything else             a bug: the servicer logs it once and answers INTERNAL

Providers translate their SDK's errors into GatewayError at their own boundary (each provider's `errors.py`); the
servicer turns a GatewayError into a status once; each dialect of the bridge maps the status once more.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelmax.v1.completion_pb2 import ErrorReason

ERROR_DOMAIN = "modelmax.v1"

# The only table from ErrorReason to a gRPC status code. The bridge maps the reason back once per dialect
# (bridge/openai/errors.py).
GRPC_CODE: dict[ErrorReason.ValueType, grpc.StatusCode] = {
    ErrorReason.ERROR_REASON_INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorReason.ERROR_REASON_MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.ERROR_REASON_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.ERROR_REASON_UPSTREAM_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.ERROR_REASON_UPSTREAM_AUTH: grpc.StatusCode.INTERNAL,
    ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL: grpc.StatusCode.INTERNAL,
    ErrorReason.ERROR_REASON_INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorReason.ERROR_REASON_OVERLOADED: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.ERROR_REASON_UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorReason.ERROR_REASON_PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorReason.ERROR_REASON_BUDGET_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.ERROR_REASON_POLICY_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.ERROR_REASON_KEY_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
}


class GatewayError(Exception):
    """A failure the caller should see. Any other exception in the core is a bug and becomes INTERNAL."""

    def __init__(
        self,
        reason: ErrorReason.ValueType,
        message: str,
        *,
        field: str = "",
        provider: str = "",
        retry_after: float | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field  # the offending CompletionParams field, as a proto path ("tools[0].name"); "" if none
        self.provider = provider
        self.retry_after = retry_after  # seconds, when the upstream (or a cooldown) said when to come back
        self.headers = headers  # initial metadata for the caller (a key's x-ratelimit-* values); usually none

    def to_status(self) -> grpc.Status:
        """This error as a grpc.Status carrying ErrorInfo{reason, domain, metadata}."""
        metadata = {k: v for k, v in (("field", self.field), ("provider", self.provider)) if v}
        if self.retry_after is not None:
            metadata["retry_after"] = f"{self.retry_after:.3f}"
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(reason=ErrorReason.Name(self.reason), domain=ERROR_DOMAIN, metadata=metadata)
        )
        code = GRPC_CODE[self.reason]
        return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=self.message, details=[detail]))


# The caller-facing messages of upstream failures, as upstream_error's `templates`, shared by the providers that
# speak of "the upstream" (Bedrock's name AWS Bedrock and are its own). Only the caller's own mistakes
# (INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED) forward the upstream's words; the rest would leak upstream details, and
# a credentials failure is the gateway's, never the caller's. Read-only, since providers share it: one that needs
# another entry extends it in a table of its own (`{**UPSTREAM_MESSAGES, ...}`).
UPSTREAM_MESSAGES: Mapping[ErrorReason.ValueType, str] = MappingProxyType(
    {
        ErrorReason.ERROR_REASON_UPSTREAM_AUTH: "The upstream serving '{model}' rejected the gateway's credentials.",
        ErrorReason.ERROR_REASON_MODEL_NOT_FOUND: "The upstream serving '{model}' does not know its model.",
        ErrorReason.ERROR_REASON_RATE_LIMITED: "The upstream serving '{model}' is rate limiting requests; retry later.",
        ErrorReason.ERROR_REASON_UPSTREAM_TIMEOUT: "The upstream serving '{model}' did not answer in time.",
        ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE: "The upstream serving '{model}' is unavailable.",
        ErrorReason.ERROR_REASON_UPSTREAM_PROTOCOL: (
            "The upstream serving '{model}' sent an answer the gateway cannot use."
        ),
    }
)
UPSTREAM_MESSAGE_LIMIT = 500  # characters of an upstream's own error message that reach the caller


def upstream_error(
    reason: ErrorReason.ValueType,
    *,
    model: str,
    provider: str,
    templates: Mapping[ErrorReason.ValueType, str],
    upstream_message: str = "",
    refused: str = "The upstream serving '{model}' refused the request.",
) -> GatewayError:
    """A provider's failure as the caller sees it, the same way for every provider.

    A reason with a template (rate limits, outages, our own credentials...) gets that fixed message, so no upstream
    detail or account information leaks; the others are the caller's own mistakes and carry the upstream's words,
    cut to UPSTREAM_MESSAGE_LIMIT. `model` is the public name.
    """
    template = templates.get(reason)
    if template is not None:
        message = template.format(model=model)
    else:
        message = upstream_message[:UPSTREAM_MESSAGE_LIMIT] or refused.format(model=model)
    field = "messages" if reason == ErrorReason.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED else ""
    return GatewayError(reason, message, field=field, provider=provider)


def invalid_request(message: str, *, field: str = "") -> GatewayError:
    """Shorthand for the most common error: a bad field of CompletionParams, named by its proto path."""
    return GatewayError(ErrorReason.ERROR_REASON_INVALID_REQUEST, message, field=field)


SHOWN_CHARS = 64  # characters of a caller's string an error message quotes; longer ones are cut (see `shown`)


def shown(text: str) -> str:
    """A caller's string as an error message may quote it: whole up to SHOWN_CHARS characters, else cut with "…".

    A status message travels in gRPC metadata, whose size is bounded: an echoed 5 KB string broke the status itself.
    """
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}…"
