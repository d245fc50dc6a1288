"""The `anthropic` Python SDK (sync and async, `messages.create` and `messages.stream`) against the real bridge and
core, on every provider: the Bedrock, Gemini and OpenAI-compatible fakes and the embedded model.

Each test checks what the SDK assembled and, where it matters, the exact upstream request the Messages request
became (tool results, thinking signatures, stop sequences, images).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from services.settings import DEFAULT_CATALOG
from tests.conftest import API_KEY, running_bridge, running_core, running_gateway, write_catalog
from tests.fakes.bedrock import BedrockUpstream, ToolUse, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import GeminiUpstream, count_tokens, serve_gemini
from tests.fakes.openai_upstream import FakeToolCall, OpenAIUpstream, serve_openai_upstream

GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
BEDROCK, GEMINI, OPENAI = "deepseek-v3.2", "gemini-3-flash-preview", "gpt-compatible"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


@dataclass
class Fakes:
    bedrock: BedrockUpstream
    gemini: GeminiUpstream
    openai: OpenAIUpstream
    base_url: str  # the bridge's root, as Anthropic's SDKs take it (no /v1)

    def sync(self, api_key: str = API_KEY) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base_url, api_key=api_key, max_retries=0)

    def client(self, api_key: str = API_KEY) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.base_url, api_key=api_key, max_retries=0)


@pytest.fixture
async def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Fakes]:
    use_fake_credentials(monkeypatch, tmp_path)
    async with AsyncExitStack() as stack:
        bedrock = await stack.enter_async_context(serve_bedrock())
        gemini = await stack.enter_async_context(serve_gemini(api_key=GEMINI_KEY))
        upstream = await stack.enter_async_context(serve_openai_upstream(api_key=UPSTREAM_KEY))
        catalog = [
            {"name": BEDROCK, "provider": "bedrock", "model": "deepseek.v3.2",
             "options": {"region": "us-east-1", "endpoint_url": bedrock.url, "read_timeout_seconds": 5}},
            {"name": GEMINI, "provider": "gemini", "model": "gemini-3-flash-preview",
             "options": {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url, "timeout_seconds": 5}},
            {"name": OPENAI, "provider": "openai", "model": "fake-model",
             "options": {"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY", "timeout_seconds": 5}},
        ]  # fmt: skip
        env = {"GEMINI_API_KEY": GEMINI_KEY, "UPSTREAM_KEY": UPSTREAM_KEY}
        openai_url = await stack.enter_async_context(running_gateway(write_catalog(tmp_path, catalog), env))
        yield Fakes(bedrock, gemini, upstream, openai_url.removesuffix("/v1"))


@pytest.fixture
async def local_url() -> AsyncIterator[str]:
    async with running_gateway(DEFAULT_CATALOG) as openai_url:
        yield openai_url.removesuffix("/v1")


def texts(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


# -- text, on every provider ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [BEDROCK, GEMINI, OPENAI])
async def test_create_and_stream_give_the_same_message(fakes: Fakes, model: str) -> None:
    async with fakes.client() as client:
        created = await client.messages.create(
            model=model, max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Hello?"}]
        )
        async with client.messages.stream(
            model=model, max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Hello?"}]
        ) as stream:
            pieces = [text async for text in stream.text_stream]
            streamed = await stream.get_final_message()
    for message in (created, streamed):
        assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
        assert message.model == model
        assert texts(message) == "Hello, world!"
        assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
        assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 4)
    assert "".join(pieces) == "Hello, world!" and len(pieces) == 4
    assert created.id != streamed.id


async def test_the_sync_client_too(fakes: Fakes) -> None:
    def run() -> tuple[anthropic.types.Message, list[str], anthropic.types.Message]:
        with fakes.sync() as client:
            message = client.messages.create(model=BEDROCK, max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
            with client.messages.stream(model=BEDROCK, max_tokens=50,
                                        messages=[{"role": "user", "content": "Hi"}]) as s:  # fmt: skip
                events = [event.type for event in s]
                final = s.get_final_message()
        return message, events, final

    message, events, final = await asyncio.to_thread(run)  # the gateway serves on this test's event loop
    assert texts(message) == texts(final) == "Hello, world!"
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events and "message_delta" in events


async def test_system_blocks_and_multi_turn_reach_bedrock_as_converse(fakes: Fakes) -> None:
    async with fakes.client() as client:
        await client.messages.create(
            model=BEDROCK, max_tokens=64, stop_sequences=["END"],
            extra_body={"temperature": 0.5, "top_p": 0.9},  # SDK 2.15 dropped them; older clients still send them
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.",
                                                            "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                             {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": base64.b64encode(PNG).decode()}}]},
            ],
            metadata={"user_id": "user-42"},
        )  # fmt: skip
    sent = fakes.bedrock.requests[-1].body
    assert sent["system"] == [{"text": "Be brief."}, {"text": "Be kind."}]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [{"text": "Hello."}]
    assert sent["messages"][2]["content"][0] == {"text": "Look:"}
    assert fakes.bedrock.requests[-1].images == [PNG]
    assert sent["inferenceConfig"] == {"maxTokens": 64, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}


async def test_max_tokens_and_a_known_stop_sequence(fakes: Fakes) -> None:
    fakes.bedrock.stop_reason = "max_tokens"
    async with fakes.client() as client:
        cut = await client.messages.create(model=BEDROCK, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        fakes.bedrock.stop_reason = "stop_sequence"
        stopped = await client.messages.create(
            model=BEDROCK, max_tokens=40, stop_sequences=["END"], messages=[{"role": "user", "content": "Hi"}]
        )
    assert (cut.stop_reason, cut.stop_sequence) == ("max_tokens", None)
    # Bedrock names no sequence, but with one stop sequence asked for, it is the one that matched
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "END")


# -- tools ------------------------------------------------------------------------------------------------------


def _script_two_calls(fakes: Fakes, model: str) -> None:
    if model == BEDROCK:
        fakes.bedrock.text, fakes.bedrock.stop_reason = [], "tool_use"
        fakes.bedrock.tool_uses = [ToolUse("tooluse_p", "get_weather", {"city": "Paris"}),
                                   ToolUse("tooluse_t", "get_weather", {"city": "Tokyo"})]  # fmt: skip
    elif model == GEMINI:
        fakes.gemini.texts, fakes.gemini.calls_in_one_chunk = [], True
        fakes.gemini.function_calls = [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLXBhcmlz"},
            {"functionCall": {"name": "get_weather", "args": {"city": "Tokyo"}}},
        ]
    else:
        fakes.openai.chunks, fakes.openai.finish_reason = [], "tool_calls"
        fakes.openai.tool_calls = [FakeToolCall("call_p", "get_weather", ['{"city":', '"Paris"}']),
                                   FakeToolCall("call_t", "get_weather", ['{"city":"Tokyo"}'])]  # fmt: skip


def _script_answer(fakes: Fakes) -> None:
    fakes.bedrock.text, fakes.bedrock.stop_reason, fakes.bedrock.tool_uses = ["Warmer in Tokyo."], "end_turn", []
    fakes.gemini.texts, fakes.gemini.function_calls = ["Warmer in Tokyo."], []
    fakes.openai.chunks, fakes.openai.finish_reason, fakes.openai.tool_calls = ["Warmer in Tokyo."], "stop", []


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("model", [BEDROCK, GEMINI, OPENAI])
async def test_a_parallel_tool_loop(fakes: Fakes, model: str, stream: bool) -> None:
    """Two calls, their results sent back as tool_result blocks (one an error), the answer."""
    question: list[Any] = [{"role": "user", "content": "Paris or Tokyo?"}]
    async with fakes.client() as client:

        async def turn(messages: list[Any]) -> anthropic.types.Message:
            if not stream:
                return await client.messages.create(model=model, max_tokens=200, tools=TOOLS, messages=messages)
            async with client.messages.stream(model=model, max_tokens=200, tools=TOOLS, messages=messages) as s:
                return await s.get_final_message()

        _script_two_calls(fakes, model)
        first = await turn(question)
        calls = [block for block in first.content if block.type == "tool_use"]
        results = [
            {"type": "tool_result", "tool_use_id": calls[0].id, "content": json.dumps({"celsius": 18})},
            {"type": "tool_result", "tool_use_id": calls[1].id, "is_error": True,
             "content": [{"type": "text", "text": "service down"}]},
        ]  # fmt: skip
        _script_answer(fakes)
        history = [*question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                   {"role": "user", "content": results}]  # fmt: skip
        final = await turn(history)

    assert first.stop_reason == "tool_use"
    assert [(c.name, c.input) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Tokyo"}),
    ]
    assert len({c.id for c in calls}) == 2
    assert (texts(final), final.stop_reason) == ("Warmer in Tokyo.", "end_turn")
    if model == BEDROCK:
        sent = fakes.bedrock.requests[-1].body["messages"]
        assert [b["toolUse"]["toolUseId"] for b in sent[1]["content"]] == ["tooluse_p", "tooluse_t"]
        assert [b["toolResult"] for b in sent[2]["content"]] == [
            {"toolUseId": "tooluse_p", "content": [{"text": '{"celsius": 18}'}]},
            {"toolUseId": "tooluse_t", "content": [{"text": "service down"}], "status": "error"},
        ]
    elif model == GEMINI:
        contents = fakes.gemini.requests[-1].body["contents"]
        # Gemini 3's thought signature made the round trip inside the tool_use id (the fake refuses it otherwise)
        assert contents[1]["parts"][0]["thoughtSignature"] == "c2lnLXBhcmlz"
        responses = [p["functionResponse"] for p in contents[2]["parts"]]
        assert responses[0]["name"] == "get_weather" and "error" in responses[1]["response"]
    else:
        sent = fakes.openai.requests[-1].body["messages"]
        assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_p", "call_t"]
        assert [(m["role"], m["tool_call_id"], m["content"]) for m in sent[2:]] == [
            ("tool", "call_p", '{"celsius": 18}'), ("tool", "call_t", "service down")]  # fmt: skip


async def test_tool_choice_and_disable_parallel_tool_use(fakes: Fakes) -> None:
    async with fakes.client() as client:
        await client.messages.create(
            model=OPENAI, max_tokens=50, tools=TOOLS, messages=[{"role": "user", "content": "Weather?"}],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        )  # fmt: skip
        await client.messages.create(
            model=OPENAI, max_tokens=50, tools=TOOLS, messages=[{"role": "user", "content": "Weather?"}],
            tool_choice={"type": "any"},
        )  # fmt: skip
    first, second = (request.body for request in fakes.openai.requests[-2:])
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert first["parallel_tool_calls"] is False
    assert second["tool_choice"] == "required"
    assert first["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]


# -- thinking ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_bedrock_reasoning_and_its_signature_survive_a_tool_loop(fakes: Fakes, stream: bool) -> None:
    fakes.bedrock.reasoning, fakes.bedrock.reasoning_signature = ["Let me ", "check."], "c2lnbmF0dXJl"
    fakes.bedrock.text, fakes.bedrock.stop_reason = [], "tool_use"
    fakes.bedrock.tool_uses = [ToolUse("tooluse_p", "get_weather", {"city": "Paris"})]
    question: list[Any] = [{"role": "user", "content": "Paris?"}]
    async with fakes.client() as client:
        if stream:
            async with client.messages.stream(model=BEDROCK, max_tokens=300, tools=TOOLS, messages=question) as s:
                kinds = [event.delta.type async for event in s if event.type == "content_block_delta"]
                first = await s.get_final_message()
            assert {"thinking_delta", "signature_delta", "input_json_delta"} <= set(kinds)
        else:
            first = await client.messages.create(model=BEDROCK, max_tokens=300, tools=TOOLS, messages=question)
        thinking = first.content[0]
        assert thinking.type == "thinking"
        assert (thinking.thinking, thinking.signature) == ("Let me check.", "c2lnbmF0dXJl")
        assert [b.type for b in first.content] == ["thinking", "tool_use"]
        _script_answer(fakes)
        fakes.bedrock.reasoning, fakes.bedrock.reasoning_signature = [], None
        call = first.content[1]
        assert call.type == "tool_use"
        history = [
            *question,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]},
        ]
        await client.messages.create(model=BEDROCK, max_tokens=300, tools=TOOLS, messages=history)  # fmt: skip
    assistant = fakes.bedrock.requests[-1].body["messages"][1]["content"]
    assert assistant[0] == {
        "reasoningContent": {"reasoningText": {"text": "Let me check.", "signature": "c2lnbmF0dXJl"}}
    }
    assert assistant[1]["toolUse"]["toolUseId"] == "tooluse_p"


async def test_gemini_thoughts_stream_as_thinking_and_the_budget_reaches_gemini(fakes: Fakes) -> None:
    fakes.gemini.thoughts = ["Hmm, ", "greeting."]
    async with fakes.client() as client:
        async with client.messages.stream(
            model=GEMINI, max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2048},
            messages=[{"role": "user", "content": "Hello?"}],
        ) as stream:  # fmt: skip
            message = await stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Hmm, greeting."  # type: ignore[union-attr]
    thinking = fakes.gemini.requests[-1].body["generationConfig"]["thinkingConfig"]
    # google-genai writes the inner names in snake_case, which the API's proto JSON parser accepts as well
    assert (thinking["thinking_budget"], thinking["include_thoughts"]) == (2048, True)


async def test_thinking_display_omitted_keeps_the_signature_but_not_the_text(fakes: Fakes) -> None:
    fakes.bedrock.reasoning, fakes.bedrock.reasoning_signature = ["secret ", "thoughts"], "c2ln"
    async with fakes.client() as client:
        message = await client.messages.create(
            model=BEDROCK, max_tokens=300, thinking={"type": "adaptive", "display": "omitted"},  # type: ignore[typeddict-item]
            messages=[{"role": "user", "content": "Hi"}],
        )  # fmt: skip
    assert message.content[0].type == "thinking"
    assert (message.content[0].thinking, message.content[0].signature) == ("", "c2ln")


# -- the embedded model -----------------------------------------------------------------------------------------


async def test_the_embedded_model_answers_and_counts(local_url: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=local_url, api_key=API_KEY, max_retries=0) as client:
        question: list[Any] = [{"role": "user", "content": "Name a colour."}]
        greedy = {"temperature": 0}  # SDK 2.15 has no temperature argument; older clients send it
        created = await client.messages.create(
            model="smollm2-135m", max_tokens=12, messages=question, extra_body=greedy
        )
        async with client.messages.stream(model="smollm2-135m", max_tokens=12, messages=question,
                                          extra_body=greedy) as s:  # fmt: skip
            streamed = await s.get_final_message()
        counted = await client.messages.count_tokens(model="smollm2-135m", messages=question)
    assert texts(created) and texts(created) == texts(streamed)  # temperature 0: the same tokens both ways
    assert created.stop_reason in ("end_turn", "max_tokens") and streamed.stop_reason == created.stop_reason
    assert created.usage.input_tokens == streamed.usage.input_tokens == counted.input_tokens > 5
    assert created.usage.output_tokens == streamed.usage.output_tokens > 0


# -- count_tokens -----------------------------------------------------------------------------------------------


async def test_count_tokens_asks_gemini_and_estimates_elsewhere(fakes: Fakes) -> None:
    question: list[Any] = [{"role": "user", "content": "How many tokens is this?"}]
    async with fakes.client() as client:
        gemini = await client.messages.count_tokens(model=GEMINI, messages=question, system="Be brief.")
        bedrock = await client.messages.count_tokens(model=BEDROCK, messages=question, tools=TOOLS)
    [counted] = [r for r in fakes.gemini.requests if r.action == "countTokens"]
    assert gemini.input_tokens == count_tokens(counted.body) > 0  # the fake's own count, relayed
    assert bedrock.input_tokens > 0
    assert not fakes.bedrock.requests  # nothing generated, nothing billed


# -- errors, in Anthropic's shape -------------------------------------------------------------------------------


async def _raw(base_url: str, body: Any, **headers: str | None) -> httpx.Response:
    """A Messages request as Claude Code sends it; a header given as None is left out."""
    sent = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", **headers}
    async with httpx.AsyncClient(base_url=base_url) as http:
        return await http.post("/v1/messages?beta=true", json=body,
                               headers={name: value for name, value in sent.items() if value is not None})  # fmt: skip


async def test_errors_before_the_stream_are_real_statuses(fakes: Fakes) -> None:
    async with fakes.client() as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(
                model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(model=BEDROCK, max_tokens=5, messages=[{"role": "robot", "content": "x"}])  # type: ignore[typeddict-item]
        async with fakes.client(api_key="mm-wrong") as wrong:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await wrong.messages.create(model=BEDROCK, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        fakes.bedrock.error_status, fakes.bedrock.error_type = 429, "ThrottlingException"
        with pytest.raises(anthropic.RateLimitError) as throttled:
            async with client.messages.stream(model=BEDROCK, max_tokens=5, messages=[{"role": "user", "content": "x"}]):
                pass
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": missing.value.body["error"]["message"]},
    }  # type: ignore[index]
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.body["error"]["message"].startswith("messages.0.role: ")  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert throttled.value.status_code == 429


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        ({"model": BEDROCK, "messages": [{"role": "user", "content": "x"}]}, {}, 400, "max_tokens: Field required"),
        ({"model": BEDROCK, "max_tokens": 5, "messages": []}, {}, 400, "messages: "),
        ({"model": BEDROCK, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
         {"anthropic-version": ""}, 400, "anthropic-version: "),
        ({"model": BEDROCK, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
         {}, 400, "messages.0.content.0.type: 'document' blocks are not supported"),
        ({"model": BEDROCK, "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
         {}, 400, "temperature: "),
        ({"model": BEDROCK, "max_tokens": 5, "top_k": 5, "messages": [{"role": "user", "content": "x"}]},
         {}, 400, "top_k"),
        ({"model": BEDROCK, "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
          "messages": [{"role": "user", "content": "x"}]}, {}, 400, "tools.0.type: server tools"),
        ({"model": BEDROCK, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
         {"x-api-key": ""}, 401, "invalid x-api-key"),
    ],
    ids=["no max_tokens", "no messages", "no version", "document", "temperature", "top_k on bedrock", "server tool",
         "empty key"],
)  # fmt: skip
async def test_malformed_requests_name_the_field(
    fakes: Fakes, body: Any, headers: dict[str, str], status: int, message: str
) -> None:
    if headers.get("anthropic-version") == "":
        async with httpx.AsyncClient(base_url=fakes.base_url) as http:
            response = await http.post("/v1/messages", json=body, headers={"x-api-key": API_KEY})
    else:
        response = await _raw(fakes.base_url, body, **headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert message in error["error"]["message"]
    assert not fakes.bedrock.requests


async def test_an_upstream_failure_mid_stream_is_an_error_event(fakes: Fakes) -> None:
    fakes.bedrock.stream_error_after = 2
    async with fakes.client() as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with client.messages.stream(
                model=BEDROCK, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
            ) as stream:
                async for _ in stream:
                    pass
    assert failed.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    fakes.bedrock.stream_error_after = None
    fakes.bedrock.cut_after = 2  # the upstream ends early: no messageStop, no usage
    response = await _raw(fakes.base_url, {"model": BEDROCK, "max_tokens": 50, "stream": True,
                                           "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    events = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error"
    assert "message_stop" not in events and "message_delta" not in events  # never a made-up end_turn


async def test_a_client_that_leaves_closes_the_upstream(fakes: Fakes) -> None:
    fakes.bedrock.text, fakes.bedrock.chunk_delay = ["x"] * 50, 0.05
    async with fakes.client() as client:
        async with client.messages.stream(
            model=BEDROCK, max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    break
    await asyncio.wait_for(fakes.bedrock.disconnected.wait(), timeout=5)


async def test_claude_code_headers_and_query_are_accepted(fakes: Fakes) -> None:
    response = await _raw(
        fakes.base_url,
        {"model": BEDROCK, "max_tokens": 32000, "stream": True, "messages": [{"role": "user", "content": "hi"}],
         "thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "high"},
         "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
         "metadata": {"user_id": '{"device_id":"d"}'},
         "tools": [{**TOOLS[0]}, {"name": "Deferred", "input_schema": {"type": "object"}, "defer_loading": True}]},
        **{"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,no-such-beta-2099-01-01",
           "x-api-key": None, "authorization": f"Bearer {API_KEY}"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event: message_stop" in response.text
    sent = fakes.bedrock.requests[-1].body
    assert [tool["toolSpec"]["name"] for tool in sent["toolConfig"]["tools"]] == ["get_weather"]  # deferred: left out


async def test_gateway_callers_of_either_dialect_share_keys(
    fakes: Fakes, gateway_for: Callable[..., Awaitable[str]]
) -> None:
    async with httpx.AsyncClient(base_url=fakes.base_url) as http:
        bearer = await http.post("/v1/messages", headers={"authorization": f"Bearer {API_KEY}", "anthropic-version":
                                 "2023-06-01"}, json={"model": BEDROCK, "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        nothing = await http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"}, json={})
    assert bearer.status_code == 200 and bearer.json()["content"][0]["text"] == "Hello, world!"
    assert nothing.status_code == 401 and nothing.json()["error"]["type"] == "authentication_error"


async def test_a_silent_model_gets_pings_and_the_stream_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as bedrock:
        options = {"region": "us-east-1", "endpoint_url": bedrock.url, "read_timeout_seconds": 5}
        entry = {"name": BEDROCK, "provider": "bedrock", "model": "deepseek.v3.2", "options": options}
        bedrock.text, bedrock.chunk_delay = ["Slow", " answer."], 0.6  # each delta after 0.6 s of silence
        async with (
            running_core(write_catalog(tmp_path, [entry])) as core,
            running_bridge(f"127.0.0.1:{core.port}", ping_seconds=0.2) as openai_url,
        ):
            body = {"model": BEDROCK, "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            response = await _raw(openai_url.removesuffix("/v1"), body)
    events = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"]  # as Anthropic's API starts its streams
    deltas = [index for index, name in enumerate(events) if name == "content_block_delta"]
    assert "ping" in events[deltas[0] : deltas[1]]  # the model was silent between its two deltas: kept alive
    assert events[-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_an_openai_compatible_upstreams_reasoning_is_a_thinking_block(fakes: Fakes, stream: bool) -> None:
    fakes.openai.reasoning_chunks = ["First, ", "think."]  # vLLM's and DeepSeek's reasoning_content
    question: list[Any] = [{"role": "user", "content": "Hi"}]
    async with fakes.client() as client:
        if stream:
            async with client.messages.stream(model=OPENAI, max_tokens=50, messages=question) as s:
                message = await s.get_final_message()
        else:
            message = await client.messages.create(model=OPENAI, max_tokens=50, messages=question)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert (message.content[0].thinking, message.content[0].signature) == ("First, think.", "")  # type: ignore[union-attr]
    assert texts(message) == "Hello, world!"


HISTORY: list[Any] = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
    {"role": "user", "content": [
        {"type": "text", "text": "Look:"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(PNG).decode()}},
    ]},
]  # fmt: skip


@pytest.mark.parametrize("model", [GEMINI, OPENAI])
async def test_the_same_request_on_gemini_and_openai_upstreams(fakes: Fakes, model: str) -> None:
    """System, multi-turn with an image, stop sequences and max_tokens, as each upstream's own request; the answer
    cut by the token limit is `max_tokens` on both."""
    fakes.gemini.finish_reason, fakes.openai.finish_reason = "MAX_TOKENS", "length"
    async with fakes.client() as client:
        message = await client.messages.create(
            model=model, max_tokens=64, stop_sequences=["END", "STOP"], system="Be brief.", messages=HISTORY
        )
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    if model == GEMINI:
        sent = fakes.gemini.requests[-1].body
        assert sent["systemInstruction"]["parts"] == [{"text": "Be brief."}]
        assert [c["role"] for c in sent["contents"]] == ["user", "model", "user"]
        text, image = sent["contents"][2]["parts"]
        assert text == {"text": "Look:"}
        assert base64.urlsafe_b64decode(image["inlineData"]["data"]) == PNG  # google-genai's urlsafe base64
        assert sent["generationConfig"] == {"maxOutputTokens": 64, "stopSequences": ["END", "STOP"]}
    else:
        sent = fakes.openai.requests[-1].body
        assert sent["messages"][:3] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello."}]  # fmt: skip
        assert sent["messages"][3]["content"] == [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
        ]
        assert sent["stop"] == ["END", "STOP"]
        assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 64
