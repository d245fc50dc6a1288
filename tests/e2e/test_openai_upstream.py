"""The whole path to a remote model: openai SDK -> bridge -> core -> `openai` provider -> a fake upstream."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.openai_upstream import FakeToolCall, OpenAIUpstream, serve_openai_upstream

PUBLIC = "remote-chat"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
async def client(
    tmp_path: Path, upstream: OpenAIUpstream, gateway_for: Callable[..., Awaitable[str]]
) -> AsyncIterator[openai.AsyncOpenAI]:
    entry = {
        "name": PUBLIC,
        "provider": "openai",
        "model": "fake-model",
        "options": {"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY", "timeout_seconds": 5},
    }
    base_url = await gateway_for(write_catalog(tmp_path, [entry]), {"UPSTREAM_KEY": UPSTREAM_KEY})
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


async def test_plain_and_streaming_relay_the_upstream(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, temperature=0.7, stop="END")
    stream = await client.chat.completions.create(
        model=PUBLIC, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert plain.choices[0].message.content == "Hello, world!"
    assert plain.model == PUBLIC and plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.total_tokens == 11
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    sent = upstream.requests[0]
    assert sent.body["model"] == "fake-model"
    assert sent.body["messages"] == MESSAGES
    assert sent.body["temperature"] == 0.7 and sent.body["stop"] == ["END"]
    assert "top_p" not in sent.body and "max_tokens" not in sent.body
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_upstream_429_before_the_stream_is_a_429(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    upstream.error_status = 429
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=True)
    assert raised.value.code == "rate_limit_exceeded"


async def test_upstream_rejecting_our_key_is_never_a_401(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    upstream.api_key = "sk-some-other-key-000000000"
    with pytest.raises(openai.InternalServerError) as raised:
        await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    assert raised.value.status_code == 500
    assert UPSTREAM_KEY not in str(raised.value.body)


async def test_error_mid_stream_is_an_error_event_not_a_finish(
    client: openai.AsyncOpenAI, upstream: OpenAIUpstream
) -> None:
    upstream.stream_error_after = 2
    stream = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            assert chunk.choices[0].finish_reason is None, "no finish_reason may be invented"
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello, "
    assert raised.value.type == "api_error"


@pytest.mark.parametrize("error_after", [None, 3])
async def test_a_burst_from_the_upstream_streams_the_same_chunks(
    client: openai.AsyncOpenAI, upstream: OpenAIUpstream, error_after: int | None
) -> None:
    """Events the upstream sent in one write travel as a batch through the core; the client sees no difference."""
    upstream.reasoning_chunks, upstream.chunks = ["Hmm."], ["One", " two", " three", " four", "."]
    upstream.stream_error_after = error_after

    async def chunks() -> tuple[list[dict[str, object]], bool]:
        stream = await client.chat.completions.create(
            model=PUBLIC, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        seen: list[dict[str, object]] = []
        try:
            async for chunk in stream:
                seen.append(chunk.model_dump(exclude={"id", "created"}))
        except openai.APIError:
            return seen, True
        return seen, False

    single = await chunks()
    upstream.burst = True
    assert await chunks() == single
    assert single[1] is (error_after is not None)
    assert len(single[0]) == 1 + 1 + (error_after or 5) + (0 if error_after else 2)  # role, reasoning, ...


async def test_stream_cut_short_upstream_ends_with_an_error_event(
    tmp_path: Path, upstream: OpenAIUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.cut_after = 2
    base_url = str(client.base_url).rstrip("/")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        response = await http.post(
            f"{base_url}/chat/completions", json={"model": PUBLIC, "messages": MESSAGES, "stream": True}
        )
    events = [line for line in response.text.split("\n\n") if line]
    assert response.status_code == 200
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":') and "upstream_protocol_error" in events[-2]
    assert '"finish_reason":"stop"' not in response.text


async def test_client_disconnect_closes_the_upstream_stream(
    client: openai.AsyncOpenAI, upstream: OpenAIUpstream
) -> None:
    upstream.chunks = [f"token{i} " for i in range(200)]
    upstream.chunk_delay = 0.05  # ten seconds of stream
    stream = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    # The upstream sees its connection closed long before the ten-second stream would have ended.
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=3)


# --- Issue 8: tools, several choices, structured output and images, end to end -------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
QUESTION = [{"role": "user", "content": "Weather in Paris and Rome?"}]
PARIS, ROME = '{"city":"Paris"}', '{"city":"Rome"}'


def script_parallel_calls(upstream: OpenAIUpstream) -> None:
    upstream.chunks, upstream.finish_reason = [], "tool_calls"
    upstream.tool_calls = [
        FakeToolCall("call_a", "get_weather", ("", '{"city":', '"Paris"}')),
        FakeToolCall("call_b", "get_weather", ('{"city":"Rome"}',)),
    ]


async def test_agent_loop_call_result_answer(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    script_parallel_calls(upstream)
    first = await client.chat.completions.create(model=PUBLIC, messages=QUESTION, tools=TOOLS, user="end-user-7")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "function", "get_weather", PARIS),
        ("call_b", "function", "get_weather", ROME),
    ]
    results = {"call_a": '{"temp":21}', "call_b": '{"temp":25}'}
    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": results[c.id]} for c in calls),
    ]
    upstream.tool_calls, upstream.chunks, upstream.finish_reason = [], ["Paris 21, Rome 25."], "stop"
    final = await client.chat.completions.create(model=PUBLIC, messages=history, tools=TOOLS)
    assert final.choices[0].message.content == "Paris 21, Rome 25." and final.choices[0].finish_reason == "stop"
    first_body, second_body = (request.body for request in upstream.requests)
    assert first_body["tools"] == TOOLS and first_body["user"] == "end-user-7"
    assert second_body["messages"] == [
        *QUESTION,
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
    ]  # fmt: skip


async def test_two_parallel_tool_calls_stream_as_openai_streams_them(
    client: openai.AsyncOpenAI, upstream: OpenAIUpstream
) -> None:
    script_parallel_calls(upstream)
    stream = await client.chat.completions.create(
        model=PUBLIC, messages=QUESTION, tools=TOOLS, tool_choice="required", stream=True
    )
    pieces = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                pieces.append(
                    (
                        call.index,
                        call.id,
                        call.function and call.function.name,
                        call.function and call.function.arguments,
                    )
                )
            finish = choice.finish_reason or finish
    assert pieces == [
        (0, "call_a", "get_weather", ""),
        (0, None, None, '{"city":'),
        (0, None, None, '"Paris"}'),
        (1, "call_b", "get_weather", '{"city":"Rome"}'),
    ]
    assert finish == "tool_calls"
    assert upstream.requests[0].body["tool_choice"] == "required"


async def test_several_choices(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    upstream.chunks, upstream.choice_chunks = ["Hi", "!"], [["Hello"]]
    upstream.choice_finish_reasons = ["stop", "length"]
    reply = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, n=2, seed=5)
    assert [(c.index, c.message.content, c.finish_reason) for c in reply.choices] == [
        (0, "Hi!", "stop"),
        (1, "Hello", "length"),
    ]
    assert upstream.requests[0].body["n"] == 2 and upstream.requests[0].body["seed"] == 5


async def test_structured_output_and_images_pass_through(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    upstream.chunks = ['{"city":', '"Paris"}']
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    reply = await client.chat.completions.create(
        model=PUBLIC,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Where?"}, {"type": "image_url", "image_url": {"url": image}}],
            }
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "Paris"}
    body = upstream.requests[0].body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "place", "schema": schema, "strict": True},
    }
    assert body["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": image}}
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, 0.25)


async def test_logprobs_are_a_400_naming_the_param(client: openai.AsyncOpenAI, upstream: OpenAIUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, logprobs=True)
    assert raised.value.param == "logprobs"
    assert upstream.requests == []


def _nested_schema(depth: int) -> dict[str, Any]:
    """An object schema whose JSON nests `depth` levels deep (two per level: the schema and its properties)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth // 2):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    "parameters",
    [
        _nested_schema(254),
        {"type": "object", "properties": {"n": {"type": "integer", "maximum": 2**64}}},
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": -(2**70)}}},
    ],
    ids=["254-levels-deep", "maximum-2^64", "minimum--2^70"],
)
async def test_a_tool_schema_orjson_cannot_encode_reaches_the_upstream_not_a_500(
    client: openai.AsyncOpenAI, upstream: OpenAIUpstream, parameters: dict[str, Any]
) -> None:
    """orjson stops at 64-bit integers and 255 levels of nesting; such a (valid) schema used to be a 500."""
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    answer = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, tools=[tool])  # type: ignore[list-item]
    assert answer.choices[0].message.content == "Hello, world!"
    assert upstream.requests[-1].body["tools"][0]["function"]["parameters"] == parameters
