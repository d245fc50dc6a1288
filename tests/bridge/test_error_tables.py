"""Every error table (gRPC, OpenAI, Anthropic) covers every ErrorReason, and they agree on which reasons are the
caller's fault."""

from __future__ import annotations

import pytest

from bridge.anthropic.errors import HTTP_ERROR as ANTHROPIC_HTTP_ERROR
from bridge.anthropic.errors import refusal_error as anthropic_refusal
from bridge.dialect import Refusal, Refused
from bridge.openai.errors import HTTP_ERROR
from modelmax.v1.completion_pb2 import ErrorReason
from services.errors import GRPC_CODE

ANTHROPIC_TYPES = {
    "invalid_request_error", "authentication_error", "billing_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
}  # fmt: skip
REASONS = [value for value in ErrorReason.values() if value != ErrorReason.ERROR_REASON_UNSPECIFIED]


@pytest.mark.parametrize("reason", REASONS, ids=[ErrorReason.Name(r) for r in REASONS])
def test_every_reason_maps_to_grpc_and_http(reason: int) -> None:
    assert reason in GRPC_CODE
    status, kind, _ = HTTP_ERROR[reason]
    client_fault = status < 500
    assert client_fault == (kind in ("invalid_request_error", "rate_limit_error", "insufficient_quota"))


def test_upstream_auth_never_reaches_the_client_as_401_or_403() -> None:
    assert HTTP_ERROR[ErrorReason.ERROR_REASON_UPSTREAM_AUTH][0] >= 500


@pytest.mark.parametrize("reason", REASONS, ids=[ErrorReason.Name(r) for r in REASONS])
def test_the_anthropic_table_covers_every_reason_and_agrees_on_fault(reason: int) -> None:
    status, kind = ANTHROPIC_HTTP_ERROR[reason]
    assert (status < 500) == (HTTP_ERROR[reason][0] < 500)
    assert kind in ANTHROPIC_TYPES  # the error types Anthropic's API documents
    if kind == "overloaded_error":
        assert status == 529  # what Anthropic's SDKs know as overloaded


def test_the_anthropic_dialect_words_every_refusal_of_the_pipeline() -> None:
    for refusal in Refusal:
        error = anthropic_refusal(Refused(refusal, {"limit": "1", "part": "body", "method": "GET", "path": "/x",
                                                    "header": "x-api-key"}))  # fmt: skip
        assert error.body()["type"] == "error" and error.type in ANTHROPIC_TYPES
        assert "{" not in error.message
