"""The whole path to AWS Bedrock: openai SDK -> bridge -> core -> `bedrock` provider (real aioboto3) -> the fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import BedrockUpstream, isolate_aws_config, serve_bedrock, use_fake_credentials

PUBLIC = "deepseek-v3.2"
MODEL_ID = "deepseek.v3.2"
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


def bedrock_entry(upstream: BedrockUpstream, **options: Any) -> dict[str, Any]:
    return {
        "name": PUBLIC,
        "provider": "bedrock",
        "model": MODEL_ID,
        "owned_by": "deepseek",
        "options": {"region": "us-east-1", "endpoint_url": upstream.url, "read_timeout_seconds": 5, **options},
    }


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake_credentials(monkeypatch, tmp_path)


@pytest.fixture
async def upstream() -> AsyncIterator[BedrockUpstream]:
    async with serve_bedrock() as fake:
        yield fake


@pytest.fixture
async def client(
    tmp_path: Path, upstream: BedrockUpstream, gateway_for: Callable[..., Awaitable[str]]
) -> AsyncIterator[openai.AsyncOpenAI]:
    base_url = await gateway_for(write_catalog(tmp_path, [bedrock_entry(upstream)]))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


async def stream_all(client: openai.AsyncOpenAI, **request: Any) -> list[Any]:
    stream = await client.chat.completions.create(model=PUBLIC, stream=True, **request)
    return [chunk async for chunk in stream]


def content_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


async def test_text_plain_and_streaming(client: openai.AsyncOpenAI, upstream: BedrockUpstream) -> None:
    plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    chunks = await stream_all(client, messages=MESSAGES, stream_options={"include_usage": True})

    assert plain.model == PUBLIC
    assert plain.choices[0].message.content == "Hello, world!"
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (7, 4, 11)
    assert plain.usage.prompt_tokens_details is None  # the fake reported no cache fields
    assert [c.choices[0].delta.content for c in chunks if c.choices][1:5] == ["Hello", ", ", "world", "!"]
    assert content_of(chunks) == "Hello, world!"
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11
    assert [r.operation for r in upstream.requests] == ["converse", "converse-stream"]
    assert all(r.model_id == MODEL_ID for r in upstream.requests)


async def test_the_exact_converse_request_for_a_multi_turn_conversation(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Bonjour."},
        {"role": "user", "content": [{"type": "text", "text": "Ça va ?"}]},
        # A client replaying a DeepSeek answer sends its reasoning back; Bedrock must never see it.
        {"role": "assistant", "content": "Oui.", "reasoning_content": "SECRET-REASONING: the user greets me."},
        {"role": "user", "content": "Et toi ?"},
    ]
    request = {"messages": messages, "temperature": 0.3, "top_p": 0.9, "max_tokens": 64, "stop": ["\n\n", "FIN"]}
    await client.chat.completions.create(model=PUBLIC, **request)
    await stream_all(client, **request)

    expected = {
        "system": [{"text": "Be brief."}, {"text": "Answer in French."}],
        "messages": [
            {"role": "user", "content": [{"text": "Bonjour."}, {"text": "Ça va ?"}]},
            {"role": "assistant", "content": [{"text": "Oui."}]},
            {"role": "user", "content": [{"text": "Et toi ?"}]},
        ],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.3, "topP": 0.9, "stopSequences": ["\n\n", "FIN"]},
    }
    for sent in upstream.requests:
        assert sent.body == expected
        assert "additionalModelRequestFields" not in sent.body
        assert "SECRET-REASONING" not in json.dumps(sent.body) and "reasoningContent" not in json.dumps(sent.body)


async def test_a_conversation_that_starts_with_the_assistant_is_a_400(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    messages = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=PUBLIC, messages=messages)  # type: ignore[arg-type]
    assert raised.value.param == "messages" and "start with a user message" in raised.value.message
    assert upstream.requests == []


STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    "tool_use": "tool_calls",
}


async def test_every_stop_reason_becomes_its_finish_reason(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    for stop_reason, finish_reason in STOP_REASONS.items():
        upstream.stop_reason = stop_reason
        plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
        chunks = await stream_all(client, messages=MESSAGES)
        assert plain.choices[0].finish_reason == finish_reason, stop_reason
        assert finish_reasons(chunks) == [finish_reason], stop_reason


async def test_usage_counts_cache_reads_and_writes(client: openai.AsyncOpenAI, upstream: BedrockUpstream) -> None:
    upstream.usage = {
        "inputTokens": 5,
        "outputTokens": 4,
        "totalTokens": 39,
        "cacheReadInputTokens": 20,
        "cacheWriteInputTokens": 10,
    }
    plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    chunks = await stream_all(client, messages=MESSAGES, stream_options={"include_usage": True})
    for usage in (plain.usage, chunks[-1].usage):
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (35, 4, 39)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 20


async def test_reasoning_content_streaming_and_not(client: openai.AsyncOpenAI, upstream: BedrockUpstream) -> None:
    upstream.reasoning = ["The user ", "says hello."]
    plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    chunks = await stream_all(client, messages=MESSAGES)

    assert plain.choices[0].message.content == "Hello, world!"
    assert getattr(plain.choices[0].message, "reasoning_content", None) == "The user says hello."
    reasoning = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices]
    assert [piece for piece in reasoning if piece] == ["The user ", "says hello."]
    assert content_of(chunks) == "Hello, world!"  # never merged into the content


PRE_STREAM_ERRORS = [
    # (Bedrock error type, its HTTP status) -> (SDK exception, status, OpenAI type, OpenAI code)
    ("ThrottlingException", 429, openai.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded"),
    ("ValidationException", 400, openai.BadRequestError, 400, "invalid_request_error", None),
    ("ResourceNotFoundException", 404, openai.NotFoundError, 404, "invalid_request_error", "model_not_found"),
    ("AccessDeniedException", 403, openai.InternalServerError, 500, "api_error", None),
    ("UnrecognizedClientException", 403, openai.InternalServerError, 500, "api_error", None),
    ("ModelNotReadyException", 429, openai.InternalServerError, 503, "api_error", "upstream_unavailable"),
    ("ServiceUnavailableException", 503, openai.InternalServerError, 503, "api_error", "upstream_unavailable"),
    ("InternalServerException", 500, openai.InternalServerError, 503, "api_error", "upstream_unavailable"),
    ("ModelErrorException", 424, openai.InternalServerError, 503, "api_error", "upstream_unavailable"),
    ("ModelTimeoutException", 408, openai.InternalServerError, 504, "api_error", "upstream_timeout"),
    ("SomethingNewException", 400, openai.InternalServerError, 500, "api_error", "internal_error"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("error_type", "upstream_status", "sdk_error", "status", "kind", "code"),
    PRE_STREAM_ERRORS,
    ids=[row[0] for row in PRE_STREAM_ERRORS],
)
async def test_errors_before_the_stream_get_their_status_and_body(
    client: openai.AsyncOpenAI,
    upstream: BedrockUpstream,
    error_type: str,
    upstream_status: int,
    sdk_error: type[openai.APIStatusError],
    status: int,
    kind: str,
    code: str | None,
    stream: bool,
) -> None:
    upstream.error_status, upstream.error_type = upstream_status, error_type
    upstream.error_message = "User: arn:aws:iam::123456789012:user/gateway is not authorized"
    with pytest.raises(openai.APIStatusError) as raised:
        if stream:
            await stream_all(client, messages=MESSAGES)
        else:
            await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    assert type(raised.value) is sdk_error  # an AccessDenied is never an AuthenticationError (401)
    assert (raised.value.status_code, raised.value.type, raised.value.code) == (status, kind, code)
    if status != 400:
        assert "arn:aws" not in str(raised.value.body)
    assert len(upstream.requests) == 1


async def test_a_prompt_over_the_window_is_context_length_exceeded(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    upstream.error_status, upstream.error_type = 400, "ValidationException"
    upstream.error_message = "The model returned the following errors: Input is too long for requested model."
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "messages"


IN_STREAM_ERRORS = [
    ("throttlingException", "rate_limit_error", "rate_limit_exceeded"),
    ("validationException", "invalid_request_error", None),
    ("serviceUnavailableException", "api_error", "upstream_unavailable"),
    ("internalServerException", "api_error", "upstream_unavailable"),
    ("modelStreamErrorException", "api_error", "upstream_unavailable"),
]


@pytest.mark.parametrize(("code", "kind", "openai_code"), IN_STREAM_ERRORS, ids=[row[0] for row in IN_STREAM_ERRORS])
async def test_errors_inside_the_stream_raise_api_error_without_a_finish(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, code: str, kind: str, openai_code: str | None
) -> None:
    upstream.stream_error_after, upstream.stream_error_type = 2, code
    stream = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            assert chunk.choices[0].finish_reason is None, "no finish_reason may be invented"
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello, "
    assert (raised.value.type, raised.value.code) == (kind, openai_code)


@pytest.mark.parametrize(
    "script", [{"cut_after": 2}, {"send_message_stop": False}, {"usage": None}], ids=["cut", "no-stop", "no-usage"]
)
async def test_a_truncated_stream_ends_with_an_error_event_not_a_stop(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, script: dict[str, Any]
) -> None:
    for name, value in script.items():
        setattr(upstream, name, value)
    base_url = str(client.base_url).rstrip("/")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        response = await http.post(
            f"{base_url}/chat/completions",
            json={"model": PUBLIC, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
        )
    events = [event for event in response.text.split("\n\n") if event]
    assert response.status_code == 200
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":') and "upstream_protocol_error" in events[-2]
    assert '"finish_reason":"' not in response.text and '"usage":{' not in response.text
    with pytest.raises(openai.APIError):  # and the SDK raises it
        await stream_all(client, messages=MESSAGES)


async def test_a_client_disconnect_closes_the_upstream_stream(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    upstream.text = [f"token{i} " for i in range(200)]
    upstream.chunk_delay = 0.05  # ten seconds of stream
    stream = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    # Bedrock sees its connection closed long before the ten-second stream would have ended.
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=3)


async def test_without_any_aws_credentials_requests_fail_fast_as_a_500(
    tmp_path: Path,
    upstream: BedrockUpstream,
    gateway_for: Callable[..., Awaitable[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    isolate_aws_config(monkeypatch, tmp_path)
    base_url = await gateway_for(write_catalog(tmp_path, [bedrock_entry(upstream)]))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=5) as sdk:
        started = asyncio.get_running_loop().time()
        with pytest.raises(openai.InternalServerError) as raised:
            await sdk.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    assert asyncio.get_running_loop().time() - started < 2
    assert raised.value.status_code == 500 and raised.value.type == "api_error"
    assert "credentials" in raised.value.message
    assert upstream.requests == []


async def test_an_unknown_profile_leaves_the_gateway_up_and_the_model_unavailable(
    tmp_path: Path, upstream: BedrockUpstream, gateway_for: Callable[..., Awaitable[str]]
) -> None:
    base_url = await gateway_for(write_catalog(tmp_path, [bedrock_entry(upstream, profile="missing-profile")]))
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=5) as sdk:
        assert [m.id async for m in sdk.models.list()] == [PUBLIC]
        with pytest.raises(openai.InternalServerError) as raised:
            await sdk.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    assert raised.value.status_code == 500 and "missing-profile" in raised.value.message
