"""The `openai` provider, driven through its backend against a real fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, CatalogError
from services.completion.validation import check_supported
from services.errors import GatewayError
from services.providers import FEATURES, Provider
from services.providers.openai import OpenAICompatibleBackend, OpenAICompatibleProvider, create_backend
from tests.fakes.openai_upstream import SERVER_ERROR, FakeToolCall, OpenAIUpstream, serve_openai_upstream
from tests.fakes.serve import serve

R = pb.ErrorReason
F = pb.FinishReason
KEY = "sk-gateway-secret-1234"
ENV = {"UPSTREAM_KEY": KEY}
TOO_LONG = "This model's maximum context length is 4096 tokens."


def make_entry(options: Mapping[str, Any], *, name: str = "gpt-test", model: str = "org/upstream-7b") -> CatalogEntry:
    return CatalogEntry(name, "openai", model, "acme", dict(options), where=f"catalog.yaml: models[0] ({name})")


def make_params(**fields: Any) -> pb.CompletionParams:
    return pb.CompletionParams(
        model="gpt-test", messages=[pb.Message(role=pb.Role.ROLE_USER, content="Say hello")], **fields
    )


async def run(provider: Provider, params: pb.CompletionParams) -> tuple[list[str], svc.CompletionFinish]:
    """The texts of the deltas and the finish, checking that the finish comes last and exactly once."""
    texts: list[str] = []
    finish: svc.CompletionFinish | None = None
    async with aclosing(provider.stream(params)) as events:  # type: ignore[type-var]
        async for event in events:
            assert finish is None, "an event after the finish"
            if event.HasField("finish"):
                finish = event.finish
                continue
            for item in unbatched([event]):
                assert item.HasField("delta") and item.delta.text
                texts.append(item.delta.text)
    assert finish is not None
    return texts, finish


def unbatched(events: list[svc.StreamCompletionResponse]) -> list[svc.StreamCompletionResponse]:
    """The events with every batch replaced by its events (a provider batches the events of one network read)."""
    out: list[svc.StreamCompletionResponse] = []
    for event in events:
        if event.HasField("batch"):
            assert len(event.batch.events) >= 2, "a batch of one (or none) is sent as the event itself"
            assert {e.WhichOneof("event") for e in event.batch.events} <= {"delta", "reasoning", "tool_call"}
            out.extend(event.batch.events)
        else:
            out.append(event)
    return out


async def fail(provider: Provider, params: pb.CompletionParams | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await run(provider, params or make_params())
    assert info.value.provider == "openai"
    return info.value


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


@pytest.fixture
async def backend(upstream: OpenAIUpstream) -> AsyncIterator[OpenAICompatibleBackend]:
    backend = create_backend(ENV)  # depends on `upstream` so its clients close before the server stops
    yield backend
    await backend.aclose()


@pytest.fixture
async def provider(upstream: OpenAIUpstream, backend: OpenAICompatibleBackend) -> Provider:
    return await backend.provider_for(make_entry({"base_url": upstream.url}))


async def test_streams_deltas_then_finish_and_sends_the_openai_request(
    upstream: OpenAIUpstream, backend: OpenAICompatibleBackend
) -> None:
    upstream.api_key = KEY
    provider = await backend.provider_for(make_entry({"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY"}))
    params = make_params(temperature=0.0, max_tokens=50, stop_sequences=["\n\n", "END"])
    params.messages.insert(0, pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."))
    params.messages.append(pb.Message(role=pb.Role.ROLE_ASSISTANT, content="Hello?"))

    texts, finish = await run(provider, params)

    assert texts == ["Hello", ", ", "world", "!"]
    assert finish == svc.CompletionFinish(
        choices=[svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11),
    )
    [request] = upstream.requests
    assert request.body == {
        "model": "org/upstream-7b",  # the upstream's name, not the public one
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hello?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,  # set to zero is still set
        "max_tokens": 50,
        "stop": ["\n\n", "END"],
    }
    assert request.headers["authorization"] == f"Bearer {KEY}"


async def test_sends_only_what_the_caller_set(upstream: OpenAIUpstream, provider: Provider) -> None:
    await run(provider, make_params(top_p=0.5))
    [request] = upstream.requests
    assert set(request.body) == {"model", "messages", "stream", "stream_options", "top_p"}
    assert request.body["top_p"] == 0.5
    assert "authorization" not in request.headers


@pytest.mark.parametrize("in_finish_chunk", [False, True], ids=["own-chunk", "finish-chunk"])
async def test_usage_wherever_the_server_sends_it(
    upstream: OpenAIUpstream, provider: Provider, in_finish_chunk: bool
) -> None:
    upstream.usage_in_finish_chunk = in_finish_chunk
    upstream.usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    _, finish = await run(provider, make_params())
    assert finish.usage == pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


async def test_usage_never_sent_leaves_the_field_unset(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.usage = None
    texts, finish = await run(provider, make_params())
    assert texts and finish.choices[0].finish_reason == F.FINISH_REASON_STOP
    assert not finish.HasField("usage")


@pytest.mark.parametrize(
    ("upstream_reason", "expected"),
    [
        ("length", F.FINISH_REASON_LENGTH),
        ("content_filter", F.FINISH_REASON_CONTENT_FILTER),
        ("tool_calls", F.FINISH_REASON_TOOL_CALLS),
        ("function_call", F.FINISH_REASON_TOOL_CALLS),
    ],
)
async def test_finish_reasons(
    upstream: OpenAIUpstream, provider: Provider, upstream_reason: str, expected: pb.FinishReason.ValueType
) -> None:
    upstream.finish_reason = upstream_reason
    upstream.chunks = ["Hel", "lo"]
    _, finish = await run(provider, make_params(max_tokens=2))
    assert finish.choices[0].finish_reason == expected


async def test_an_unknown_finish_reason_is_a_protocol_error(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.finish_reason = "abort"
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


@pytest.mark.parametrize("script", [{"cut_after": 2}, {"finish_reason": None}], ids=["cut-off", "done-no-finish"])
async def test_a_stream_without_finish_reason_is_a_protocol_error(
    upstream: OpenAIUpstream, provider: Provider, script: dict[str, Any]
) -> None:
    for name, value in script.items():
        setattr(upstream, name, value)
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_PROTOCOL  # never a fabricated "stop"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SERVER_ERROR, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),  # OpenAI
        ({"error": {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}}, None),  # vLLM
        ({"error": {"message": "too long", "code": "context_length_exceeded"}}, R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED),
        ({"error": {"message": "slow down", "type": "rate_limit_error"}}, R.ERROR_REASON_RATE_LIMITED),
    ],
)
async def test_an_error_event_in_the_stream(
    upstream: OpenAIUpstream, provider: Provider, error: dict[str, Any], reason: pb.ErrorReason.ValueType | None
) -> None:
    upstream.stream_error_after = 1
    upstream.stream_error = error
    exc = await fail(provider)
    assert exc.reason == (reason or R.ERROR_REASON_INVALID_REQUEST)
    if reason is None:
        assert exc.message == "bad"  # the caller's own mistake: the upstream's words are forwarded


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, R.ERROR_REASON_INVALID_REQUEST),
        (401, R.ERROR_REASON_UPSTREAM_AUTH),
        (403, R.ERROR_REASON_UPSTREAM_AUTH),
        (404, R.ERROR_REASON_MODEL_NOT_FOUND),
        (408, R.ERROR_REASON_UPSTREAM_TIMEOUT),
        (422, R.ERROR_REASON_INVALID_REQUEST),
        (429, R.ERROR_REASON_RATE_LIMITED),
        (500, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (503, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (504, R.ERROR_REASON_UPSTREAM_TIMEOUT),
    ],
)
async def test_http_errors_before_the_stream(
    upstream: OpenAIUpstream, provider: Provider, status: int, reason: pb.ErrorReason.ValueType
) -> None:
    upstream.error_status = status
    exc = await fail(provider)
    assert exc.reason == reason
    if reason == R.ERROR_REASON_INVALID_REQUEST:
        assert exc.message == f"fake upstream error {status}"  # the caller's own mistake: forwarded
    else:
        assert "fake upstream error" not in exc.message and str(status) not in exc.message


async def test_a_rejected_key_is_the_gateways_problem_and_does_not_leak(
    upstream: OpenAIUpstream, backend: OpenAICompatibleBackend
) -> None:
    upstream.api_key = "sk-the-right-one"
    provider = await backend.provider_for(make_entry({"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY"}))
    exc = await fail(provider)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_AUTH
    assert "credentials" in exc.message
    assert KEY not in exc.message and "401" not in exc.message


@pytest.mark.parametrize(
    "error",
    [
        {"message": TOO_LONG, "type": "invalid_request_error", "code": "context_length_exceeded"},
        {"code": 400, "message": TOO_LONG, "type": "exceed_context_size_error", "n_ctx": 4096},
    ],
    ids=["openai", "llama.cpp"],
)
async def test_a_400_for_context_length(upstream: OpenAIUpstream, provider: Provider, error: dict[str, Any]) -> None:
    upstream.error_status, upstream.error_body = 400, {"error": error}
    exc = await fail(provider)
    assert exc.reason == R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED
    assert exc.message == TOO_LONG


async def test_a_long_400_message_is_truncated(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.error_status = 400
    upstream.error_body = {"error": {"message": "x" * 5000, "type": "invalid_request_error"}}
    assert (await fail(provider)).message == "x" * 500


async def test_a_connection_dropped_mid_stream_is_unavailable(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.abort_after = 2
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE


async def test_connection_refused_is_unavailable(backend: OpenAICompatibleBackend) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = await backend.provider_for(make_entry({"base_url": f"http://127.0.0.1:{port}/v1"}))
    started = time.monotonic()
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE
    assert time.monotonic() - started < 2


async def test_a_slow_upstream_times_out(upstream: OpenAIUpstream, backend: OpenAICompatibleBackend) -> None:
    upstream.chunk_delay = 3.0
    provider = await backend.provider_for(make_entry({"base_url": upstream.url, "timeout_seconds": 0.3}))
    started = time.monotonic()
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_TIMEOUT
    assert time.monotonic() - started < 2


async def test_closing_the_stream_closes_the_upstream_request(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.chunks, upstream.chunk_delay = ["tok"] * 100, 0.1
    stream = provider.stream(make_params())
    first = await anext(stream)
    assert first.delta.text == "tok"
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=2)


async def test_cancelling_the_consumer_closes_the_upstream_request(
    upstream: OpenAIUpstream, provider: Provider
) -> None:
    upstream.chunks, upstream.chunk_delay = ["tok"] * 100, 0.1
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(make_params()):
            first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), timeout=2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # re-raised, not swallowed
        await task
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=2)


async def test_entries_with_the_same_upstream_share_one_pooled_client(
    upstream: OpenAIUpstream, backend: OpenAICompatibleBackend
) -> None:
    first = await backend.provider_for(make_entry({"base_url": upstream.url}, name="a", model="m1"))
    second = await backend.provider_for(make_entry({"base_url": upstream.url + "/", "timeout_seconds": 9}, name="b"))
    await run(first, make_params())
    await run(second, make_params())
    # One pool: the second request, from another entry, reuses the first one's connection.
    assert upstream.requests[0].client_port == upstream.requests[1].client_port
    assert backend.client_count == 1
    await backend.provider_for(make_entry({"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY"}, name="c"))
    assert backend.client_count == 2  # another key is another client
    await backend.aclose()
    assert backend.client_count == 0


@pytest.mark.parametrize(
    ("options", "model", "expected"),
    [
        ({"base_url": "http://h/v1", "temperature": 1}, "m", "unknown options"),
        ({}, "m", "'base_url' is required"),
        ({"base_url": 8000}, "m", "'base_url' must be of type str"),
        ({"base_url": "vllm:8000/v1"}, "m", "http(s) URL"),
        ({"base_url": "http://h/v1", "timeout_seconds": "60"}, "m", "'timeout_seconds' must be of type float"),
        ({"base_url": "http://h/v1", "connect_timeout_seconds": True}, "m", "'connect_timeout_seconds' must be"),
        ({"base_url": "http://h/v1", "timeout_seconds": 0}, "m", "must be > 0"),
        ({"base_url": "http://h/v1", "api_key_env": "NOT_SET_ANYWHERE"}, "m", "NOT_SET_ANYWHERE"),
        ({"base_url": "http://h/v1"}, "", "'model' is required"),
    ],
)
async def test_bad_catalog_entries_are_refused_with_the_entry_named(
    options: dict[str, Any], model: str, expected: str
) -> None:
    backend = create_backend(ENV)
    with pytest.raises(CatalogError) as info:
        await backend.provider_for(make_entry(options, model=model))
    assert expected in str(info.value)
    assert "(gpt-test)" in str(info.value)
    assert backend.client_count == 0
    await backend.aclose()


# --- Issue 8: every feature passed through in OpenAI's shape, tool calls and choices relayed -------------------------

WEATHER = pb.Tool(
    name="get_weather",
    description="The weather in a city",
    parameters='{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}',
    strict=True,
)
PNG = b"\x89PNG\r\n\x1a\n-fake-png-bytes"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
PARIS, ROME = '{"city":"Paris"}', '{"city":"Rome"}'


async def collect(provider: Provider, params: pb.CompletionParams) -> list[svc.StreamCompletionResponse]:
    async with aclosing(provider.stream(params)) as events:  # type: ignore[type-var]
        return unbatched([event async for event in events])


def call_delta(
    index: int, arguments: str, *, id: str = "", name: str = "", choice: int = 0
) -> svc.StreamCompletionResponse:  # noqa: A002
    return svc.StreamCompletionResponse(
        tool_call=svc.ToolCallDelta(choice_index=choice, index=index, id=id, name=name, arguments=arguments)
    )


def finish(*reasons: pb.FinishReason.ValueType) -> svc.StreamCompletionResponse:
    """The finish of choices 0, 1, ... with these reasons, and the fake's usage."""
    usage = pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)
    choices = [svc.ChoiceFinish(index=index, finish_reason=reason) for index, reason in enumerate(reasons)]
    return svc.StreamCompletionResponse(finish=svc.CompletionFinish(choices=choices, usage=usage))


