"""The whole path to Gemini: openai SDK -> bridge -> core -> `gemini` provider (real google-genai) -> the fake."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.e2e.chunks import content_of, finish_reasons
from tests.fakes.gemini import Candidate, GeminiUpstream, google_error, serve_gemini
from tests.fakes.openai_upstream import FakeToolCall, serve_openai_upstream

MODEL = "gemini-3-flash-preview"
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
ENV = {"GEMINI_API_KEY": GEMINI_KEY}
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
Gateway = Callable[..., Awaitable[str]]


def gemini_entry(base_url: str, name: str = MODEL, model: str = MODEL) -> dict[str, Any]:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": base_url, "timeout_seconds": 5}
    return {"name": name, "provider": "gemini", "model": model, "owned_by": "google", "options": options}


@pytest.fixture
async def upstream() -> AsyncIterator[GeminiUpstream]:
    async with serve_gemini(api_key=GEMINI_KEY) as fake:
        yield fake


@pytest.fixture
async def client(tmp_path: Path, upstream: GeminiUpstream, gateway_for: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    base_url = await gateway_for(write_catalog(tmp_path, [gemini_entry(upstream.url)]), ENV)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


async def stream_all(client: openai.AsyncOpenAI, **request: Any) -> list[Any]:
    stream = await client.chat.completions.create(
        model=request.pop("model", MODEL), messages=request.pop("messages", MESSAGES), stream=True, **request
    )
    return [chunk async for chunk in stream]


async def test_text_streaming_and_not(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = await stream_all(client, stream_options={"include_usage": True})
    assert plain.model == MODEL and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.content == "Hello, world!"
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (7, 4, 11)
    assert [c.choices[0].delta.content for c in chunks if c.choices][1:5] == ["Hello", ", ", "world", "!"]
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11
    assert [r.action for r in upstream.requests] == ["generateContent", "streamGenerateContent"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_exact_generate_content_request(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream, stream: bool
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "user", "content": "Answer with a digit."},
    ]
    response = await client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0.2, top_p=0.9, max_tokens=64, stop=["END"], stream=stream
    )
    if stream:
        assert content_of([chunk async for chunk in response]) == "Hello, world!"  # type: ignore[union-attr]
    [request] = upstream.requests
    assert (request.version, request.model, request.query) == ("v1beta", MODEL, "alt=sse" if stream else "")
    assert request.action == ("streamGenerateContent" if stream else "generateContent")
    assert request.headers["x-goog-api-key"] == GEMINI_KEY
    assert request.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Hi."}]},
            {"role": "model", "parts": [{"text": "Hello."}]},
            {"role": "user", "parts": [{"text": "What is 2+2?"}, {"text": "Answer with a digit."}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "maxOutputTokens": 64, "stopSequences": ["END"]},
    }


# Every finish reason the provider relays, as the OpenAI client sees it.
FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
    "LANGUAGE": "content_filter",
    "ESCALATION": "content_filter",
    "PUP_LIMITED_DISABLED": "content_filter",
    "OTHER": "stop",
    "IMAGE_OTHER": "stop",
    "NO_IMAGE": "stop",
}


async def test_every_finish_reason(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    plain: dict[str, str | None] = {}
    streamed: dict[str, list[str]] = {}
    for gemini in FINISH_REASONS:
        upstream.finish_reason = gemini
        response = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        plain[gemini] = response.choices[0].finish_reason
        streamed[gemini] = finish_reasons(await stream_all(client))
    assert plain == FINISH_REASONS
    assert streamed == {gemini: [openai_reason] for gemini, openai_reason in FINISH_REASONS.items()}


async def test_a_function_call_finishes_with_tool_calls(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    upstream.function_calls = [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.choices[0].finish_reason == "tool_calls"
    assert finish_reasons(await stream_all(client)) == ["tool_calls"]


@pytest.mark.parametrize("gemini", ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "FINISH_REASON_UNSPECIFIED"])
async def test_an_unusable_finish_is_an_error_not_a_finish(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream, gemini: str
) -> None:
    upstream.finish_reason = gemini
    with pytest.raises(openai.InternalServerError) as raised:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.status_code == 502 and raised.value.code == "upstream_protocol_error"
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as in_stream:
        async for chunk in stream:
            assert chunk.choices[0].finish_reason is None, "no finish_reason may be invented"
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello, world!"
    assert in_stream.value.code == "upstream_protocol_error"


async def test_usage_with_thinking_and_cached_tokens(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    upstream.usage = {
        "promptTokenCount": 100,
        "candidatesTokenCount": 4,
        "thoughtsTokenCount": 30,
        "cachedContentTokenCount": 64,
        "totalTokenCount": 134,
    }
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = await stream_all(client, stream_options={"include_usage": True})
    for usage in (plain.usage, chunks[-1].usage):
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (100, 34, 134)
        assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 30
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 64


async def test_thoughts_are_reasoning_content_not_content(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    upstream.thoughts, upstream.texts = ["The user ", "greets me."], ["Hi", "!"]
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = await stream_all(client)
    assert plain.choices[0].message.content == "Hi!"
    assert (plain.choices[0].message.model_extra or {}).get("reasoning_content") == "The user greets me."
    reasoning = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices]
    assert [piece for piece in reasoning if piece] == ["The user ", "greets me."]
    assert content_of(chunks) == "Hi!"


async def test_a_blocked_prompt_is_an_empty_filtered_answer(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream
) -> None:
    upstream.block_reason = "SAFETY"
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = await stream_all(client, stream_options={"include_usage": True})
    assert plain.choices[0].message.content == ""
    assert plain.choices[0].finish_reason == "content_filter"
    assert plain.usage is not None and (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (7, 0)
    assert content_of(chunks) == "" and finish_reasons(chunks) == ["content_filter"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7


# (Gemini HTTP status, Google status) -> (openai exception, HTTP status, OpenAI error type, OpenAI error code)
ERRORS = [
    ((400, "INVALID_ARGUMENT"), (openai.BadRequestError, 400, "invalid_request_error", None)),
    ((400, "FAILED_PRECONDITION"), (openai.BadRequestError, 400, "invalid_request_error", None)),
    ((401, "UNAUTHENTICATED"), (openai.InternalServerError, 500, "api_error", None)),
    ((403, "PERMISSION_DENIED"), (openai.InternalServerError, 500, "api_error", None)),
    ((404, "NOT_FOUND"), (openai.NotFoundError, 404, "invalid_request_error", "model_not_found")),
    ((429, "RESOURCE_EXHAUSTED"), (openai.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded")),
    ((500, "INTERNAL"), (openai.InternalServerError, 503, "api_error", "upstream_unavailable")),
    ((503, "UNAVAILABLE"), (openai.InternalServerError, 503, "api_error", "upstream_unavailable")),
    ((504, "DEADLINE_EXCEEDED"), (openai.InternalServerError, 504, "api_error", "upstream_timeout")),
]


@pytest.mark.parametrize(("gemini", "expected"), ERRORS, ids=[f"{c}-{s}" for (c, s), _ in ERRORS])
async def test_each_error_before_the_stream_and_on_its_first_iteration(
    client: openai.AsyncOpenAI,
    upstream: GeminiUpstream,
    gemini: tuple[int, str],
    expected: tuple[type[openai.APIStatusError], int, str, str | None],
) -> None:
    code, status = gemini
    kind, http_status, error_type, error_code = expected
    error = google_error(code, f"fake upstream error {status}", status)
    # Before the stream (generateContent), on the first iteration of a stream that failed with an HTTP status, and
    # on the first iteration of a stream whose first event is an error: all three are a real HTTP status.
    for setup, stream in (("status", False), ("status", True), ("first-event", True)):
        upstream.error_status, upstream.error_body, upstream.stream_error_after = None, None, None
        if setup == "status":
            upstream.error_status, upstream.error_body = code, error
        else:
            upstream.stream_error_after, upstream.stream_error = 0, error
        with pytest.raises(kind) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
        where = f"{setup}, stream={stream}"
        assert raised.value.status_code == http_status, where
        assert (raised.value.type, raised.value.code) == (error_type, error_code), where
        if http_status == 400:
            assert raised.value.message.endswith(f"fake upstream error {status}"), where
        else:
            assert "fake upstream error" not in raised.value.message, where
    assert len(upstream.requests) == (9 if http_status in (429, 503, 504) else 3)  # retryable: 3 tries each


async def test_the_upstream_refusing_our_key_is_never_a_401(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream
) -> None:
    upstream.api_key = "AIza-some-other-key-0000000000"  # 400 INVALID_ARGUMENT, ErrorInfo reason API_KEY_INVALID
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
        assert raised.value.status_code == 500 and raised.value.type == "api_error"
        assert GEMINI_KEY not in str(raised.value.body) and "API key" not in str(raised.value.body)


async def test_an_error_mid_stream_is_an_error_event_not_a_finish(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream
) -> None:
    upstream.stream_error_after = 2
    upstream.stream_error = google_error(429, "Resource has been exhausted.", "RESOURCE_EXHAUSTED")
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            assert chunk.choices[0].finish_reason is None, "no finish_reason may be invented"
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello, "
    assert (raised.value.type, raised.value.code) == ("rate_limit_error", "rate_limit_exceeded")


async def test_a_stream_cut_short_ends_with_an_error_event(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream
) -> None:
    upstream.cut_after = 2  # the body ends cleanly after two chunks, with no finishReason
    base_url = str(client.base_url).rstrip("/")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        response = await http.post(
            f"{base_url}/chat/completions", json={"model": MODEL, "messages": MESSAGES, "stream": True}
        )
    events = [event for event in response.text.split("\n\n") if event]
    assert response.status_code == 200
    assert '"content":"Hello"' in response.text and '"content":", "' in response.text
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":') and "upstream_protocol_error" in events[-2]
    assert '"finish_reason":"stop"' not in response.text


async def test_a_client_disconnect_closes_the_upstream_connection(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream
) -> None:
    upstream.texts = [f"token{i} " for i in range(200)]
    upstream.chunk_delay = 0.05  # ten seconds of stream
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    # The fake sees its connection closed long before the ten-second stream would have ended.
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=3)


async def test_a_refused_connection_fails_fast_with_503(tmp_path: Path, gateway_for: Gateway) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = await gateway_for(write_catalog(tmp_path, [gemini_entry(f"http://127.0.0.1:{port}")]), ENV)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as raised:
                await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
            assert time.monotonic() - started < 2
            assert raised.value.status_code == 503 and raised.value.code == "upstream_unavailable"


async def test_a_missing_key_leaves_the_model_listed_but_unavailable(tmp_path: Path, gateway_for: Gateway) -> None:
    base_url = await gateway_for(write_catalog(tmp_path, [gemini_entry("http://127.0.0.1:9")]), {})
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        assert [model.id async for model in sdk.models.list()] == [MODEL]
        with pytest.raises(openai.InternalServerError) as raised:
            await sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.status_code == 500 and "GEMINI_API_KEY" in raised.value.message


async def test_same_request_to_deepseek_and_gemini_looks_the_same(tmp_path: Path, gateway_for: Gateway) -> None:
    """The promise: same API, different providers, no code changes needed."""
    async with serve_gemini(api_key=GEMINI_KEY) as gemini, serve_openai_upstream() as deepseek:
        deepseek_entry = {"name": "deepseek-v3.2", "provider": "openai", "model": "deepseek-chat",
                          "options": {"base_url": deepseek.url}}  # fmt: skip
        catalog = write_catalog(tmp_path, [deepseek_entry, gemini_entry(gemini.url)])
        base_url = await gateway_for(catalog, ENV)
        seen: dict[str, Any] = {}
        async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
            for model in ("deepseek-v3.2", MODEL):
                plain = await sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=32)
                stream = await sdk.chat.completions.create(
                    model=model, messages=MESSAGES, max_tokens=32, stream=True, stream_options={"include_usage": True}
                )
                chunks = [chunk async for chunk in stream]
                assert plain.usage is not None and chunks[-1].usage is not None
                seen[model] = (
                    plain.object,
                    plain.choices[0].message.role,
                    plain.choices[0].message.content,
                    plain.choices[0].finish_reason,
                    plain.usage.model_dump(),
                    [c.object for c in chunks],
                    [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices],
                    finish_reasons(chunks),
                    chunks[-1].usage.model_dump(),
                )
            deepseek.error_status = gemini.error_status = 429
            for model in ("deepseek-v3.2", MODEL):
                with pytest.raises(openai.RateLimitError) as raised:
                    await sdk.chat.completions.create(model=model, messages=MESSAGES)
                seen[f"{model} 429"] = (raised.value.status_code, raised.value.type, raised.value.code)
    assert seen["deepseek-v3.2"] == seen[MODEL]
    assert seen["deepseek-v3.2 429"] == seen[f"{MODEL} 429"]


# --- Issue 8: tools, structured output and several choices, end to end --------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": SCHEMA},
    }
]
DECLARATIONS = [
    {
        "functionDeclarations": [
            {"name": "get_weather", "description": "The weather in a city", "parameters_json_schema": SCHEMA}
        ]
    }
]
QUESTION: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
SIGNATURE = b"\xfb\xff\xbfsig"
SIGNED_CALL = {
    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},  # no id: Gemini often sends none
    "thoughtSignature": base64.b64encode(SIGNATURE).decode(),
}
MINTED_ID = re.compile(r"call_[0-9a-f]{24}~ts~-_-_c2ln")  # the synthesised id, carrying the signature


def tool_call_pieces(chunks: list[Any]) -> list[tuple[int, int, str | None, str | None, str | None]]:
    """(choice, index, id, name, arguments) of every tool-call delta, in order."""
    return [
        (
            choice.index,
            call.index,
            call.id,
            call.function and call.function.name,
            call.function and call.function.arguments,
        )
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_tool_loop_call_result_answer(
    client: openai.AsyncOpenAI, upstream: GeminiUpstream, stream: bool
) -> None:
    upstream.texts, upstream.function_calls = [], [SIGNED_CALL]
    if stream:
        chunks = await stream_all(client, messages=QUESTION, tools=TOOLS)
        [(_, _, call_id, name, arguments)] = tool_call_pieces(chunks)  # the whole call in its first delta
        assert finish_reasons(chunks) == ["tool_calls"]
        assert content_of(chunks) == ""
        assistant: dict[str, Any] = {
            "role": "assistant",
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        }
    else:
        first = await client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        [call] = choice.message.tool_calls or []
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        assert call.type == "function"
        assistant = choice.message.model_dump(exclude_none=True)
    assert MINTED_ID.fullmatch(call_id or "")
    assert (name, arguments) == ("get_weather", '{"city":"Paris"}')

    upstream.texts, upstream.function_calls = ["Sunny, ", "21 °C."], []
    history = [*QUESTION, assistant, {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'}]
    if stream:
        final = await stream_all(client, messages=history, tools=TOOLS)
        assert content_of(final) == "Sunny, 21 °C." and finish_reasons(final) == ["stop"]
    else:
        answer = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
        assert answer.choices[0].message.content == "Sunny, 21 °C." and answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.tool_calls is None
    first_body, second_body = (request.body for request in upstream.requests)
    assert first_body == {
        "contents": [{"role": "user", "parts": [{"text": "Weather in Paris?"}]}],
        "tools": DECLARATIONS,
        "generationConfig": {},
    }
    assert second_body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            # the thought signature is back on its part (base64url, as google-genai sends bytes); no id was minted
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "-_-_c2ln"}
            ],
        },
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}]},
    ]


async def test_two_parallel_tool_calls_in_one_stream(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    upstream.texts, upstream.calls_in_one_chunk = ["Checking."], True  # both calls in one Gemini chunk
    upstream.function_calls = [
        SIGNED_CALL,
        {"functionCall": {"id": "fc-2", "name": "get_weather", "args": {"city": "Rome"}}},
    ]
    chunks = await stream_all(client, messages=QUESTION, tools=TOOLS, tool_choice="required")
    pieces = tool_call_pieces(chunks)
    assert MINTED_ID.fullmatch(pieces[0][2] or "")
    assert pieces == [
        (0, 0, pieces[0][2], "get_weather", '{"city":"Paris"}'),
        (0, 1, "fc-2", "get_weather", '{"city":"Rome"}'),  # Gemini's own id, unsigned
    ]
    assert content_of(chunks) == "Checking." and finish_reasons(chunks) == ["tool_calls"]
    assert upstream.requests[0].body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    plain = await client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=named, parallel_tool_calls=False
    )
    [call] = plain.choices[0].message.tool_calls or []  # the first call only
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Paris"}')
    assert plain.choices[0].message.content == "Checking." and plain.choices[0].finish_reason == "tool_calls"
    assert upstream.requests[1].body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_structured_output(client: openai.AsyncOpenAI, upstream: GeminiUpstream, stream: bool) -> None:
    upstream.texts = ['{"city":', '"Paris"}']
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
    if stream:
        chunks = await stream_all(client, messages=QUESTION, response_format=response_format)
        content, finish = content_of(chunks), finish_reasons(chunks)
    else:
        reply = await client.chat.completions.create(model=MODEL, messages=QUESTION, response_format=response_format)
        content, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    assert json.loads(content) == {"city": "Paris"} and finish == ["stop"]
    assert upstream.requests[0].body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": SCHEMA,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_several_choices(client: openai.AsyncOpenAI, upstream: GeminiUpstream, stream: bool) -> None:
    upstream.texts = ["Hi", "!"]
    upstream.extra_candidates = [Candidate(texts=["Hello", " there"], finish_reason="MAX_TOKENS")]
    if stream:
        chunks = await stream_all(client, n=2, seed=7, stream_options={"include_usage": True})
        contents: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in chunks:
            for choice in chunk.choices:
                contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert contents == {0: "Hi!", 1: "Hello there"} and finishes == {0: "stop", 1: "length"}
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11
    else:
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=7)
        assert [(c.index, c.message.content, c.finish_reason) for c in reply.choices] == [
            (0, "Hi!", "stop"),
            (1, "Hello there", "length"),
        ]
    assert upstream.requests[0].body["generationConfig"] == {"candidateCount": 2, "seed": 7}


async def test_log_probabilities_are_refused(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, stream=stream)
        assert raised.value.param == "logprobs"
    assert upstream.requests == []


async def test_the_same_tool_loop_on_deepseek_and_gemini(tmp_path: Path, gateway_for: Gateway) -> None:
    """The agent loop written against the OpenAI SDK works unchanged on both; only the call ids differ."""
    async with serve_gemini(api_key=GEMINI_KEY) as gemini, serve_openai_upstream() as deepseek:
        deepseek_entry = {"name": "deepseek-v3.2", "provider": "openai", "model": "deepseek-chat",
                          "options": {"base_url": deepseek.url}}  # fmt: skip
        base_url = await gateway_for(write_catalog(tmp_path, [deepseek_entry, gemini_entry(gemini.url)]), ENV)
        seen: dict[str, Any] = {}
        async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
            for model in ("deepseek-v3.2", MODEL):
                for stream in (False, True):
                    gemini.texts, gemini.function_calls = [], [SIGNED_CALL]
                    deepseek.chunks, deepseek.finish_reason = [], "tool_calls"
                    deepseek.tool_calls = [FakeToolCall("call_ds1", "get_weather", ('{"city":', '"Paris"}'))]
                    steps: list[Any] = []
                    history = list(QUESTION)
                    for _ in range(2):  # call the tool, then answer
                        message, finish = await _ask(sdk, model, history, stream)
                        steps.append((message.get("content") or "", finish, [
                            (c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                            for c in message.get("tool_calls", [])
                        ]))  # fmt: skip
                        history.append(message)
                        history.extend(
                            {"role": "tool", "tool_call_id": c["id"], "content": '{"temp_c": 21}'}
                            for c in message.get("tool_calls", [])
                        )
                        gemini.texts, gemini.function_calls = ["Sunny."], []
                        deepseek.chunks, deepseek.finish_reason, deepseek.tool_calls = ["Sunny."], "stop", []
                    seen[f"{model} stream={stream}"] = steps
    expected = [("", "tool_calls", [("function", "get_weather", {"city": "Paris"})]), ("Sunny.", "stop", [])]
    assert seen == {key: expected for key in seen} and len(seen) == 4


async def test_a_conversation_begun_on_another_model_continues_on_gemini(tmp_path: Path, gateway_for: Gateway) -> None:
    """DeepSeek made the tool call, so it carries no thought signature: Gemini 3 gets Google's documented placeholder
    (the fake refuses an unsigned call in the current turn, as Gemini 3 does), Gemini 2.5 gets the call as it is."""
    async with serve_gemini(api_key=GEMINI_KEY) as gemini, serve_openai_upstream() as deepseek:
        deepseek_entry = {"name": "deepseek-v3.2", "provider": "openai", "model": "deepseek-chat",
                          "options": {"base_url": deepseek.url}}  # fmt: skip
        catalog = [
            deepseek_entry,
            gemini_entry(gemini.url),
            gemini_entry(gemini.url, name="gemini-2.5-flash", model="gemini-2.5-flash"),
        ]
        base_url = await gateway_for(write_catalog(tmp_path, catalog), ENV)
        deepseek.chunks, deepseek.finish_reason = [], "tool_calls"
        deepseek.tool_calls = [FakeToolCall("call_ds1", "get_weather", ('{"city":', '"Paris"}'))]
        gemini.texts = ["Sunny."]
        async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
            message, _ = await _ask(sdk, "deepseek-v3.2", list(QUESTION), stream=False)
            history = [*QUESTION, message, {"role": "tool", "tool_call_id": "call_ds1", "content": '{"temp_c": 21}'}]
            for model in (MODEL, "gemini-2.5-flash"):
                for stream in (False, True):
                    answer, finish = await _ask(sdk, model, history, stream)
                    assert (answer["content"], finish) == ("Sunny.", "stop")
    placeholder = {
        "thoughtSignature": "c2tpcF90aG91Z2h0X3NpZ25hdHVyZV92YWxpZGF0b3I="
    }  # b"skip_thought_signature_validator"
    for request, signed in zip(gemini.requests, [placeholder, placeholder, {}, {}], strict=True):
        assert request.body["contents"] == [
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"id": "call_ds1", "name": "get_weather", "args": {"city": "Paris"}}, **signed}
                ],
            },
            {
                "role": "user",
                "parts": [{"functionResponse": {"id": "call_ds1", "name": "get_weather", "response": {"temp_c": 21}}}],
            },
        ]
    assert [request.model for request in gemini.requests] == [MODEL, MODEL, "gemini-2.5-flash", "gemini-2.5-flash"]


async def _ask(sdk: openai.AsyncOpenAI, model: str, history: list[Any], stream: bool) -> tuple[dict[str, Any], str]:
    """The assistant message as an agent loop rebuilds it (whole, or from the stream), and the finish reason."""
    if not stream:
        reply = await sdk.chat.completions.create(model=model, messages=history, tools=TOOLS)
        return reply.choices[0].message.model_dump(exclude_none=True), reply.choices[0].finish_reason
    chunks = await stream_all(sdk, model=model, messages=history, tools=TOOLS)
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"type": "function", "function": {"name": "", "arguments": ""}})
                if delta.id:
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["function"]["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["function"]["arguments"] += delta.function.arguments
    message: dict[str, Any] = {"role": "assistant", "content": content_of(chunks)}
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    [finish] = finish_reasons(chunks)
    return message, finish
