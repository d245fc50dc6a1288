"""Issue 8's "done when": one agent program and one structured-output call, written against the OpenAI SDK, run
unchanged on deepseek-v3.2 (Bedrock, real aioboto3) and gemini-3-flash-preview (Gemini, real google-genai),
streaming and not, with the same client-side result.

The fakes are scripted per step (what the model "decides"), and each step's upstream request is checked: the tool
results the program sent back must reach each provider in its own shape, answering the right calls.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import BedrockUpstream, ToolUse, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import GeminiUpstream, serve_gemini

DEEPSEEK, GEMINI = "deepseek-v3.2", "gemini-3-flash-preview"
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
WEATHER = {"Paris": {"celsius": 18}, "Tokyo": {"celsius": 25}}
FINAL = ["Paris is at 18", "°C and Tokyo at 25°C."]


# ----- the client program: nothing in it knows which provider serves the model -----


async def ask(client: openai.AsyncOpenAI, model: str, messages: list[Any], stream: bool) -> tuple[dict[str, Any], str]:
    """One model turn as the assistant message to append to the history, and its finish reason."""
    if not stream:
        answer = await client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
        choice = answer.choices[0]
        return choice.message.model_dump(exclude_none=True), choice.finish_reason
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = ""
    async for chunk in await client.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            for piece in choice.delta.tool_calls or []:  # assembled by index, as agent frameworks do
                call = calls.setdefault(piece.index, {"type": "function", "function": {"arguments": ""}})
                if piece.id:
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["function"]["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    call["function"]["arguments"] += piece.function.arguments
            finish = choice.finish_reason or finish
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    return message, finish


async def agent(
    client: openai.AsyncOpenAI, model: str, question: str, stream: bool, before_turn: Callable[[int], None]
) -> tuple[str, list[tuple[str, dict[str, Any]]], list[str]]:
    """Ask, run every tool the model calls, send the results back, until the model answers: the answer, the calls
    made (name, arguments) and each turn's finish reason."""
    messages: list[Any] = [{"role": "user", "content": question}]
    calls_made: list[tuple[str, dict[str, Any]]] = []
    finishes: list[str] = []
    for turn in range(4):
        before_turn(turn)
        message, finish = await ask(client, model, messages, stream)
        finishes.append(finish)
        messages.append(message)
        if not message.get("tool_calls"):
            return message["content"], calls_made, finishes
        for call in message["tool_calls"]:
            arguments = json.loads(call["function"]["arguments"])
            calls_made.append((call["function"]["name"], arguments))
            result = WEATHER[arguments["city"]]
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
    raise AssertionError("the model never answered")


class Weather(pydantic.BaseModel):
    city: str
    celsius: float


async def structured(client: openai.AsyncOpenAI, model: str, stream: bool) -> Weather | None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris, as JSON."}]
    if stream:
        async with client.chat.completions.stream(model=model, messages=messages, response_format=Weather) as events:
            answer = await events.get_final_completion()
    else:
        answer = await client.chat.completions.parse(model=model, messages=messages, response_format=Weather)
    assert answer.choices[0].finish_reason == "stop"
    return answer.choices[0].message.parsed


# ----- the providers, scripted -----


@pytest.fixture
async def fakes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[tuple[BedrockUpstream, GeminiUpstream]]:
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as bedrock, serve_gemini(api_key=GEMINI_KEY) as gemini:
        yield bedrock, gemini


@pytest.fixture
async def client(
    tmp_path: Path, fakes: tuple[BedrockUpstream, GeminiUpstream], gateway_for: Callable[..., Awaitable[str]]
) -> AsyncIterator[openai.AsyncOpenAI]:
    bedrock, gemini = fakes
    catalog = [
        {
            "name": DEEPSEEK,
            "provider": "bedrock",
            "model": "deepseek.v3.2",
            "options": {"region": "us-east-1", "endpoint_url": bedrock.url},
        },  # fmt: skip
        {
            "name": GEMINI,
            "provider": "gemini",
            "model": GEMINI,
            "options": {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url},
        },  # fmt: skip
    ]
    base_url = await gateway_for(write_catalog(tmp_path, catalog), {"GEMINI_API_KEY": GEMINI_KEY})
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