async def test_every_feature_reaches_the_upstream_in_openai_shape(upstream: OpenAIUpstream, provider: Provider) -> None:
    params = pb.CompletionParams(
        model="gpt-test",
        messages=[
            pb.Message(role=pb.Role.ROLE_SYSTEM, content="Use the tools."),
            pb.Message(
                role=pb.Role.ROLE_USER,
                parts=[
                    pb.ContentPart(text="Where is this?"),
                    pb.ContentPart(image=pb.Image(data=PNG, media_type="image/png")),
                ],
            ),
            pb.Message(
                role=pb.Role.ROLE_ASSISTANT,
                tool_calls=[
                    pb.ToolCall(id="call_a", name="get_weather", arguments=PARIS),
                    pb.ToolCall(id="call_b", name="get_weather", arguments=ROME),
                ],
            ),
            pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="call_a", content='{"temp":21}'),
            pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="call_b", content='{"temp":25}'),
        ],
        tools=[WEATHER, pb.Tool(name="now")],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="get_weather"),
        parallel_tool_calls=False,
        response_format=pb.ResponseFormat(
            type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            name="answer",
            description="The answer",
            schema='{"type":"object","properties":{"city":{"type":"string"}}}',
            strict=True,
        ),
        choice_count=1,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        user="end-user-42",
        reasoning_effort=pb.ReasoningEffort.REASONING_EFFORT_LOW,
        max_tokens=99,
    )
    await collect(provider, params)
    [request] = upstream.requests
    assert request.body == {
        "model": "org/upstream-7b",
        "messages": [
            {"role": "system", "content": "Use the tools."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Where is this?"},
                    {"type": "image_url", "image_url": {"url": PNG_URL}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
                    {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": ROME}},
                ],
            },
            {"role": "tool", "content": '{"temp":21}', "tool_call_id": "call_a"},
            {"role": "tool", "content": '{"temp":25}', "tool_call_id": "call_b"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 99,
        "seed": 1234,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "n": 1,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "description": "The answer",
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": True,
            },
        },
        "user": "end-user-42",
        "reasoning_effort": "low",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "sent"),
    [
        (pb.ToolChoiceMode.TOOL_CHOICE_MODE_NONE, "none"),
        (pb.ToolChoiceMode.TOOL_CHOICE_MODE_AUTO, "auto"),
        (pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED, "required"),
        (pb.ToolChoiceMode.TOOL_CHOICE_MODE_UNSPECIFIED, None),
    ],
)
async def test_tool_choice_modes(
    upstream: OpenAIUpstream, provider: Provider, mode: pb.ToolChoiceMode.ValueType, sent: str | None
) -> None:
    await collect(provider, make_params(tools=[WEATHER], tool_choice=pb.ToolChoice(mode=mode)))
    assert upstream.requests[0].body.get("tool_choice") == sent


