"""Both error tables cover every ErrorReason, and they agree on which reasons are the caller's fault."""

from __future__ import annotations

import pytest

from bridge.openai.errors import HTTP_ERROR
from modelmax.v1.completion_pb2 import ErrorReason
from services.errors import GRPC_CODE

REASONS = [value for value in ErrorReason.values() if value != ErrorReason.ERROR_REASON_UNSPECIFIED]


@pytest.mark.parametrize("reason", REASONS, ids=[ErrorReason.Name(r) for r in REASONS])
def test_every_reason_maps_to_grpc_and_http(reason: int) -> None:
    assert reason in GRPC_CODE
    status, kind, _ = HTTP_ERROR[reason]
    client_fault = status < 500
    assert client_fault == (kind in ("invalid_request_error", "rate_limit_error", "insufficient_quota"))


def test_upstream_auth_never_reaches_the_client_as_401_or_403() -> None:
    assert HTTP_ERROR[ErrorReason.ERROR_REASON_UPSTREAM_AUTH][0] >= 500
