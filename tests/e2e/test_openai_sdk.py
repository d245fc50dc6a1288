"""The real `openai` Python SDK, sync and async, against the bridge and the core serving the embedded model."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import API_KEY

MODEL = "smollm2-135m"
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def async_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)


async def test_plain_completion_is_a_real_generation(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        response = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24)
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage is not None
    # The chat template around two messages is far more than a handful of tokens.
    assert usage.prompt_tokens > 15
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_max_tokens_reached_finishes_with_length(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a long essay about the sea."}], max_tokens=5
        )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5


async def test_temperature_zero_is_deterministic_and_multi_turn_changes_the_answer(gateway_url: str) -> None:
    turns = [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And if you multiply that by 3?"},
    ]
    async with async_client(gateway_url) as client:

        async def ask(messages: list[dict[str, str]]) -> openai.types.chat.ChatCompletion:
            return await client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)

        first, again, single_turn = await ask(turns), await ask(turns), await ask(turns[-1:])
    assert first.choices[0].message.content == again.choices[0].message.content
    # The earlier turns reach the model: more prompt tokens than the last message alone.
    assert first.usage is not None and single_turn.usage is not None
    assert first.usage.prompt_tokens > single_turn.usage.prompt_tokens + 10


async def test_stop_sequence_cuts_the_answer_before_it(gateway_url: str) -> None:
    messages = [{"role": "user", "content": "List five colours, separated by commas."}]
    async with async_client(gateway_url) as client:
        free = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
        text = free.choices[0].message.content or ""
        words = text.split()
        assert len(words) >= 4, text
        stop = words[2]
        stopped = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=30, stop=[stop, "\u2603never"]
        )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


async def test_streaming_without_usage(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" and chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no usage chunk (empty choices) without include_usage"
    finishes = [chunk.choices[0].finish_reason for chunk in chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.strip()
    assert len(chunks) >= 4, "tokens arrive as separate chunks"


async def test_streaming_with_usage_ends_with_a_usage_chunk(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 7
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 7
    assert all(chunk.usage is None for chunk in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason == "length"


async def test_streamed_text_equals_the_plain_answer(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        plain = await client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=20, stream=True
        )
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert streamed == plain.choices[0].message.content


async def test_sync_client_plain_and_streaming(gateway_url: str) -> None:
    def run() -> tuple[str, str, list[str]]:
        with openai.OpenAI(base_url=gateway_url, api_key=API_KEY, max_retries=0) as client:
            plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10)
            pieces = [
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model=MODEL, messages=QUESTION, temperature=0, max_tokens=10, stream=True
                )
                if chunk.choices
            ]
            models = [model.id for model in client.models.list()]
        return plain.choices[0].message.content or "", "".join(pieces), models

    plain, streamed, models = await asyncio.to_thread(run)
    assert plain and plain == streamed
    assert models == [MODEL, "deepseek-v3.2", "gemini-3-flash-preview"]


async def test_models_list_and_retrieve(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        listed = await client.models.list()
        model = await client.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
    assert [m.id for m in listed.data] == [MODEL, "deepseek-v3.2", "gemini-3-flash-preview"]
    assert model.id == MODEL and model.owned_by == "modelmax" and model.object == "model"
    assert missing.value.code == "model_not_found"


async def test_unknown_model_is_404_model_not_found(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(model="gpt-5", messages=QUESTION)
        with pytest.raises(openai.NotFoundError) as raised_stream:
            await client.chat.completions.create(model="gpt-5", messages=QUESTION, stream=True)
    for error in (raised.value, raised_stream.value):
        assert error.status_code == 404
        assert error.code == "model_not_found"
        assert error.param == "model"


async def test_wrong_key_is_401(gateway_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=gateway_url, api_key="mm-wrong-key-0123456789", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.chat.completions.create(model=MODEL, messages=QUESTION)
    assert raised.value.code == "invalid_api_key"
    assert "mm-wrong-key" not in str(raised.value)


async def test_default_cloud_models_without_credentials_answer_500_naming_what_to_set(gateway_url: str) -> None:
    async with async_client(gateway_url) as client:
        with pytest.raises(openai.InternalServerError) as gemini:
            await client.chat.completions.create(model="gemini-3-flash-preview", messages=QUESTION)
        with pytest.raises(openai.InternalServerError) as bedrock:
            await client.chat.completions.create(model="deepseek-v3.2", messages=QUESTION, stream=True)
    assert "GEMINI_API_KEY" in gemini.value.message
    assert "AWS credentials" in bedrock.value.message