@pytest.mark.parametrize(
    ("kind", "sent"),
    [
        (pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_TEXT, {"type": "text"}),
        (pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT, {"type": "json_object"}),
    ],
)
async def test_plain_response_formats(
    upstream: OpenAIUpstream, provider: Provider, kind: pb.ResponseFormatType.ValueType, sent: dict[str, str]
) -> None:
    await collect(provider, make_params(response_format=pb.ResponseFormat(type=kind)))
    assert upstream.requests[0].body["response_format"] == sent


async def test_streamed_parallel_tool_calls_are_relayed_piece_by_piece(
    upstream: OpenAIUpstream, provider: Provider
) -> None:
    upstream.chunks = ["Let me check."]
    upstream.tool_calls = [
        FakeToolCall("call_a", "get_weather", ("", '{"ci', 'ty":"Paris"}')),
        FakeToolCall("call_b", "get_weather", ('{"city":', '"Rome"}')),
    ]
    upstream.finish_reason = "tool_calls"
    events = await collect(provider, make_params(tools=[WEATHER]))
    assert events == [
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="Let me check.")),
        call_delta(0, "", id="call_a", name="get_weather"),
        call_delta(0, '{"ci'),
        call_delta(0, 'ty":"Paris"}'),
        call_delta(1, '{"city":', id="call_b", name="get_weather"),
        call_delta(1, '"Rome"}'),
        finish(F.FINISH_REASON_TOOL_CALLS),
    ]


