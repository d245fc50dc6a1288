"""The OpenAI dialect's error tables: proto field paths to OpenAI params, and the core's errors as OpenAI's."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from bridge.core_errors import ERROR_DOMAIN
from bridge.dialect import Refusal, Refused
from bridge.openai.errors import PARAM_OF_FIELD, OpenAIError, from_rpc_error, param_of, refusal_error
from modelmax.v1.completion_pb2 import ErrorReason


def indexed(path: str) -> str:
    return path.replace("[i]", "[3]").replace("[j]", "[1]")


@pytest.mark.parametrize(("field", "param"), PARAM_OF_FIELD, ids=[field for field, _ in PARAM_OF_FIELD])
def test_every_row_maps_the_field_and_the_paths_below_it(field: str, param: str) -> None:
    assert param_of(indexed(field)) == indexed(param)
    assert param_of(indexed(field) + ".url") == indexed(param) + ".url"
    assert param_of(indexed(field) + "[0]") == indexed(param) + "[0]"


@pytest.mark.parametrize(
    "field",
    ["model", "messages", "messages[2].tool_call_id", "messages[0].role", "messages[1].tool_calls[0].id",
     "temperature", "max_tokens", "top_logprobs", "tools", "tools[0]", "tool_choice", "response_format.type",
     "stop_sequences_extra", "tools[0].names"],
)  # fmt: skip
def test_every_other_path_is_the_same(field: str) -> None:
    assert param_of(field) == field


def rpc_error(code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> grpc.aio.AioRpcError:
    """A failed call exactly as the core's GatewayError.to_status() sends it."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message, debug_error_string=None)


@pytest.mark.parametrize(
    ("message", "field", "expected_message", "param"),
    [
        ("'stop_sequences' accepts at most 4 sequences, got 5", "stop_sequences",
         "'stop' accepts at most 4 sequences, got 5", "stop"),
        ("Invalid 'tools[0].name': string too long. Expected a string with maximum length 64, but got a string "
         "with length 70 instead.", "tools[0].name",
         "Invalid 'tools[0].function.name': string too long. Expected a string with maximum length 64, but got a "
         "string with length 70 instead.", "tools[0].function.name"),
        ("Invalid 'choice_count': 9 is greater than the maximum of 8.", "choice_count",
         "Invalid 'n': 9 is greater than the maximum of 8.", "n"),
        ("Invalid 'messages[2].tool_call_id': no earlier assistant message made that call.",
         "messages[2].tool_call_id", "Invalid 'messages[2].tool_call_id': no earlier assistant message made that call.",
         "messages[2].tool_call_id"),
        ("'temperature' must be between 0 and 2.", "", "'temperature' must be between 0 and 2.", None),
    ],
)  # fmt: skip
def test_the_core_field_becomes_the_param_in_the_message_too(
    message: str, field: str, expected_message: str, param: str | None
) -> None:
    metadata = {"field": field} if field else {}
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", message, **metadata)
    )
    assert error.body() == {
        "error": {"message": expected_message, "type": "invalid_request_error", "param": param, "code": None}
    }
    assert error.status == 400


def test_retry_after_and_channel_failures() -> None:
    limited = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_RATE_LIMITED", "slow down", retry_after="2.2")
    assert from_rpc_error(limited).headers() == {"retry-after": "3", "retry-after-ms": "2200"}
    unreachable = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down", debug_error_string=None
    )
    assert from_rpc_error(unreachable).body()["error"]["code"] == "core_unavailable"


@pytest.mark.parametrize("refusal", list(Refusal), ids=[refusal.name for refusal in Refusal])
def test_every_refusal_has_openai_words(refusal: Refusal) -> None:
    error = refusal_error(
        Refused(refusal, {"limit": "10", "method": "GET", "path": "/x", "header": "Authorization", "part": "body"})
    )
    assert isinstance(error, OpenAIError) and 400 <= error.status < 600
    assert error.message and "{" not in error.message
    assert error.type in ("invalid_request_error", "api_error")


REASONS = [reason for reason in ErrorReason.values() if reason != ErrorReason.ERROR_REASON_UNSPECIFIED]


@pytest.mark.parametrize("reason", REASONS, ids=[ErrorReason.Name(reason) for reason in REASONS])
def test_every_reason_keeps_the_core_message(reason: ErrorReason.ValueType) -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, ErrorReason.Name(reason), "what happened"))
    assert error.message == "what happened" and error.param is None
