"""The core's request checks: each rule is a 400 (INVALID_REQUEST) naming its field's proto path; valid ones pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from modelmax.v1 import completion_pb2 as pb
from services.completion.validation import check_params, check_supported, requested_features
from services.errors import GatewayError

R = pb.Role
WEATHER = pb.Tool(name="get_weather", description="Weather in a city", parameters='{"type":"object"}')
CALL = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')
PNG = pb.Image(data=b"\x89PNG\r\n", media_type="image/png")


def user(text: str = "Hi") -> pb.Message:
    return pb.Message(role=R.ROLE_USER, content=text)


def tool_loop() -> list[pb.Message]:
    """A valid history: question, the assistant's tool call, the tool's answer."""
    return [
        user("Weather in Paris?"),
        pb.Message(role=R.ROLE_ASSISTANT, tool_calls=[CALL]),
        pb.Message(role=R.ROLE_TOOL, tool_call_id="call_1", content='{"temp":21}'),
    ]


def base(**fields: object) -> pb.CompletionParams:
    return pb.CompletionParams(**{"model": "m", "messages": [user()], **fields})  # type: ignore[arg-type]


def edited(change: Callable[[pb.CompletionParams], object]) -> pb.CompletionParams:
    params = base()
    change(params)
    return params


def image_part(**image: object) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(**image))  # type: ignore[arg-type]


VALID = {
    "plain": base(),
    "tool loop": base(messages=tool_loop(), tools=[WEATHER]),
    "tool loop without tools": base(messages=tool_loop()),
    "parallel answers": base(
        messages=[
            user(),
            pb.Message(role=R.ROLE_ASSISTANT, tool_calls=[CALL, pb.ToolCall(id="call_2", name="f", arguments="{}")]),
            pb.Message(role=R.ROLE_TOOL, tool_call_id="call_2", content="b"),
            pb.Message(role=R.ROLE_TOOL, tool_call_id="call_1", content="a"),
            pb.Message(role=R.ROLE_ASSISTANT, content="Done."),
        ]
    ),
    "named function": base(
        tools=[WEATHER], tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="get_weather")
    ),
    "tool_choice none without tools": base(tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE)),
    "tool without parameters": base(tools=[pb.Tool(name="now")]),
    "128 tools": base(tools=[pb.Tool(name=f"f{i}") for i in range(128)]),
    "image parts": base(
        messages=[pb.Message(role=R.ROLE_USER, parts=[pb.ContentPart(text="What is it?"), pb.ContentPart(image=PNG)])]
    ),
    "image url": base(messages=[pb.Message(role=R.ROLE_USER, parts=[image_part(url="https://example.com/a.png")])]),
    "json schema": base(
        response_format=pb.ResponseFormat(
            type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="answer-1", schema='{"type":"object"}'
        )
    ),
    "json object": base(response_format=pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT)),
    "n and penalties at their bounds": base(choice_count=8, presence_penalty=-2.0, frequency_penalty=2.0),
    "top_logprobs with logprobs": base(logprobs=True, top_logprobs=20),
    "every reasoning effort": base(reasoning_effort=pb.ReasoningEffort.REASONING_EFFORT_XHIGH),
    "seed and user": base(seed=-(2**63), user="end-user-42"),
    "model, user and stop at their length bounds": base(model="m" * 256, user="u" * 256, stop_sequences=["s" * 512]),
    "top_k and a reasoning budget at their bounds": base(top_k=1, reasoning_budget_tokens=1),
    "a failed tool and reasoning given back": base(
        messages=[
            user("Weather in Paris?"),
            pb.Message(
                role=R.ROLE_ASSISTANT,
                tool_calls=[CALL],
                reasoning=[pb.Reasoning(text="I need the weather.", signature="c2ln"), pb.Reasoning(redacted=b"\x00")],
            ),
            pb.Message(role=R.ROLE_TOOL, tool_call_id="call_1", content="city not found", is_error=True),
        ]
    ),
}


@pytest.mark.parametrize("params", VALID.values(), ids=VALID.keys())
def test_valid_requests_pass(params: pb.CompletionParams) -> None:
    check_params(params)


REQUIRED = pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED)
SCHEMA = pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
INVALID: dict[str, tuple[pb.CompletionParams, str, str]] = {
    # name: (params, the field named (its proto path), a piece of the message)
    "unknown role": (edited(lambda p: setattr(p.messages[0], "role", 9)), "messages[0].role", "'tool'"),
    "tool message without id": (
        base(messages=[*tool_loop()[:2], pb.Message(role=R.ROLE_TOOL, content="x")]),
        "messages[2].tool_call_id",
        "Missing required parameter",
    ),
    "tool message without a call before it": (
        base(messages=[user(), pb.Message(role=R.ROLE_TOOL, tool_call_id="call_1", content="x")]),
        "messages[1].role",
        "messages with role 'tool' must be a response to a preceding message with 'tool_calls'",
    ),
    "tool message after a user turn": (
        base(messages=[*tool_loop(), user("and?"), pb.Message(role=R.ROLE_TOOL, tool_call_id="call_1", content="x")]),
        "messages[4].role",
        "must be a response to a preceding message",
    ),
    "tool message answering an unknown call": (
        base(messages=[*tool_loop()[:2], pb.Message(role=R.ROLE_TOOL, tool_call_id="call_9", content="x")]),
        "messages[2].tool_call_id",
        "'tool_call_id' of 'call_9' not found in 'tool_calls' of previous message",
    ),
    "tool call without id": (
        base(messages=[user(), pb.Message(role=R.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(name="f")])]),
        "messages[1].tool_calls[0].id",
        "Missing required parameter",
    ),
    "tool call without name": (
        base(messages=[user(), pb.Message(role=R.ROLE_ASSISTANT, tool_calls=[CALL, pb.ToolCall(id="c2")])]),
        "messages[1].tool_calls[1].name",
        "Missing required parameter",
    ),
    "tool calls on a user message": (
        base(messages=[pb.Message(role=R.ROLE_USER, content="x", tool_calls=[CALL])]),
        "messages[0].tool_calls",
        "only messages with role 'assistant'",
    ),
    "content and parts": (
        base(messages=[pb.Message(role=R.ROLE_USER, content="x", parts=[pb.ContentPart(text="y")])]),
        "messages[0].content",
        "not both",
    ),
    "empty part": (
        base(messages=[pb.Message(role=R.ROLE_USER, parts=[pb.ContentPart(text="a"), pb.ContentPart()])]),
        "messages[0].parts[1]",
        "neither text nor an image",
    ),
    "image with data and url": (
        base(messages=[pb.Message(role=R.ROLE_USER, parts=[image_part(data=b"x", media_type="image/png", url="h:/")])]),
        "messages[0].parts[0]",
        "exactly one",
    ),
    "image with neither": (
        base(messages=[pb.Message(role=R.ROLE_USER, parts=[image_part(media_type="image/png")])]),
        "messages[0].parts[0]",
        "exactly one",
    ),
    "image of another type": (
        base(messages=[pb.Message(role=R.ROLE_USER, parts=[image_part(data=b"x", media_type="image/svg+xml")])]),
        "messages[0].parts[0]",
        "'image/svg+xml' is not supported",
    ),
    "image in a system message": (
        base(messages=[pb.Message(role=R.ROLE_SYSTEM, parts=[pb.ContentPart(image=PNG)]), user()]),
        "messages[0].parts[0]",
        "only allowed for messages with role 'user'",
    ),
    "129 tools": (base(tools=[pb.Tool(name=f"f{i}") for i in range(129)]), "tools", "maximum length 128"),
    "tool name with a space": (
        base(tools=[WEATHER, pb.Tool(name="get weather")]),
        "tools[1].name",
        "does not match pattern",
    ),
    "tool name too long": (base(tools=[pb.Tool(name="f" * 65)]), "tools[0].name", "maximum length 64"),
    "empty tool name": (base(tools=[pb.Tool(name="")]), "tools[0].name", "empty string"),
    "duplicate tool names": (base(tools=[WEATHER, WEATHER]), "tools[1].name", "more than once"),
    "tool parameters not an object": (
        base(tools=[pb.Tool(name="f", parameters="[1]")]),
        "tools[0].parameters",
        "JSON Schema object",
    ),
    "tool parameters not JSON": (
        base(tools=[pb.Tool(name="f", parameters="{")]),
        "tools[0].parameters",
        "JSON Schema object",
    ),
    "required without tools": (base(tool_choice=REQUIRED), "tool_choice", "only allowed when 'tools' are specified"),
    "named function without tools": (
        base(tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="f")),
        "tool_choice",
        "only allowed when 'tools' are specified",
    ),
    "named function not declared": (
        base(tools=[WEATHER], tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="f")),
        "tool_choice",
        "'f' is not one of the request's 'tools'",
    ),
    "unknown tool choice mode": (
        edited(lambda p: (p.tools.append(WEATHER), setattr(p.tool_choice, "mode", 7))), "tool_choice", "supported"
    ),
    "n zero": (base(choice_count=0), "choice_count", "Expected a value >= 1, but got 0"),
    "n nine": (base(choice_count=9), "choice_count", "Expected a value <= 8, but got 9"),
    "presence penalty": (base(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
    "frequency penalty": (base(frequency_penalty=-2.01), "frequency_penalty", "[-2, 2]"),
    "nan penalty": (base(frequency_penalty=float("nan")), "frequency_penalty", "[-2, 2]"),
    "top_logprobs too many": (base(logprobs=True, top_logprobs=21), "top_logprobs", "<= 20"),
    "top_logprobs negative": (base(logprobs=True, top_logprobs=-1), "top_logprobs", ">= 0"),
    "top_logprobs without logprobs": (base(top_logprobs=2), "top_logprobs", "'logprobs' must be set to true"),
    "schema without name": (
        base(response_format=pb.ResponseFormat(type=SCHEMA, schema="{}")),
        "response_format.name",
        "empty string",
    ),
    "schema with a bad name": (
        base(response_format=pb.ResponseFormat(type=SCHEMA, name="my schema", schema="{}")),
        "response_format.name",
        "does not match pattern",
    ),
    "schema missing": (
        base(response_format=pb.ResponseFormat(type=SCHEMA, name="s")),
        "response_format.schema",
        "Missing required parameter",
    ),
    "schema not an object": (
        base(response_format=pb.ResponseFormat(type=SCHEMA, name="s", schema='"string"')),
        "response_format.schema",
        "JSON Schema object",
    ),
    "unknown response format": (
        edited(lambda p: setattr(p.response_format, "type", 9)), "response_format.type", "json_schema"
    ),
    "unknown reasoning effort": (edited(lambda p: setattr(p, "reasoning_effort", 42)), "reasoning_effort", "'minimal'"),
    "model name too long": (base(model="m" * 257), "model", "maximum length 256, but got a string with length 257"),
    "model name too long, no messages either": (base(model="m" * 100_000, messages=[]), "model", "maximum length 256"),
    "user too long": (base(user="u" * 257), "user", "maximum length 256, but got a string with length 257"),
    "stop sequence too long": (
        base(stop_sequences=["ok", "s" * 513]), "stop_sequences", "maximum length 512, but got a string with length 513"
    ),
    "top_k zero": (base(top_k=0), "top_k", "Expected a value >= 1, but got 0"),
    "reasoning budget negative": (
        base(reasoning_budget_tokens=-5), "reasoning_budget_tokens", "Expected a value >= 1, but got -5"
    ),
    "reasoning budget beside an effort": (
        base(reasoning_budget_tokens=1024, reasoning_effort=pb.ReasoningEffort.REASONING_EFFORT_LOW),
        "reasoning_budget_tokens", "not both",
    ),
    "is_error on a user message": (
        base(messages=[pb.Message(role=R.ROLE_USER, content="x", is_error=True)]), "messages[0].is_error",
        "only messages with role 'tool' can have 'is_error'",
    ),
    "reasoning on a user message": (
        base(messages=[pb.Message(role=R.ROLE_USER, content="x", reasoning=[pb.Reasoning(text="t")])]),
        "messages[0].reasoning", "only messages with role 'assistant' can have 'reasoning'",
    ),
    "a reasoning block with text and redacted bytes": (
        base(messages=[user(), pb.Message(role=R.ROLE_ASSISTANT, content="a",
                                          reasoning=[pb.Reasoning(text="t"), pb.Reasoning(text="t", redacted=b"x")])]),
        "messages[1].reasoning[1]", "either its text",
    ),
    "an empty reasoning block": (
        base(messages=[user(), pb.Message(role=R.ROLE_ASSISTANT, content="a", reasoning=[pb.Reasoning()])]),
        "messages[1].reasoning[0]", "either its text",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("params", "param", "words"), INVALID.values(), ids=INVALID.keys())
def test_each_rule_names_its_field(params: pb.CompletionParams, param: str, words: str) -> None:
    with pytest.raises(GatewayError) as raised:
        check_params(params)
    assert raised.value.reason == pb.ErrorReason.ERROR_REASON_INVALID_REQUEST
    assert raised.value.field == param
    assert words in raised.value.message


@pytest.mark.parametrize(
    "params",
    [
        base(model="m" * 100_000),
        base(messages=[*tool_loop()[:2], pb.Message(role=R.ROLE_TOOL, tool_call_id="c" * 100_000, content="x")]),
        base(tools=[WEATHER],
             tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="f" * 100_000)),
        base(messages=[pb.Message(role=R.ROLE_USER, parts=[image_part(data=b"x", media_type="t" * 100_000)])]),
    ],
    ids=["model", "tool_call_id", "tool_choice name", "image media type"],
)  # fmt: skip
def test_no_message_quotes_a_long_string_whole(params: pb.CompletionParams) -> None:
    """A status message travels in gRPC metadata: a long echoed string broke the status (a 500 or a 413)."""
    with pytest.raises(GatewayError) as raised:
        check_params(params)
    assert len(raised.value.message) < 300


def test_deeply_nested_schema_text_is_a_400_not_a_crash() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(GatewayError) as raised:
        check_params(base(tools=[pb.Tool(name="f", parameters=deep)]))
    assert raised.value.field == "tools[0].parameters"


@pytest.mark.parametrize(
    ("params", "feature", "param"),
    [
        (base(tools=[WEATHER]), "tools", "tools"),
        (base(messages=tool_loop()), "tools", "messages[1]"),
        (base(parallel_tool_calls=False), "parallel_tool_calls", "parallel_tool_calls"),
        (base(choice_count=2), "n", "choice_count"),
        (base(seed=0), "seed", "seed"),
        (base(logprobs=True), "logprobs", "logprobs"),
        (base(top_k=5), "top_k", "top_k"),
        (base(reasoning_budget_tokens=2048), "reasoning_budget_tokens", "reasoning_budget_tokens"),
        (base(messages=[user(), pb.Message(role=R.ROLE_USER, parts=[pb.ContentPart(image=PNG)])]), "images",
         "messages[1].parts[0]"),
    ],
)  # fmt: skip
def test_check_supported_refuses_what_a_provider_lacks(params: pb.CompletionParams, feature: str, param: str) -> None:
    assert requested_features(params)[feature] == param
    with pytest.raises(GatewayError) as raised:
        check_supported(params, frozenset(), provider="local")
    assert (raised.value.field, raised.value.provider) == (param, "local")
    check_supported(params, frozenset({feature}), provider="local")


def test_unused_defaults_request_no_feature() -> None:
    params = base(choice_count=1, presence_penalty=0.0, parallel_tool_calls=True, top_logprobs=0)
    assert requested_features(params) == {}