@pytest.mark.parametrize(
    ("upstream_reason", "expected"),
    [("stop", F.FINISH_REASON_TOOL_CALLS), ("length", F.FINISH_REASON_LENGTH)],
)
async def test_an_answer_with_tool_calls_finishes_tool_calls_unless_cut(
    upstream: OpenAIUpstream, provider: Provider, upstream_reason: str, expected: pb.FinishReason.ValueType
) -> None:
    upstream.chunks, upstream.finish_reason = [], upstream_reason
    upstream.tool_calls = [FakeToolCall("call_a", "now", ("{}",))]
    events = await collect(provider, make_params(tools=[WEATHER]))
    assert events[-1].finish.choices[0].finish_reason == expected


async def test_calls_sent_whole_under_one_index_are_renumbered(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.chunks, upstream.finish_reason = [], "tool_calls"
    upstream.tool_calls = [FakeToolCall("call_a", "now", ("{}",)), FakeToolCall("call_b", "now", ('{"tz":"UTC"}',))]
    upstream.tool_call_indexes = [0, 0]  # as some servers send parallel calls: each whole, each with index 0
    events = await collect(provider, make_params(tools=[WEATHER]))
    assert events[:-1] == [
        call_delta(0, "{}", id="call_a", name="now"),
        call_delta(1, '{"tz":"UTC"}', id="call_b", name="now"),
    ]


async def test_a_call_without_id_gets_one_and_without_name_is_a_protocol_error(
    upstream: OpenAIUpstream, provider: Provider
) -> None:
    upstream.chunks, upstream.finish_reason = [], "tool_calls"
    upstream.tool_calls = [FakeToolCall("", "now", ("{}",))]
    [event, _] = await collect(provider, make_params(tools=[WEATHER]))
    assert event.tool_call.id.startswith("call_") and len(event.tool_call.id) == 29
    upstream.tool_calls = [FakeToolCall("call_a", "", ("{}",))]
    with pytest.raises(GatewayError) as raised:
        await collect(provider, make_params(tools=[WEATHER]))
    assert raised.value.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


async def test_several_choices_are_relayed_with_their_indexes_and_finish_reasons(
    upstream: OpenAIUpstream, provider: Provider
) -> None:
    upstream.chunks = ["A", "a"]
    upstream.choice_chunks = [["B"], ["C", "c"]]
    upstream.choice_finish_reasons = ["stop", "length", "stop"]
    events = await collect(provider, make_params(choice_count=3))
    assert upstream.requests[0].body["n"] == 3
    assert events == [
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="A")),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="B", choice_index=1)),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="C", choice_index=2)),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="a")),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="c", choice_index=2)),
        finish(F.FINISH_REASON_STOP, F.FINISH_REASON_LENGTH, F.FINISH_REASON_STOP),
    ]


