"""Bedrock's failures as GatewayErrors, without the SDK: the one table from AWS error codes (and bare HTTP statuses)
to ErrorReasons, the messages callers see, and the INVALID_REQUEST for a request Converse cannot take.

Every other module of this package raises through here, so that every error names the same provider. Which
botocore exception carries which code is adapter.py's business, the only module that knows the SDK.
"""

from __future__ import annotations

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError, upstream_error

PROVIDER = "bedrock"
R = pb.ErrorReason

# The one table of AWS error codes. HTTP errors carry PascalCase codes; exception frames inside a stream carry the
# same names in lowerCamel (`throttlingException`), normalised before the lookup.
_REASON_BY_CODE = {
    "ValidationException": R.ERROR_REASON_INVALID_REQUEST,
    "ThrottlingException": R.ERROR_REASON_RATE_LIMITED,
    "ResourceNotFoundException": R.ERROR_REASON_MODEL_NOT_FOUND,
    # Our own credentials: the caller can do nothing about them, so never a 401 (or 403) to the caller.
    "AccessDeniedException": R.ERROR_REASON_UPSTREAM_AUTH,
    "UnrecognizedClientException": R.ERROR_REASON_UPSTREAM_AUTH,
    "ExpiredTokenException": R.ERROR_REASON_UPSTREAM_AUTH,
    "InvalidSignatureException": R.ERROR_REASON_UPSTREAM_AUTH,  # a wrong secret key
    # STS codes, when the credential chain's own call (web identity / IRSA, assumed roles) fails.
    "AccessDenied": R.ERROR_REASON_UPSTREAM_AUTH,
    "ExpiredToken": R.ERROR_REASON_UPSTREAM_AUTH,
    "InvalidIdentityToken": R.ERROR_REASON_UPSTREAM_AUTH,
    "ModelNotReadyException": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "ServiceUnavailableException": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "InternalServerException": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "ModelStreamErrorException": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "ModelErrorException": R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    "ModelTimeoutException": R.ERROR_REASON_UPSTREAM_TIMEOUT,
}
# When a response names no error type at all (a proxy or load balancer in front of the endpoint), botocore's code is
# the bare HTTP status; these statuses still say what happened.
_REASON_BY_STATUS = {
    429: R.ERROR_REASON_RATE_LIMITED,
    500: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    502: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    503: R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
    504: R.ERROR_REASON_UPSTREAM_TIMEOUT,
}
# Bedrock reports an over-long prompt only as a ValidationException whose text says so; there is no structured
# field. The exact live texts are fixtures in tests/services/test_bedrock.py (TOO_LONG_MESSAGES).
_CONTEXT_TOO_LONG = ("input is too long for requested model", "prompt is too long")
# Caller-facing messages. Only the caller's own mistakes (INVALID_REQUEST, CONTEXT_LENGTH_EXCEEDED) forward AWS's
# words; the rest would leak account details, and an auth failure is the gateway's, never the caller's. They name
# AWS Bedrock, so they are Bedrock's own rather than services.errors.UPSTREAM_MESSAGES.
_MESSAGES = {
    R.ERROR_REASON_UPSTREAM_AUTH: "AWS Bedrock rejected the gateway's credentials for '{model}'.",
    R.ERROR_REASON_MODEL_NOT_FOUND: "AWS Bedrock does not know the model configured for '{model}'.",
    R.ERROR_REASON_RATE_LIMITED: "AWS Bedrock is throttling requests for '{model}'; retry later.",
    R.ERROR_REASON_UPSTREAM_TIMEOUT: "AWS Bedrock did not answer in time for '{model}'.",
    R.ERROR_REASON_UPSTREAM_UNAVAILABLE: "AWS Bedrock is unavailable for '{model}'.",
    R.ERROR_REASON_UPSTREAM_PROTOCOL: "AWS Bedrock sent an answer for '{model}' that the gateway cannot use.",
    R.ERROR_REASON_INTERNAL: "AWS Bedrock failed with an error the gateway does not know, for '{model}'.",
}


def error(reason: pb.ErrorReason.ValueType, model: str, upstream_message: str = "") -> GatewayError:
    """The GatewayError for `reason`; `model` is the public name."""
    return upstream_error(
        reason, model=model, provider=PROVIDER, templates=_MESSAGES, upstream_message=upstream_message,
        refused="AWS Bedrock refused the request for '{model}'.",
    )  # fmt: skip


def error_reason(code: str, message: str) -> pb.ErrorReason.ValueType | None:
    """The reason for an AWS error (its code, PascalCase or lowerCamel or a bare HTTP status, and its message);
    None if unknown."""
    reason = _REASON_BY_CODE.get(code[:1].upper() + code[1:])
    if reason is None and code.isdigit():
        reason = _REASON_BY_STATUS.get(int(code))
    if reason == R.ERROR_REASON_INVALID_REQUEST and any(s in message.lower() for s in _CONTEXT_TOO_LONG):
        reason = R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED
    return reason


def invalid(message: str, field: str) -> GatewayError:
    """A 400 INVALID_REQUEST naming `field`, the path of the offending field of CompletionParams (proto names), for
    a request refused before anything is sent."""
    return GatewayError(R.ERROR_REASON_INVALID_REQUEST, message, field=field, provider=PROVIDER)
