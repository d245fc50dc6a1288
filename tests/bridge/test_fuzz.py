"""Fuzzing the request path that untrusted bytes take: parse, translate to proto, the core's checks.

Whatever the body, the outcome is a ChatRequest the core accepts, an OpenAIError with a 4xx status, or a
GatewayError with INVALID_REQUEST: never another exception (which would be a 500), and never a hang.
"""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.openai.chat.request import parse_chat_request
from bridge.openai.chat.translate import to_params
from bridge.openai.errors import OpenAIError
from modelmax.v1.completion_pb2 import ErrorReason
from services.completion.validation import check_params
from services.errors import GatewayError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard", "", None])
URL = (
    st.sampled_from(["https://example.com/a.png", "http://x", "ftp://x", "", "data:image/png;base64,iVBORw0KGgo=",
                     "data:image/png;base64,", "data:image/svg+xml;base64,AAAA", "data:image/gif,abc"])
    | st.builds(lambda media, payload: f"data:{media};base64,{payload}",
                st.sampled_from(["image/png", "image/jpeg", "image/webp", "IMAGE/GIF", "text/plain"]),
                st.text(max_size=12))
    | JSON
)  # fmt: skip
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "refusal", "input_audio", "file"]), "text": st.text(max_size=10)},
    optional={"image_url": st.fixed_dictionaries({"url": URL}, optional={"detail": JSON}) | JSON, "refusal": JSON},
)
CONTENT = st.text(max_size=30) | st.none() | st.lists(PART, max_size=3) | JSON
TOOL_CALL = st.fixed_dictionaries(
    {"id": st.text(max_size=5) | JSON, "type": st.sampled_from(["function", "custom"]),
     "function": st.fixed_dictionaries({"name": st.text(max_size=5) | JSON, "arguments": st.text(max_size=10) | JSON})
     | JSON},
) | JSON  # fmt: skip
MESSAGE = (
    st.fixed_dictionaries(
        {"role": ROLE, "content": CONTENT},
        optional={"tool_calls": st.lists(TOOL_CALL, max_size=2) | JSON, "tool_call_id": st.text(max_size=5) | JSON},
    )
    | JSON
)
VALID_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()})
BOUNDARY = st.integers(2**31 - 3, 2**31 + 3) | st.integers(-(2**31) - 3, -(2**31) + 3)  # int32's edges
BOUNDARY64 = st.integers(2**63 - 3, 2**63 + 3) | st.integers(-(2**63) - 3, -(2**63) + 3)  # int64's edges
NUMBER = (
    st.none() | BOUNDARY | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.booleans()
)  # fmt: skip
TOOL = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "custom"]),
         "function": st.fixed_dictionaries({"name": st.text(max_size=70) | JSON},
                                           optional={"description": JSON, "parameters": JSON, "strict": JSON})},
    )
    | JSON
)  # fmt: skip
TOOL_CHOICE = (
    st.sampled_from(["none", "auto", "required", "any"])
    | st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": JSON})})
    | JSON
)
RESPONSE_FORMAT = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
        optional={"json_schema": st.fixed_dictionaries({"name": st.text(max_size=70) | JSON},
                                                       optional={"schema": JSON, "strict": JSON})},
    )
    | JSON
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
        "stream_options": st.fixed_dictionaries({"include_usage": JSON}) | JSON, "n": NUMBER,
        "tools": st.lists(TOOL, max_size=3) | JSON, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": JSON,
        "response_format": RESPONSE_FORMAT, "user": JSON, "seed": NUMBER | BOUNDARY64,
        "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "logprobs": JSON, "top_logprobs": NUMBER,
        "reasoning_effort": st.sampled_from(["low", "xhigh", "max"]) | JSON, "logit_bias": JSON, "modalities": JSON,
        "functions": JSON, "verbosity": JSON,
    },
)  # fmt: skip


# A valid shape whose numbers and stops vary: reaches the range checks and the proto's int32 fields.
DEEP = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(VALID_MESSAGE, min_size=1, max_size=2)},
    optional={"temperature": NUMBER, "top_p": NUMBER, "max_tokens": NUMBER, "max_completion_tokens": NUMBER,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6), "stream": st.booleans()},
)  # fmt: skip


NAME = st.text(min_size=1, max_size=70)
NUMERIC = st.none() | BOUNDARY | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
IMAGE_URL = st.builds(
    lambda media, data: f"data:{media};base64,{base64.b64encode(data).decode()}",
    st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp"]),
    st.binary(max_size=16),
) | st.just("https://example.com/cat.png")
# Well-formed tools, tool calls, images and structured output whose names, ids, schemas and arguments vary: reaches
# the core's checks of what the bridge accepted.
TOOLED = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "messages": st.tuples(
            st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)})
                | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
                    {"url": IMAGE_URL}, optional={"detail": st.sampled_from(["auto", "low", "high"])})}),
                min_size=1, max_size=3)}),
            st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | st.text(max_size=5),
                                   "tool_calls": st.lists(st.fixed_dictionaries({
                                       "id": st.text(min_size=1, max_size=5), "type": st.just("function"),
                                       "function": st.fixed_dictionaries({"name": NAME,
                                                                          "arguments": st.text(max_size=10)})}),
                                       max_size=2)}),
            st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.text(min_size=1, max_size=5),
                                   "content": st.text(max_size=5)}),
        ).map(list),
    },
    optional={
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": NAME}, optional={"description": st.text(max_size=5), "strict": st.booleans(),
                                      "parameters": st.dictionaries(st.text(max_size=5), JSON, max_size=3)})}),
            max_size=3),
        "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.builds(
            lambda name: {"type": "function", "function": {"name": name}}, NAME),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.builds(lambda name, schema, strict: {"type": "json_schema", "json_schema": {
            "name": name, "schema": schema, "strict": strict}}, NAME, st.dictionaries(st.text(max_size=5), JSON,
                                                                                       max_size=3), st.booleans())
        | st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
        "n": NUMERIC, "seed": st.integers(-(2**63), 2**63 - 1), "presence_penalty": NUMERIC,
        "frequency_penalty": NUMERIC, "top_logprobs": NUMERIC, "logprobs": st.booleans(), "user": st.text(max_size=5),
        "reasoning_effort": st.sampled_from(["none", "minimal", "low", "medium", "high", "xhigh"]),
    },
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TOOLED)
def test_tools_images_and_structured_output(request: dict[str, object]) -> None:
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