@pytest.mark.parametrize(("n", "extra"), [(3, 1), (1, 1)], ids=["upstream-ignored-n", "choice-out-of-range"])
async def test_choices_that_do_not_match_n_are_a_protocol_error(
    upstream: OpenAIUpstream, provider: Provider, n: int, extra: int
) -> None:
    upstream.choice_chunks = [["B"]] * extra
    with pytest.raises(GatewayError) as raised:
        await collect(provider, make_params(choice_count=n))
    assert raised.value.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL  # never silently fewer (or more) choices


async def test_reasoning_and_usage_details_are_relayed(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.reasoning_chunks = ["Thinking", " hard"]
    upstream.chunks = ["42"]
    upstream.usage = {
        "prompt_tokens": 9,
        "completion_tokens": 5,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    events = await collect(provider, make_params(reasoning_effort=pb.ReasoningEffort.REASONING_EFFORT_HIGH))
    assert upstream.requests[0].body["reasoning_effort"] == "high"
    assert events == [
        svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text="Thinking")),
        svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=" hard")),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="42")),
        svc.StreamCompletionResponse(
            finish=svc.CompletionFinish(
                choices=[svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)],
                usage=pb.Usage(
                    prompt_tokens=9, completion_tokens=5, total_tokens=14, cached_tokens=4, reasoning_tokens=3
                ),
            )
        ),
    ]


