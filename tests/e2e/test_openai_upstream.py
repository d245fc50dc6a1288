"""The whole path to a remote model: openai SDK -> bridge -> core -> `openai` provider -> a fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

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
