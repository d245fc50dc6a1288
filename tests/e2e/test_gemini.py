"""The whole path to Gemini: openai SDK -> bridge -> core -> `gemini` provider (real google-genai) -> the fake."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.gemini import GeminiUpstream, google_error, serve_gemini
from tests.fakes.openai_upstream import serve_openai_upstream

MODEL = "gemini-3-flash-preview"
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
ENV = {"GEMINI_API_KEY": GEMINI_KEY}
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
Gateway = Callable[..., Awaitable[str]]


def gemini_entry(base_url: str, name: str = MODEL) -> dict[str, Any]:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": base_url, "timeout_seconds": 5}
    return {"name": name, "provider": "gemini", "model": MODEL, "owned_by": "google", "options": options}


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
        model=MODEL, messages=request.pop("messages", MESSAGES), stream=True, **request
    )
    return [chunk async for chunk in stream]


def content_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_of(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


async def test_text_streaming_and_not(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    chunks = await stream_all(client, stream_options={"include_usage": True})
    assert plain.model == MODEL and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.content == "Hello, world!"
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (7, 4, 11)
    assert [c.choices[0].delta.content for c in chunks if c.choices][1:5] == ["Hello", ", ", "world", "!"]
    assert finish_of(chunks) == ["stop"]
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
        streamed[gemini] = finish_of(await stream_all(client))
    assert plain == FINISH_REASONS
    assert streamed == {gemini: [openai_reason] for gemini, openai_reason in FINISH_REASONS.items()}


async def test_a_function_call_finishes_with_tool_calls(client: openai.AsyncOpenAI, upstream: GeminiUpstream) -> None:
    upstream.function_call = {"name": "get_weather", "args": {"city": "Paris"}}
    plain = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.choices[0].finish_reason == "tool_calls"
    assert finish_of(await stream_all(client)) == ["tool_calls"]


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
    assert content_of(chunks) == "" and finish_of(chunks) == ["content_filter"]
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
    assert len(upstream.requests) == 3  # the gateway never retried


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
                    finish_of(chunks),
                    chunks[-1].usage.model_dump(),
                )
            deepseek.error_status = gemini.error_status = 429
            for model in ("deepseek-v3.2", MODEL):
                with pytest.raises(openai.RateLimitError) as raised:
                    await sdk.chat.completions.create(model=model, messages=MESSAGES)
                seen[f"{model} 429"] = (raised.value.status_code, raised.value.type, raised.value.code)
    assert seen["deepseek-v3.2"] == seen[MODEL]
    assert seen["deepseek-v3.2 429"] == seen[f"{MODEL} 429"]