@pytest.mark.parametrize("fields", [{"logprobs": True}, {"logprobs": True, "top_logprobs": 3}])
async def test_logprobs_are_refused_before_any_upstream_call(
    upstream: OpenAIUpstream, provider: Provider, fields: dict[str, Any]
) -> None:
    with pytest.raises(GatewayError) as raised:  # the core's one check, before dispatch, against the declared data
        check_supported(make_params(**fields), provider.supported, provider="openai")
    assert raised.value.reason == R.ERROR_REASON_INVALID_REQUEST
    assert (raised.value.field, raised.value.provider) == ("logprobs", "openai")
    assert upstream.requests == []


def test_every_feature_but_log_probabilities_top_k_and_a_reasoning_budget_is_supported() -> None:
    # The core refuses these before dispatch: no proto field carries log probabilities back, and chat completions
    # has no top_k and no thinking budget.
    assert OpenAICompatibleProvider.supported == set(FEATURES) - {"logprobs", "top_k", "reasoning_budget_tokens"}


async def test_a_failed_tool_is_its_content_and_reasoning_given_back_is_not_sent(
    upstream: OpenAIUpstream, provider: Provider
) -> None:
    call = pb.ToolCall(id="call_1", name="now", arguments="{}")
    params = pb.CompletionParams(
        model="gpt-test",
        messages=[
            pb.Message(role=pb.Role.ROLE_USER, content="Time?"),
            pb.Message(
                role=pb.Role.ROLE_ASSISTANT, tool_calls=[call], reasoning=[pb.Reasoning(text="Ask.", signature="s")]
            ),
            pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="call_1", content="clock broken", is_error=True),
        ],
    )
    await run(provider, params)
    assert upstream.requests[0].body["messages"] == [
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "clock broken", "tool_call_id": "call_1"},  # no error flag in OpenAI's shape
    ]


# --- vLLM's stop_reason: the stop sequence that ended a choice ------------------------------------------------------


