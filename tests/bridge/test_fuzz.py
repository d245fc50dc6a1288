"""Fuzzing the request path that untrusted bytes take: parse, translate to proto, the core's checks.

Whatever the body, the outcome is a ChatRequest the core accepts, an OpenAIError with a 4xx status, or a
GatewayError with INVALID_REQUEST: never another exception (which would be a 500), and never a hang.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import OpenAIError
from bridge.openai_request import parse_chat_request
from bridge.translate import to_params
from modelmax.v1.completion_pb2 import ErrorReason
from services.errors import GatewayError
from services.validation import check_params

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard", "", None])
CONTENT = (
    st.text(max_size=30)
    | st.none()
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}),
        max_size=3,
    )
    | JSON
)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT}) | JSON
VALID_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()})
BOUNDARY = st.integers(2**31 - 3, 2**31 + 3) | st.integers(-(2**31) - 3, -(2**31) + 3)  # int32's edges
NUMBER = (
    st.none() | BOUNDARY | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.booleans()
)  # fmt: skip
# Mostly well-formed requests with hostile values, so the search reaches deep into the checks.
REQUEST = st.fixed_dictionaries(
    {
        "model": st.text(min_size=1, max_size=20) | st.text(min_size=1, max_size=20) | JSON,
        "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=3) | st.lists(MESSAGE, max_size=4) | JSON,
    },
    optional={
        "temperature": NUMBER, "top_p": NUMBER, "max_tokens": NUMBER, "max_completion_tokens": NUMBER,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | JSON, "stream": JSON,
        "stream_options": st.fixed_dictionaries({"include_usage": JSON}) | JSON, "n": NUMBER, "tools": JSON,
        "response_format": JSON, "user": JSON,
    },
)  # fmt: skip


# A valid shape whose numbers and stops vary: reaches the range checks and the proto's int32 fields.
DEEP = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=2)},
    optional={"temperature": NUMBER, "top_p": NUMBER, "max_tokens": NUMBER, "max_completion_tokens": NUMBER,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6), "stream": st.booleans()},
)  # fmt: skip


def outcome(body: bytes) -> str:
    try:
        params = to_params(parse_chat_request(body))
        check_params(params)
    except OpenAIError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert exc.message
        return "refused by the bridge"
    except GatewayError as exc:
        assert exc.reason == ErrorReason.ERROR_REASON_INVALID_REQUEST
        return "refused by the core"
    return "accepted"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REQUEST)
def test_structured_requests(request: dict[str, object]) -> None:
    outcome(json.dumps(request).encode())


@settings(max_examples=600, deadline=None)
@given(DEEP)
def test_valid_shapes_with_hostile_values(request: dict[str, object]) -> None:
    outcome(json.dumps(request).encode())


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json(document: object) -> None:
    outcome(json.dumps(document).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(body: bytes) -> None:
    outcome(body)


def test_deep_nesting_is_refused_not_a_crash() -> None:
    assert outcome(b"[" * 100_000 + b"]" * 100_000) == "refused by the bridge"