def script_bedrock(bedrock: BedrockUpstream, turn: int) -> None:
    """Turn 0: two parallel get_weather calls; turn 1: the answer."""
    if turn == 0:
        bedrock.text, bedrock.stop_reason = [], "tool_use"
        bedrock.tool_uses = [
            ToolUse("tooluse_paris", "get_weather", {"city": "Paris"}),
            ToolUse("tooluse_tokyo", "get_weather", {"city": "Tokyo"}),
        ]
    else:
        bedrock.text, bedrock.stop_reason, bedrock.tool_uses = list(FINAL), "end_turn", []


SIGNATURE = base64.b64encode(b"opaque-thought").decode()


def script_gemini(gemini: GeminiUpstream, turn: int) -> None:
    if turn == 0:
        gemini.texts, gemini.calls_in_one_chunk = [], True
        gemini.function_calls = [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIGNATURE},
            {"functionCall": {"name": "get_weather", "args": {"city": "Tokyo"}}},
        ]
    else:
        gemini.texts, gemini.function_calls = list(FINAL), []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_same_agent_loop_on_bedrock_and_gemini(
    client: openai.AsyncOpenAI, fakes: tuple[BedrockUpstream, GeminiUpstream], stream: bool
) -> None:
    bedrock, gemini = fakes
    results = {
        DEEPSEEK: await agent(client, DEEPSEEK, "Paris or Tokyo?", stream, lambda turn: script_bedrock(bedrock, turn)),
        GEMINI: await agent(client, GEMINI, "Paris or Tokyo?", stream, lambda turn: script_gemini(gemini, turn)),
    }

    expected = (
        "".join(FINAL),
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
        ["tool_calls", "stop"],
    )
    assert results == {DEEPSEEK: expected, GEMINI: expected}

    # The tool results reached Bedrock as toolResult blocks answering each toolUse, after the calls themselves.
    history = bedrock.requests[1].body["messages"]
    assert [turn["role"] for turn in history] == ["user", "assistant", "user"]
    assert [block["toolUse"]["toolUseId"] for block in history[1]["content"]] == ["tooluse_paris", "tooluse_tokyo"]
    assert [block["toolResult"] for block in history[2]["content"]] == [
        {"toolUseId": "tooluse_paris", "content": [{"text": '{"celsius": 18}'}]},
        {"toolUseId": "tooluse_tokyo", "content": [{"text": '{"celsius": 25}'}]},
    ]
    assert "toolConfig" in bedrock.requests[1].body

    # ... and Gemini as functionResponse parts named after the calls, with the thought signature given back.
    contents = gemini.requests[1].body["contents"]
    assert [turn["role"] for turn in contents] == ["user", "model", "user"]
    model_parts = contents[1]["parts"]
    assert [part["functionCall"]["args"] for part in model_parts] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert base64.urlsafe_b64decode(model_parts[0]["thoughtSignature"] + "==") == b"opaque-thought"
    assert [part["functionResponse"]["name"] for part in contents[2]["parts"]] == ["get_weather", "get_weather"]
    assert [part["functionResponse"]["response"] for part in contents[2]["parts"]] == [{"celsius": 18}, {"celsius": 25}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_same_structured_output_call_on_bedrock_and_gemini(
    client: openai.AsyncOpenAI, fakes: tuple[BedrockUpstream, GeminiUpstream], stream: bool
) -> None:
    bedrock, gemini = fakes
    bedrock.text, bedrock.stop_reason = [], "tool_use"  # Bedrock answers through the forced tool
    bedrock.tool_uses = [ToolUse("tooluse_w", "Weather", {"city": "Paris", "celsius": 18})]
    gemini.texts = ['{"city": "Paris", ', '"celsius": 18}']  # Gemini answers JSON text under responseJsonSchema

    answers = {model: await structured(client, model, stream) for model in (DEEPSEEK, GEMINI)}

    assert answers == {DEEPSEEK: Weather(city="Paris", celsius=18), GEMINI: Weather(city="Paris", celsius=18)}
    assert bedrock.requests[0].body["toolConfig"]["toolChoice"] == {"tool": {"name": "Weather"}}
    config = gemini.requests[0].body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"]["required"] == ["city", "celsius"]