def vllm_body(*finishes: tuple[str, str, object]) -> str:
    """A stream as vLLM sends it: for each choice (text, finish_reason, stop_reason), its text, then a finish chunk
    carrying `stop_reason` (the matched stop string, a stop token's id, or null), then usage and [DONE]."""
    envelope = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": 0, "model": "org/upstream-7b"}
    chunks: list[dict[str, Any]] = []
    for index, (text, reason, stop) in enumerate(finishes):
        chunks.append({**envelope, "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]})
        chunks.append(
            {
                **envelope,
                "choices": [{"index": index, "delta": {"content": ""}, "finish_reason": reason, "stop_reason": stop}],
            }
        )
    chunks.append(
        {**envelope, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}
    )
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


@asynccontextmanager
async def vllm_provider(body: str) -> AsyncIterator[Provider]:
    """A provider whose upstream answers every chat completion with `body`."""

    async def chat(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="text/event-stream")

    async with serve(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as root:
        backend = create_backend(ENV)
        try:
            yield await backend.provider_for(make_entry({"base_url": f"{root}/v1"}))
        finally:
            await backend.aclose()  # before the server stops


@pytest.mark.parametrize(
    ("finishes", "expected"),
    [
        ([("Hello", "stop", "END")], [(F.FINISH_REASON_STOP, "END")]),
        ([("Hello", "stop", "\n\n")], [(F.FINISH_REASON_STOP, "\n\n")]),
        ([("Hello", "stop", "</s>")], [(F.FINISH_REASON_STOP, "")]),  # not one of the request's: not relayed
        ([("Hello", "stop", 2)], [(F.FINISH_REASON_STOP, "")]),  # a stop token's id
        ([("Hello", "stop", None)], [(F.FINISH_REASON_STOP, "")]),  # the end of the answer
        ([("Hello", "length", "END")], [(F.FINISH_REASON_LENGTH, "")]),  # a stop sequence only ends a stop
        (
            [("A", "length", None), ("B", "stop", "END"), ("C", "stop", None)],
            [(F.FINISH_REASON_LENGTH, ""), (F.FINISH_REASON_STOP, "END"), (F.FINISH_REASON_STOP, "")],
        ),
    ],
    ids=["matched", "matched-blank-lines", "other-string", "token-id", "null", "length", "several-choices"],
)
async def test_a_stop_reason_that_is_a_stop_sequence_is_relayed(
    finishes: list[tuple[str, str, object]], expected: list[tuple[pb.FinishReason.ValueType, str]]
) -> None:
    async with vllm_provider(vllm_body(*finishes)) as provider:
        events = await collect(provider, make_params(stop_sequences=["\n\n", "END"], choice_count=len(finishes)))
    assert events[-1].finish == svc.CompletionFinish(
        choices=[
            svc.ChoiceFinish(index=index, finish_reason=reason, stop_sequence=stop)
            for index, (reason, stop) in enumerate(expected)
        ],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11),
    )


async def test_a_stop_reason_is_not_relayed_when_the_request_has_no_stop_sequences() -> None:
    async with vllm_provider(vllm_body(("Hello", "stop", "END"))) as provider:
        events = await collect(provider, make_params())
    assert list(events[-1].finish.choices) == [svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)]


# --- events that arrive in one network read go out as one batch -----------------------------------------------------


async def test_events_read_together_are_one_batch_then_the_finish(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.burst = True  # the whole body in one write: the provider reads it at once
    upstream.reasoning_chunks, upstream.chunks = ["Hmm."], ["Hello", ", ", "world"]
    upstream.tool_calls, upstream.finish_reason = [FakeToolCall("call_a", "get", ("{}",))], "tool_calls"
    async with aclosing(provider.stream(make_params(include_usage=True))) as stream:  # type: ignore[type-var]
        events = [event async for event in stream]
    assert [event.WhichOneof("event") for event in events] == ["batch", "finish"]
    assert list(events[0].batch.events) == [
        svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text="Hmm.")),
        *(svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text)) for text in ["Hello", ", ", "world"]),
        call_delta(0, "{}", id="call_a", name="get"),
    ]
    assert events[1] == finish(F.FINISH_REASON_TOOL_CALLS)


async def test_a_single_event_read_alone_is_not_a_batch(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.chunks, upstream.chunk_delay = ["Hel", "lo"], 0.02  # each content chunk in its own read
    async with aclosing(provider.stream(make_params())) as stream:  # type: ignore[type-var]
        events = [event async for event in stream]
    assert [event.WhichOneof("event") for event in events] == ["delta", "delta", "finish"]


async def test_the_events_read_before_an_error_come_first(upstream: OpenAIUpstream, provider: Provider) -> None:
    upstream.burst, upstream.stream_error_after = True, 2  # "Hello", ", " then the error, in one read
    seen: list[svc.StreamCompletionResponse] = []
    with pytest.raises(GatewayError) as info:
        async with aclosing(provider.stream(make_params())) as stream:  # type: ignore[type-var]
            async for event in stream:
                seen.append(event)
    assert info.value.reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE  # OpenAI's server_error
    assert [event.WhichOneof("event") for event in seen] == ["batch"]
    assert [event.delta.text for event in seen[0].batch.events] == ["Hello", ", "]
