"""The `gemini` provider: its tables, and the real google-genai client driven through its backend against the fake."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import pytest
from google.genai import types

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, CatalogError, MissingSecret
from services.completion.validation import check_supported
from services.errors import GatewayError
from services.providers import FEATURES, Provider
from services.providers.gemini import GeminiBackend, GeminiProvider, create_backend
from services.providers.gemini import errors as gemini_errors
from services.providers.gemini import tools as gemini_tools
from services.providers.gemini import translate as tr
from tests.fakes.gemini import Candidate, GeminiUpstream, count_tokens, google_error, serve_gemini

R = pb.ErrorReason
F = pb.FinishReason
KEY = "AIza-gateway-secret-0123456789"
ENV = {"GEMINI_API_KEY": KEY}
MODEL = "gemini-3-flash-preview"
MODES = pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])


def make_entry(options: Mapping[str, Any], *, name: str = "gemini-test", model: str = MODEL) -> CatalogEntry:
    return CatalogEntry(name, "gemini", model, "google", dict(options), where=f"catalog.yaml: models[0] ({name})")


def make_params(*messages: tuple[int, str], **fields: Any) -> pb.CompletionParams:
    turns = [pb.Message(role=role, content=text) for role, text in messages or [(pb.Role.ROLE_USER, "Say hello")]]
    return pb.CompletionParams(model="gemini-test", messages=turns, **fields)


async def collect(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> tuple[list[svc.StreamCompletionResponse], svc.CompletionFinish]:
    """Every event before the finish, and the finish; checks that the finish comes last and exactly once."""
    events: list[svc.StreamCompletionResponse] = []
    finish: svc.CompletionFinish | None = None
    async with aclosing(provider.stream(params or make_params(), incremental=incremental)) as stream:  # type: ignore[type-var]
        async for event in stream:
            assert finish is None, "an event after the finish"
            if event.WhichOneof("event") == "finish":
                finish = event.finish
            else:
                events.append(event)
    assert finish is not None
    return events, finish


async def run(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> tuple[list[tuple[str, Any]], svc.CompletionFinish]:
    """(kind, text) of each delta ((kind, ToolCallDelta) for tool calls) of choice 0, and the finish."""
    deltas: list[tuple[str, Any]] = []
    events, finish = await collect(provider, params, incremental=incremental)
    for event in events:
        kind = event.WhichOneof("event")
        assert getattr(event, kind).choice_index == 0
        if kind == "tool_call":
            deltas.append((kind, event.tool_call))
        else:
            assert getattr(event, kind).text, "deltas are never empty"
            deltas.append((kind, getattr(event, kind).text))
    return deltas, finish


async def fail(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await run(provider, params, incremental=incremental)
    assert info.value.provider == "gemini"
    assert KEY not in info.value.message
    return info.value


@pytest.fixture
async def upstream() -> AsyncIterator[GeminiUpstream]:
    async with serve_gemini(api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def backend(upstream: GeminiUpstream) -> AsyncIterator[GeminiBackend]:
    backend = create_backend(ENV)  # depends on `upstream` so its clients close before the server stops
    yield backend
    await backend.aclose()


@pytest.fixture
async def provider(upstream: GeminiUpstream, backend: GeminiBackend) -> Provider:
    return await backend.provider_for(make_entry({"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}))


# --- The request ---------------------------------------------------------------------------------------------------


@MODES
async def test_sends_the_generate_content_request(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    params = make_params(
        (pb.Role.ROLE_SYSTEM, "Be brief."),
        (pb.Role.ROLE_USER, "Hi."),
        (pb.Role.ROLE_ASSISTANT, "Hello."),
        (pb.Role.ROLE_SYSTEM, "Answer in English."),
        (pb.Role.ROLE_USER, "Say hello"),
        (pb.Role.ROLE_USER, "again"),
        temperature=0.0,
        top_p=0.5,
        max_tokens=50,
        stop_sequences=["\n\n", "END"],
    )
    deltas, finish = await run(provider, params, incremental=incremental)
    assert deltas == [("delta", "Hello"), ("delta", ", "), ("delta", "world"), ("delta", "!")]
    assert finish.choices[0].finish_reason == F.FINISH_REASON_STOP
    [request] = upstream.requests
    assert (request.version, request.model) == ("v1beta", MODEL)
    assert (request.action, request.query) == (
        ("streamGenerateContent", "alt=sse") if incremental else ("generateContent", "")
    )
    assert request.headers["x-goog-api-key"] == KEY
    assert request.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Hi."}]},
            {"role": "model", "parts": [{"text": "Hello."}]},
            {"role": "user", "parts": [{"text": "Say hello"}, {"text": "again"}]},  # consecutive turns merged
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in English."}]},
        "generationConfig": {
            "temperature": 0.0,  # set to zero is still set
            "topP": 0.5,
            "maxOutputTokens": 50,
            "stopSequences": ["\n\n", "END"],
        },
    }


async def test_sends_only_what_the_caller_set(upstream: GeminiUpstream, provider: Provider) -> None:
    await run(provider, make_params(top_p=0.25))
    [request] = upstream.requests
    assert request.body == {
        "contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
        "generationConfig": {"topP": 0.25},
    }
    await run(provider, make_params())
    # The config always carries SDK-side settings, so google-genai sends an empty generationConfig.
    assert upstream.requests[1].body == {
        "contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
        "generationConfig": {},
    }


async def test_options_choose_the_api_version_and_ask_for_thoughts(
    upstream: GeminiUpstream, backend: GeminiBackend
) -> None:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url, "api_version": "v1", "include_thoughts": True}
    provider = await backend.provider_for(make_entry(options, model="models/gemini-2.5-pro"))
    await run(provider)
    [request] = upstream.requests
    assert (request.version, request.model) == ("v1", "gemini-2.5-pro")
    # google-genai copies ThinkingConfig with its Python field names; Google's JSON parsing accepts both spellings.
    assert request.body["generationConfig"] == {"thinkingConfig": {"include_thoughts": True}}


async def test_a_conversation_of_only_system_messages_is_refused_before_sending(
    upstream: GeminiUpstream, provider: Provider
) -> None:
    exc = await fail(provider, make_params((pb.Role.ROLE_SYSTEM, "You are helpful.")))
    assert exc.reason == R.ERROR_REASON_INVALID_REQUEST
    assert exc.field == "messages"
    assert upstream.requests == []


def test_assistant_turns_become_model_turns_wherever_they_are() -> None:
    params = make_params((pb.Role.ROLE_ASSISTANT, "a"), (pb.Role.ROLE_ASSISTANT, "b"), (pb.Role.ROLE_USER, "c"))
    contents, config = tr.to_request(params, "m", {}, placeholder_signatures=True)
    assert contents == [
        {"role": "model", "parts": [{"text": "a"}, {"text": "b"}]},
        {"role": "user", "parts": [{"text": "c"}]},
    ]
    assert config == {}


# --- The answer ----------------------------------------------------------------------------------------------------


@MODES
async def test_thoughts_are_reasoning_and_usage_counts_them_as_output(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.thoughts = ["Let me ", "think."]
    upstream.texts = ["Hi", "!"]
    upstream.usage = {
        "promptTokenCount": 10,
        "candidatesTokenCount": 3,
        "thoughtsTokenCount": 20,
        "cachedContentTokenCount": 4,
        "totalTokenCount": 33,
    }
    deltas, finish = await run(provider, incremental=incremental)
    assert deltas == [("reasoning", "Let me "), ("reasoning", "think."), ("delta", "Hi"), ("delta", "!")]
    assert finish.usage == pb.Usage(
        prompt_tokens=10, completion_tokens=23, total_tokens=33, cached_tokens=4, reasoning_tokens=20
    )


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7},
            pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),  # no details when Gemini reports none
        ),
        (
            {"promptTokenCount": 5, "candidatesTokenCount": 2, "thoughtsTokenCount": 0, "cachedContentTokenCount": 0},
            pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7, cached_tokens=0, reasoning_tokens=0),
        ),
        (
            # totalTokenCount disagrees (it also counts toolUsePromptTokenCount, say): ours stays consistent
            {"promptTokenCount": 5, "candidatesTokenCount": 2, "thoughtsTokenCount": 1, "totalTokenCount": 99},
            pb.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, reasoning_tokens=1),
        ),
        ({"promptTokenCount": 5}, pb.Usage(prompt_tokens=5, completion_tokens=0, total_tokens=5)),
    ],
    ids=["plain", "zero-details", "total-disagrees", "prompt-only"],
)
async def test_usage(upstream: GeminiUpstream, provider: Provider, usage: dict[str, int], expected: pb.Usage) -> None:
    upstream.usage = usage
    _, finish = await run(provider)
    assert finish.usage == expected


async def test_usage_comes_from_the_final_chunk_even_one_without_parts(
    upstream: GeminiUpstream, provider: Provider
) -> None:
    upstream.final_chunk_without_parts = True  # earlier chunks carry running counts; the last one, the totals
    upstream.separator = "\n\n"
    deltas, finish = await run(provider)
    assert "".join(text for _, text in deltas) == "Hello, world!"
    assert finish == svc.CompletionFinish(
        choices=[svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11),
    )


async def test_no_usage_reported_leaves_it_unset(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.usage = None
    _, finish = await run(provider)
    assert finish.choices[0].finish_reason == F.FINISH_REASON_STOP and not finish.HasField("usage")


@MODES
async def test_a_stop_never_names_a_stop_sequence(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    # Gemini's STOP does not say whether a stop sequence ended the answer, let alone which: the finish leaves it empty.
    _, finish = await run(provider, make_params(stop_sequences=["world", "END"]), incremental=incremental)
    assert list(finish.choices) == [svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)]


def test_every_feature_but_log_probabilities_is_supported() -> None:
    # The core refuses log probabilities before dispatch: no proto field carries them back.
    assert GeminiProvider.supported == set(FEATURES) - {"logprobs"}


@MODES
@pytest.mark.parametrize(("gemini", "expected"), sorted(tr.FINISH_REASONS.items()))
async def test_finish_reasons(
    upstream: GeminiUpstream, provider: Provider, gemini: str, expected: pb.FinishReason.ValueType, incremental: bool
) -> None:
    upstream.finish_reason = gemini
    _, finish = await run(provider, incremental=incremental)
    assert finish.choices[0].finish_reason == expected


@MODES
@pytest.mark.parametrize(
    ("gemini", "expected"), [("STOP", F.FINISH_REASON_TOOL_CALLS), ("MAX_TOKENS", F.FINISH_REASON_LENGTH)]
)
async def test_function_calls_turn_stop_into_tool_calls(
    upstream: GeminiUpstream,
    provider: Provider,
    gemini: str,
    expected: pb.FinishReason.ValueType,
    incremental: bool,
) -> None:
    upstream.finish_reason = gemini
    upstream.function_calls = [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    _, finish = await run(provider, incremental=incremental)
    assert finish.choices[0].finish_reason == expected


@MODES
@pytest.mark.parametrize("gemini", ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "FINISH_REASON_UNSPECIFIED"])
async def test_an_unusable_finish_is_a_protocol_error(
    upstream: GeminiUpstream, provider: Provider, gemini: str, incremental: bool
) -> None:
    upstream.finish_reason = gemini
    exc = await fail(provider, incremental=incremental)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    assert gemini in exc.message


@pytest.mark.filterwarnings("ignore:.* is not a valid FinishReason:UserWarning")  # google-genai warns, then passes it
@pytest.mark.parametrize(
    ("gemini", "expected"),
    [("HARASSMENT_SAFETY", F.FINISH_REASON_CONTENT_FILTER), ("SOMETHING_NEW", F.FINISH_REASON_STOP)],
)
async def test_finish_reasons_newer_than_the_sdk(
    upstream: GeminiUpstream, provider: Provider, gemini: str, expected: pb.FinishReason.ValueType
) -> None:
    upstream.finish_reason = gemini
    _, finish = await run(provider)
    assert finish.choices[0].finish_reason == expected


def test_every_finish_reason_the_sdk_knows_has_a_decision() -> None:
    decided = set(tr.FINISH_REASONS) | tr.UNUSABLE
    assert {reason.value for reason in types.FinishReason} <= decided


@MODES
async def test_a_blocked_prompt_is_a_filtered_empty_answer(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.block_reason = "PROHIBITED_CONTENT"
    deltas, finish = await run(provider, incremental=incremental)
    assert deltas == []
    assert finish == svc.CompletionFinish(
        choices=[svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_CONTENT_FILTER)],
        usage=pb.Usage(prompt_tokens=7, total_tokens=7),
    )


@pytest.mark.parametrize("script", [{"cut_after": 2}, {"finish_reason": None}], ids=["cut-off", "no-finish"])
async def test_a_stream_without_a_finish_reason_is_a_protocol_error(
    upstream: GeminiUpstream, provider: Provider, script: dict[str, Any]
) -> None:
    for name, value in script.items():
        setattr(upstream, name, value)
    exc = await fail(provider)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL  # never a fabricated "stop"
    assert "without a finish reason" in exc.message


# --- Tools, structured output, images and the other parameters: the request ----------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = pb.Tool(name="get_weather", description="Current weather in a city.", parameters=json.dumps(SCHEMA))
CLOCK = pb.Tool(name="get_time")  # no description, no arguments
M = pb.ToolChoiceMode
SIGNATURE = b"\xfb\xff\xbfsig"  # base64 "+/+/c2ln", base64url "-_-_c2ln": the two alphabets differ
SIGNATURE_B64 = base64.b64encode(SIGNATURE).decode()  # as Gemini sends it
# As google-genai sends bytes (thoughtSignature, inlineData.data): base64url, which Google's JSON parsing accepts too.
SIGNATURE_WIRE = base64.urlsafe_b64encode(SIGNATURE).decode()
MINTED_ID = re.compile(r"call_[0-9a-f]{24}")
# Google's documented placeholder for calls Gemini did not sign, as google-genai sends the bytes of its text.
PLACEHOLDER_WIRE = "c2tpcF90aG91Z2h0X3NpZ25hdHVyZV92YWxpZGF0b3I="
assert base64.urlsafe_b64decode(PLACEHOLDER_WIRE) == b"skip_thought_signature_validator"


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_USER, content=text)


def assistant(text: str = "", *calls: tuple[str, str, str]) -> pb.Message:
    tool_calls = [pb.ToolCall(id=i, name=n, arguments=a) for i, n, a in calls]
    return pb.Message(role=pb.Role.ROLE_ASSISTANT, content=text, tool_calls=tool_calls)


def tool(call_id: str, content: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id=call_id, content=content)


def conversation(*messages: pb.Message, **fields: Any) -> pb.CompletionParams:
    return pb.CompletionParams(model="gemini-test", messages=messages, **fields)


@MODES
@pytest.mark.parametrize(
    ("choice", "strict", "config"),
    [
        (None, False, None),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_AUTO), False, {"mode": "AUTO"}),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_NONE), False, {"mode": "NONE"}),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_REQUIRED), False, {"mode": "ANY"}),
        (
            pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_FUNCTION, name="get_time"),
            False,
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
        # strict: calls made with constrained decoding; ANY constrains them already, NONE makes none
        (None, True, {"mode": "VALIDATED"}),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_AUTO), True, {"mode": "VALIDATED"}),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_REQUIRED), True, {"mode": "ANY"}),
        (pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_NONE), True, {"mode": "NONE"}),
    ],
    ids=["unset", "auto", "none", "required", "function", "strict", "strict-auto", "strict-required", "strict-none"],
)
async def test_tools_become_function_declarations_and_tool_choice_a_calling_mode(
    upstream: GeminiUpstream,
    provider: Provider,
    choice: pb.ToolChoice | None,
    strict: bool,
    config: dict[str, Any] | None,
    incremental: bool,
) -> None:
    weather = pb.Tool()
    weather.CopyFrom(WEATHER)
    if strict:
        weather.strict = True
    params = conversation(user("Weather in Paris?"), tools=[weather, CLOCK])
    if choice is not None:
        params.tool_choice.CopyFrom(choice)
    await run(provider, params, incremental=incremental)
    [request] = upstream.requests
    expected: dict[str, Any] = {
        "contents": [{"role": "user", "parts": [{"text": "Weather in Paris?"}]}],
        # google-genai copies each declaration with its Python field names: parameters_json_schema is Gemini's
        # parametersJsonSchema (JSON Schema as given), not the OpenAPI-subset `parameters`.
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Current weather in a city.",
                        "parameters_json_schema": SCHEMA,
                    },
                    {"name": "get_time"},
                ]
            }
        ],
        "generationConfig": {},
    }
    if config is not None:
        expected["toolConfig"] = {"functionCallingConfig": config}
    assert request.body == expected


@MODES
async def test_tool_calls_and_results_in_the_history(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    signed = "fc-1~ts~" + base64.urlsafe_b64encode(SIGNATURE).rstrip(b"=").decode()
    params = conversation(
        user("Weather in Paris, and the time?"),
        assistant("Let me check.", (signed, "get_weather", '{"city": "Paris"}'), ("call_" + "0a" * 12, "get_time", "")),
        tool(signed, '{"temp_c": 21, "sky": "clear"}'),  # a JSON object: the response itself
        tool("call_" + "0a" * 12, "12:00"),  # anything else: {"result": <the text>}
        assistant("", ("toolu_01A", "get_weather", '{"city":"Oslo"}')),  # another provider's id, no text
        tool("toolu_01A", "[1, 2]"),
        user("Thanks."),
        tools=[WEATHER, CLOCK],
    )
    await run(provider, params, incremental=incremental)
    [request] = upstream.requests
    assert request.body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris, and the time?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Let me check."},
                # Gemini's id and thought signature, restored from the id the caller saw
                {
                    "functionCall": {"id": "fc-1", "name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": SIGNATURE_WIRE,
                },
                {"functionCall": {"name": "get_time", "args": {}}},  # the gateway's synthesised id stays with us
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"id": "fc-1", "name": "get_weather", "response": {"temp_c": 21, "sky": "clear"}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "12:00"}}},
            ],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"id": "toolu_01A", "name": "get_weather", "args": {"city": "Oslo"}},
                    "thoughtSignature": PLACEHOLDER_WIRE,  # a call Gemini did not sign, on a Gemini 3 model
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"id": "toolu_01A", "name": "get_weather", "response": {"result": "[1, 2]"}}},
                {"text": "Thanks."},
            ],
        },
    ]


@MODES
async def test_the_id_of_a_call_carries_its_thought_signature_back_to_gemini(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.texts = []
    upstream.function_calls = [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIGNATURE_B64},
        {"functionCall": {"id": "fc-2", "name": "get_weather", "args": {"city": "Oslo"}}},  # Gemini signs the first
    ]
    deltas, finish = await run(
        provider, conversation(user("Paris and Oslo?"), tools=[WEATHER]), incremental=incremental
    )
    [(_, first), (_, second)] = deltas
    base, _, signature = first.id.partition("~ts~")
    assert MINTED_ID.fullmatch(base) and signature == "-_-_c2ln"
    assert second.id == "fc-2"  # Gemini's own id, and no signature to carry
    assert finish.choices[0].finish_reason == F.FINISH_REASON_TOOL_CALLS

    upstream.texts, upstream.function_calls = ["Sunny in both."], []
    history = conversation(
        user("Paris and Oslo?"),
        assistant("", (first.id, first.name, first.arguments), (second.id, second.name, second.arguments)),
        tool(first.id, "sunny"),
        tool(second.id, "sunny"),
        tools=[WEATHER],
    )
    await run(provider, history, incremental=incremental)
    assert upstream.requests[1].body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": SIGNATURE_WIRE,
                },
                {"functionCall": {"id": "fc-2", "name": "get_weather", "args": {"city": "Oslo"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}},
                {"functionResponse": {"id": "fc-2", "name": "get_weather", "response": {"result": "sunny"}}},
            ],
        },
    ]


@MODES
@pytest.mark.parametrize(
    ("model", "placeholder"),
    [("gemini-3-flash-preview", True), ("models/gemini-3.1-pro-preview", True), ("gemini-2.5-flash", False)],
)
async def test_a_history_gemini_did_not_sign_gets_the_placeholder_on_gemini_3(
    upstream: GeminiUpstream, backend: GeminiBackend, model: str, placeholder: bool, incremental: bool
) -> None:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}
    provider = await backend.provider_for(make_entry(options, model=model))
    params = conversation(  # begun on another model: its ids, no thought signatures
        user("Weather in Paris, and the time?"),
        assistant("Let me check.", ("toolu_01A", "get_weather", '{"city":"Paris"}'), ("toolu_01B", "get_time", "")),
        tool("toolu_01A", '{"temp_c": 21}'),
        tool("toolu_01B", "12:00"),
        assistant("Sunny, 21 °C, at noon."),
        user("And Oslo?"),
        assistant("", ("call_ds1", "get_weather", '{"city":"Oslo"}')),
        tool("call_ds1", '{"temp_c": 9}'),
        tools=[WEATHER, CLOCK],
    )
    deltas, finish = await run(provider, params, incremental=incremental)  # Gemini 3 (the fake) checks the turn
    assert (
        "".join(text for _, text in deltas) == "Hello, world!"
        and finish.choices[0].finish_reason == F.FINISH_REASON_STOP
    )
    signed = {"thoughtSignature": PLACEHOLDER_WIRE} if placeholder else {}
    [request] = upstream.requests
    assert request.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris, and the time?"}]},
            {
                "role": "model",
                "parts": [
                    {"text": "Let me check."},
                    # the first call of each step: Gemini 3 checks it (in the current turn), so it gets the placeholder
                    {"functionCall": {"id": "toolu_01A", "name": "get_weather", "args": {"city": "Paris"}}, **signed},
                    {"functionCall": {"id": "toolu_01B", "name": "get_time", "args": {}}},  # later calls: never
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"id": "toolu_01A", "name": "get_weather", "response": {"temp_c": 21}}},
                    {"functionResponse": {"id": "toolu_01B", "name": "get_time", "response": {"result": "12:00"}}},
                ],
            },
            {"role": "model", "parts": [{"text": "Sunny, 21 °C, at noon."}]},
            {"role": "user", "parts": [{"text": "And Oslo?"}]},
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"id": "call_ds1", "name": "get_weather", "args": {"city": "Oslo"}}, **signed}
                ],
            },
            {
                "role": "user",
                "parts": [{"functionResponse": {"id": "call_ds1", "name": "get_weather", "response": {"temp_c": 9}}}],
            },
        ],
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Current weather in a city.",
                        "parameters_json_schema": SCHEMA,
                    },
                    {"name": "get_time"},
                ]
            }
        ],
        "generationConfig": {},
    }


@pytest.mark.parametrize(
    "call_id",
    ["call_abc", "toolu_01A~ts~", "a~ts~not base64!", "a~ts~x", "~ts~", "call_" + "0a" * 12 + "0"],
)
def test_ids_the_gateway_did_not_mint_pass_through_unchanged(call_id: str) -> None:
    assert gemini_tools.restore_call_id(call_id) == (call_id, None)


def test_minted_ids_restore_what_gemini_sent() -> None:
    assert gemini_tools.restore_call_id(gemini_tools.mint_call_id("fc-1", SIGNATURE)) == ("fc-1", SIGNATURE)
    assert gemini_tools.restore_call_id(gemini_tools.mint_call_id("fc-1", None)) == ("fc-1", None)
    assert gemini_tools.restore_call_id(gemini_tools.mint_call_id(None, SIGNATURE)) == (None, SIGNATURE)
    synthesised = gemini_tools.mint_call_id(None, None)
    assert MINTED_ID.fullmatch(synthesised) and gemini_tools.restore_call_id(synthesised) == (None, None)
    assert gemini_tools.mint_call_id(None, None) != synthesised


async def test_images_become_inline_data(upstream: GeminiUpstream, provider: Provider) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    parts = [
        pb.ContentPart(text="What is in"),
        pb.ContentPart(image=pb.Image(data=png, media_type="image/png")),
        pb.ContentPart(text="and"),
        pb.ContentPart(image=pb.Image(data=b"\xff\xd8\xff", media_type="image/jpeg")),
    ]
    await run(provider, conversation(pb.Message(role=pb.Role.ROLE_USER, parts=parts)))
    [request] = upstream.requests
    assert request.body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is in"},
                {"inlineData": {"mime_type": "image/png", "data": base64.urlsafe_b64encode(png).decode()}},
                {"text": "and"},
                {"inlineData": {"mime_type": "image/jpeg", "data": "_9j_"}},  # base64url, as google-genai sends bytes
            ],
        }
    ]


@MODES
@pytest.mark.parametrize(
    ("response_format", "generation_config"),
    [
        (pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_TEXT), {}),
        (
            pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
            {"responseMimeType": "application/json"},
        ),
        (
            pb.ResponseFormat(
                type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                name="weather",
                schema=json.dumps(SCHEMA),
                strict=True,
            ),
            {"responseMimeType": "application/json", "responseJsonSchema": SCHEMA},
        ),
    ],
    ids=["text", "json_object", "json_schema"],
)
async def test_structured_output(
    upstream: GeminiUpstream,
    provider: Provider,
    response_format: pb.ResponseFormat,
    generation_config: dict[str, Any],
    incremental: bool,
) -> None:
    upstream.texts = ['{"city": ', '"Paris"}']
    deltas, finish = await run(provider, make_params(response_format=response_format), incremental=incremental)
    assert "".join(text for _, text in deltas) == '{"city": "Paris"}'  # content, finished as a stop
    assert finish.choices[0].finish_reason == F.FINISH_REASON_STOP
    assert upstream.requests[0].body["generationConfig"] == generation_config


async def test_n_seed_and_penalties(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.extra_candidates = [Candidate(texts=["Hi"])]
    await collect(provider, make_params(choice_count=2, seed=-7, presence_penalty=0.5, frequency_penalty=-1.25))
    upstream.extra_candidates = []
    await run(provider, make_params(choice_count=1, seed=0, presence_penalty=0.0, frequency_penalty=0.0))
    assert [r.body["generationConfig"] for r in upstream.requests] == [
        {"candidateCount": 2, "seed": -7, "presencePenalty": 0.5, "frequencyPenalty": -1.25},
        {"seed": 0},  # n=1 and zero penalties are the defaults
    ]


E = pb.ReasoningEffort


@pytest.mark.parametrize(
    ("model", "effort", "thinking"),
    [
        ("gemini-3-flash-preview", E.REASONING_EFFORT_MINIMAL, {"thinking_level": "MINIMAL"}),
        ("gemini-3-flash-preview", E.REASONING_EFFORT_LOW, {"thinking_level": "LOW"}),
        ("gemini-3-flash-preview", E.REASONING_EFFORT_MEDIUM, {"thinking_level": "MEDIUM"}),
        ("gemini-3-flash-preview", E.REASONING_EFFORT_HIGH, {"thinking_level": "HIGH"}),
        ("gemini-3-flash-preview", E.REASONING_EFFORT_XHIGH, {"thinking_level": "HIGH"}),
        ("gemini-3-pro-preview", E.REASONING_EFFORT_MINIMAL, {"thinking_level": "LOW"}),
        ("gemini-3-pro-preview", E.REASONING_EFFORT_MEDIUM, {"thinking_level": "HIGH"}),
        ("gemini-3.1-pro-preview", E.REASONING_EFFORT_MEDIUM, {"thinking_level": "MEDIUM"}),
        ("models/gemini-2.5-pro", E.REASONING_EFFORT_MINIMAL, {"thinking_budget": 128}),
        ("gemini-2.5-pro", E.REASONING_EFFORT_HIGH, {"thinking_budget": 32768}),
        ("gemini-2.5-flash", E.REASONING_EFFORT_NONE, {"thinking_budget": 0}),
        ("gemini-2.5-flash", E.REASONING_EFFORT_LOW, {"thinking_budget": 1024}),
        ("gemini-2.5-flash-lite", E.REASONING_EFFORT_MINIMAL, {"thinking_budget": 512}),
        ("gemini-2.5-flash-lite", E.REASONING_EFFORT_MEDIUM, {"thinking_budget": 8192}),
        ("gemini-2.5-flash", E.REASONING_EFFORT_XHIGH, {"thinking_budget": 24576}),
    ],
)
async def test_reasoning_effort_becomes_a_thinking_level_or_budget(
    upstream: GeminiUpstream,
    backend: GeminiBackend,
    model: str,
    effort: pb.ReasoningEffort.ValueType,
    thinking: dict[str, Any],
) -> None:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}
    provider = await backend.provider_for(make_entry(options, model=model))
    await run(provider, make_params(reasoning_effort=effort))
    assert upstream.requests[0].body["generationConfig"] == {"thinkingConfig": thinking}


@pytest.mark.parametrize(
    ("model", "effort"),
    [
        ("gemini-3-flash-preview", E.REASONING_EFFORT_NONE),  # Gemini 3 always thinks
        ("gemini-3-pro-preview", E.REASONING_EFFORT_NONE),
        ("gemini-2.5-pro", E.REASONING_EFFORT_NONE),
        ("gemini-2.0-flash", E.REASONING_EFFORT_LOW),  # no thinking setting at all
        ("gemini-flash-latest", E.REASONING_EFFORT_HIGH),  # an alias: its family is unknown
    ],
)
async def test_a_reasoning_effort_the_model_cannot_honour_is_refused(
    upstream: GeminiUpstream, backend: GeminiBackend, model: str, effort: pb.ReasoningEffort.ValueType
) -> None:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}
    provider = await backend.provider_for(make_entry(options, model=model))
    exc = await fail(provider, make_params(reasoning_effort=effort))
    assert (exc.reason, exc.field) == (R.ERROR_REASON_INVALID_REQUEST, "reasoning_effort")
    assert E.Name(effort).removeprefix("REASONING_EFFORT_").lower() in exc.message
    assert upstream.requests == []


async def test_the_catalog_overrides_the_reasoning_effort_table(
    upstream: GeminiUpstream, backend: GeminiBackend
) -> None:
    overrides = {"xhigh": "xhigh", "low": -1, "high": None}  # a newer level, dynamic thinking, refused
    options = {
        "api_key_env": "GEMINI_API_KEY",
        "base_url": upstream.url,
        "reasoning_effort": overrides,
        "include_thoughts": True,
    }
    provider = await backend.provider_for(make_entry(options, model="gemini-3-pro-preview"))
    await run(provider, make_params(reasoning_effort=E.REASONING_EFFORT_XHIGH))
    await run(provider, make_params(reasoning_effort=E.REASONING_EFFORT_LOW))
    await run(provider, make_params(reasoning_effort=E.REASONING_EFFORT_MINIMAL))  # the family's table still applies
    assert [r.body["generationConfig"] for r in upstream.requests] == [
        {"thinkingConfig": {"include_thoughts": True, "thinking_level": "XHIGH"}},
        {"thinkingConfig": {"include_thoughts": True, "thinking_budget": -1}},
        {"thinkingConfig": {"include_thoughts": True, "thinking_level": "LOW"}},
    ]
    exc = await fail(provider, make_params(reasoning_effort=E.REASONING_EFFORT_HIGH))
    assert exc.field == "reasoning_effort" and len(upstream.requests) == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
async def test_log_probabilities_are_refused_before_sending(
    upstream: GeminiUpstream, provider: Provider, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(GatewayError) as raised:  # the core's one check, before dispatch, against the declared data
        check_supported(make_params(**fields), provider.supported, provider="gemini")
    exc = raised.value
    assert (exc.reason, exc.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (
            conversation(user("q"), assistant("", ("c1", "get_weather", "{not json"))),
            "messages[1].tool_calls[0].arguments",
        ),
        (
            conversation(user("q"), assistant("", ("c1", "f", "{}"), ("c2", "f", "[1]"))),
            "messages[1].tool_calls[1].arguments",
        ),
        (conversation(user("q"), tool("c9", "result")), "messages[1].tool_call_id"),
        (
            conversation(
                user("q"), tools=[WEATHER], tool_choice=pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_FUNCTION, name="nope")
            ),
            "tool_choice",
        ),
        (conversation(user("q"), tool_choice=pb.ToolChoice(mode=M.TOOL_CHOICE_MODE_REQUIRED)), "tool_choice"),
        (conversation(user("q"), tools=[pb.Tool(name="f", parameters="[]")]), "tools[0].parameters"),
        (
            conversation(
                user("q"),
                response_format=pb.ResponseFormat(
                    type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema="{"
                ),
            ),
            "response_format",
        ),
        (conversation(user("q"), seed=2**31), "seed"),
        (
            conversation(
                pb.Message(
                    role=pb.Role.ROLE_SYSTEM, parts=[pb.ContentPart(image=pb.Image(data=b"x", media_type="image/png"))]
                ),
                user("q"),
            ),
            "messages[0].parts[0]",
        ),
    ],
    ids=[
        "bad-json",
        "not-an-object",
        "unknown-call",
        "unknown-function",
        "required-without-tools",
        "bad-schema",
        "bad-response-schema",
        "seed-too-big",
        "image-in-system",
    ],  # fmt: skip
)
async def test_requests_gemini_cannot_take_are_refused_before_sending(
    upstream: GeminiUpstream, provider: Provider, params: pb.CompletionParams, param: str
) -> None:
    exc = await fail(provider, params)
    assert (exc.reason, exc.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert upstream.requests == []


# --- Tool calls and several candidates: the answer -----------------------------------------------------------------


@MODES
async def test_text_then_function_calls(upstream: GeminiUpstream, provider: Provider, incremental: bool) -> None:
    upstream.texts = ["Checking", " both."]  # one chunk each, then one chunk per call
    upstream.function_calls = [
        {"functionCall": {"id": "fc-1", "name": "get_weather", "args": {"city": "Zürich", "unit": "C"}}},
        {"functionCall": {"name": "get_time"}},  # no args, no id
    ]
    deltas, finish = await run(provider, conversation(user("q"), tools=[WEATHER, CLOCK]), incremental=incremental)
    assert deltas[:2] == [("delta", "Checking"), ("delta", " both.")]
    [(_, first), (_, second)] = deltas[2:]
    assert first == svc.ToolCallDelta(index=0, id="fc-1", name="get_weather", arguments='{"city":"Zürich","unit":"C"}')
    assert MINTED_ID.fullmatch(second.id)
    assert second == svc.ToolCallDelta(index=1, id=second.id, name="get_time", arguments="{}")
    assert finish.choices[0].finish_reason == F.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("parallel", [True, False])
async def test_parallel_calls_in_one_chunk(upstream: GeminiUpstream, provider: Provider, parallel: bool) -> None:
    upstream.texts, upstream.calls_in_one_chunk = [], True
    upstream.function_calls = [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": SIGNATURE_B64},
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
    ]
    params = conversation(user("q"), tools=[WEATHER], parallel_tool_calls=parallel)
    deltas, finish = await run(provider, params)
    calls = [(call.index, call.name, call.arguments) for _, call in deltas]
    first = [(0, "get_weather", '{"city":"Paris"}')]
    assert calls == (first + [(1, "get_weather", '{"city":"Oslo"}')] if parallel else first)  # false: the first only
    assert all(MINTED_ID.fullmatch(call.id.partition("~ts~")[0]) for _, call in deltas)
    assert len({call.id for _, call in deltas}) == len(deltas)
    assert finish.choices[0].finish_reason == F.FINISH_REASON_TOOL_CALLS


@MODES
async def test_several_candidates_are_several_choices(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.texts = ["Hello", "!"]
    upstream.extra_candidates = [
        Candidate(
            thoughts=["Hmm."],
            texts=["Let me look."],
            function_calls=[{"functionCall": {"id": "x", "name": "get_time"}}],
        ),
        Candidate(texts=["Hel"], finish_reason="MAX_TOKENS"),
    ]
    events, finish = await collect(
        provider, conversation(user("q"), tools=[CLOCK], choice_count=3), incremental=incremental
    )
    by_choice: dict[int, list[tuple[str, str]]] = {}
    for event in events:
        kind = event.WhichOneof("event")
        piece = getattr(event, kind)
        text = f"{piece.index}:{piece.id}:{piece.name}:{piece.arguments}" if kind == "tool_call" else piece.text
        by_choice.setdefault(piece.choice_index, []).append((kind, text))
    assert by_choice == {
        0: [("delta", "Hello"), ("delta", "!")],
        1: [("reasoning", "Hmm."), ("delta", "Let me look."), ("tool_call", "0:x:get_time:{}")],
        2: [("delta", "Hel")],
    }
    assert list(finish.choices) == [
        svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP),
        svc.ChoiceFinish(index=1, finish_reason=F.FINISH_REASON_TOOL_CALLS),
        svc.ChoiceFinish(index=2, finish_reason=F.FINISH_REASON_LENGTH),
    ]
    assert finish.usage == pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)  # one usage for all


@MODES
async def test_a_candidate_without_a_usable_finish_is_a_protocol_error(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.extra_candidates = [Candidate(texts=["Hi"], finish_reason=None)]
    exc = await fail(provider, make_params(choice_count=2), incremental=incremental)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL and "without a finish reason (candidate 1)" in exc.message
    upstream.extra_candidates = [Candidate(texts=["Hi"], finish_reason="MALFORMED_FUNCTION_CALL")]
    exc = await fail(provider, make_params(choice_count=2), incremental=incremental)
    assert "MALFORMED_FUNCTION_CALL (candidate 1)" in exc.message


async def test_a_candidate_nobody_asked_for_is_a_protocol_error(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.extra_candidates = [Candidate(texts=["Hi"])]
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


@MODES
async def test_a_blocked_prompt_filters_every_choice(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.block_reason = "SAFETY"
    events, finish = await collect(provider, make_params(choice_count=2), incremental=incremental)
    assert events == []
    assert list(finish.choices) == [
        svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_CONTENT_FILTER),
        svc.ChoiceFinish(index=1, finish_reason=F.FINISH_REASON_CONTENT_FILTER),
    ]


# --- Errors --------------------------------------------------------------------------------------------------------

ERRORS = [
    (400, "INVALID_ARGUMENT", R.ERROR_REASON_INVALID_REQUEST),
    (400, "FAILED_PRECONDITION", R.ERROR_REASON_INVALID_REQUEST),
    (401, "UNAUTHENTICATED", R.ERROR_REASON_UPSTREAM_AUTH),
    (403, "PERMISSION_DENIED", R.ERROR_REASON_UPSTREAM_AUTH),
    (404, "NOT_FOUND", R.ERROR_REASON_MODEL_NOT_FOUND),
    (429, "RESOURCE_EXHAUSTED", R.ERROR_REASON_RATE_LIMITED),
    (500, "INTERNAL", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (503, "UNAVAILABLE", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (504, "DEADLINE_EXCEEDED", R.ERROR_REASON_UPSTREAM_TIMEOUT),
    (409, "ABORTED", R.ERROR_REASON_INTERNAL),  # not in the table: logged, and the caller gets INTERNAL
]


@pytest.mark.parametrize(("code", "status", "reason"), ERRORS)
@pytest.mark.parametrize("where", ["before-whole", "before-stream", "first-stream-event", "mid-stream"])
async def test_upstream_errors(
    upstream: GeminiUpstream,
    provider: Provider,
    code: int,
    status: str,
    reason: pb.ErrorReason.ValueType,
    where: str,
) -> None:
    error = google_error(code, f"fake upstream error {status}", status)
    if where.startswith("before"):
        upstream.error_status, upstream.error_body = code, error
    else:
        upstream.stream_error_after, upstream.stream_error = (0 if where == "first-stream-event" else 2), error
    exc = await fail(provider, incremental=where != "before-whole")
    assert exc.reason == reason
    if reason == R.ERROR_REASON_INVALID_REQUEST:
        assert exc.message == f"fake upstream error {status}"  # the caller's own mistake: Google's words
    else:
        assert "fake upstream error" not in exc.message and str(code) not in exc.message


@pytest.mark.parametrize(
    ("code", "status", "details", "reason"),
    [
        (400, "INVALID_ARGUMENT", None, R.ERROR_REASON_INVALID_REQUEST),
        (400, "INVALID_ARGUMENT", google_error(400, "m", reason="API_KEY_INVALID"), R.ERROR_REASON_UPSTREAM_AUTH),
        (400, "FAILED_PRECONDITION", None, R.ERROR_REASON_INVALID_REQUEST),
        (400, "OUT_OF_RANGE", None, R.ERROR_REASON_INVALID_REQUEST),
        (403, "PERMISSION_DENIED", None, R.ERROR_REASON_UPSTREAM_AUTH),
        (401, "UNAUTHENTICATED", None, R.ERROR_REASON_UPSTREAM_AUTH),
        (404, "NOT_FOUND", None, R.ERROR_REASON_MODEL_NOT_FOUND),
        (429, "RESOURCE_EXHAUSTED", None, R.ERROR_REASON_RATE_LIMITED),
        (500, "INTERNAL", None, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (503, "UNAVAILABLE", None, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (504, "DEADLINE_EXCEEDED", None, R.ERROR_REASON_UPSTREAM_TIMEOUT),
        (502, "Bad Gateway", None, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),  # a proxy's HTML page: its reason phrase
        (408, None, None, R.ERROR_REASON_UPSTREAM_TIMEOUT),
        (507, None, None, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (409, "ABORTED", None, None),
        (418, None, None, None),
        (None, None, None, None),
        (True, None, None, None),
    ],
)
def test_error_table(code: object, status: object, details: object, reason: pb.ErrorReason.ValueType | None) -> None:
    assert gemini_errors.error_reason(code, status, details) == reason


async def test_a_rejected_key_is_the_gateways_problem_and_does_not_leak(
    upstream: GeminiUpstream, backend: GeminiBackend
) -> None:
    upstream.api_key = "AIza-the-right-one"  # the fake answers 400 INVALID_ARGUMENT + ErrorInfo API_KEY_INVALID
    provider = await backend.provider_for(make_entry({"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}))
    exc = await fail(provider)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_AUTH
    assert "credentials" in exc.message and "API key" not in exc.message


async def test_a_long_400_message_is_truncated(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.error_status, upstream.error_body = 400, google_error(400, "x" * 5000)
    assert (await fail(provider)).message == "x" * 500


@MODES
async def test_a_connection_dropped_mid_answer_is_unavailable(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.abort_after = 2
    assert (await fail(provider, incremental=incremental)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE


async def test_connection_refused_is_unavailable_at_once(backend: GeminiBackend) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = make_entry({"api_key_env": "GEMINI_API_KEY", "base_url": f"http://127.0.0.1:{port}"})
    provider = await backend.provider_for(entry)
    started = time.monotonic()
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE
    assert time.monotonic() - started < 2  # no hidden SDK sleep before a retry


@MODES
async def test_a_slow_upstream_times_out(upstream: GeminiUpstream, backend: GeminiBackend, incremental: bool) -> None:
    upstream.chunk_delay = 1.5  # before each chunk, or before the whole answer
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url, "timeout_seconds": 0.3}
    provider = await backend.provider_for(make_entry(options))
    started = time.monotonic()
    assert (await fail(provider, incremental=incremental)).reason == R.ERROR_REASON_UPSTREAM_TIMEOUT
    assert time.monotonic() - started < 1.2


# --- Cancellation --------------------------------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_upstream_connection(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.texts, upstream.chunk_delay = ["tok"] * 100, 0.1
    stream = provider.stream(make_params())
    first = await anext(stream)
    assert first.delta.text == "tok"
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=2)


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    upstream: GeminiUpstream, provider: Provider
) -> None:
    upstream.texts, upstream.chunk_delay = ["tok"] * 100, 0.1
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


async def test_a_finished_stream_leaves_its_connection_for_the_next_request(
    upstream: GeminiUpstream, provider: Provider
) -> None:
    await run(provider)
    await run(provider, incremental=False)
    await run(provider)
    assert len({request.client_port for request in upstream.requests}) == 1  # only abandoned answers close theirs


# --- The catalog entry ---------------------------------------------------------------------------------------------


async def test_entries_with_the_same_credentials_share_one_client(
    upstream: GeminiUpstream, backend: GeminiBackend
) -> None:
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": upstream.url}
    first = await backend.provider_for(make_entry(options, name="a"))
    second = await backend.provider_for(make_entry(options, name="b", model="gemini-2.5-pro"))
    await run(first)
    await run(second)
    assert [r.model for r in upstream.requests] == [MODEL, "gemini-2.5-pro"]
    assert backend.client_count == 1
    await backend.provider_for(make_entry({**options, "timeout_seconds": 5}, name="c"))
    assert backend.client_count == 2  # another timeout is another client
    await backend.aclose()
    assert backend.client_count == 0


async def test_a_vertex_ai_entry_builds_its_client_without_calling_google() -> None:
    backend = create_backend({})
    options = {"vertexai": True, "project": "my-project", "location": "europe-west4"}
    await backend.provider_for(make_entry(options, name="a"))
    await backend.provider_for(make_entry(options, name="b", model="gemini-2.5-pro"))
    await backend.provider_for(make_entry({**options, "location": "us-central1"}, name="c"))
    assert backend.client_count == 2
    await backend.aclose()


async def test_vertex_ai_without_google_credentials_is_the_gateways_problem(
    monkeypatch: pytest.MonkeyPatch, upstream: GeminiUpstream, backend: GeminiBackend
) -> None:
    # The standard credential chain stops at a key file that is named but missing, on any machine.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/modelmax-test-adc.json")
    options = {"vertexai": True, "project": "my-project", "location": "europe-west4", "base_url": upstream.url}
    provider = await backend.provider_for(make_entry(options))
    exc = await fail(provider)
    assert exc.reason == R.ERROR_REASON_UPSTREAM_AUTH
    assert "credentials" in exc.message and "nonexistent" not in exc.message
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("options", "model", "expected"),
    [
        ({"api_key_env": "GEMINI_API_KEY", "temperature": 1}, MODEL, "unknown options"),
        ({"api_key_env": "GEMINI_API_KEY"}, "", "'model' is required"),
        ({}, MODEL, "exactly one of"),
        ({"api_key_env": "GEMINI_API_KEY", "vertexai": True, "project": "p", "location": "l"}, MODEL, "exactly one of"),
        ({"vertexai": "yes", "project": "p", "location": "l"}, MODEL, "'vertexai' must be of type bool"),
        ({"vertexai": True, "project": "p"}, MODEL, "needs options 'project' and 'location'"),
        ({"vertexai": True, "project": "p", "location": 4}, MODEL, "'location' must be of type str"),
        ({"api_key_env": "GEMINI_API_KEY", "project": "p"}, MODEL, "are for Vertex AI"),
        ({"api_key_env": "GEMINI_API_KEY", "base_url": "127.0.0.1:9"}, MODEL, "http(s) URL"),
        ({"api_key_env": "GEMINI_API_KEY", "api_version": ""}, MODEL, "'api_version' must not be empty"),
        ({"api_key_env": "GEMINI_API_KEY", "api_version": 1}, MODEL, "'api_version' must be of type str"),
        ({"api_key_env": "GEMINI_API_KEY", "timeout_seconds": 0}, MODEL, "must be > 0"),
        ({"api_key_env": "GEMINI_API_KEY", "timeout_seconds": "60"}, MODEL, "'timeout_seconds' must be of type"),
        ({"api_key_env": "GEMINI_API_KEY", "include_thoughts": "yes"}, MODEL, "'include_thoughts' must be of type"),
        ({"api_key_env": ""}, MODEL, "must name an environment variable"),
        (
            {"api_key_env": "GEMINI_API_KEY", "reasoning_effort": "low"},
            MODEL,
            "'reasoning_effort' must be of type dict",
        ),
        ({"api_key_env": "GEMINI_API_KEY", "reasoning_effort": {"extreme": 1}}, MODEL, "unknown effort 'extreme'"),
        ({"api_key_env": "GEMINI_API_KEY", "reasoning_effort": {"low": "tiny"}}, MODEL, "must be a thinking level"),
        ({"api_key_env": "GEMINI_API_KEY", "reasoning_effort": {"low": True}}, MODEL, "must be a thinking level"),
    ],
)
async def test_bad_catalog_entries_are_refused_with_the_entry_named(
    options: dict[str, Any], model: str, expected: str
) -> None:
    backend = create_backend(ENV)
    with pytest.raises(CatalogError) as info:
        await backend.provider_for(make_entry(options, model=model))
    assert expected in str(info.value)
    assert "(gemini-test)" in str(info.value)
    assert backend.client_count == 0
    await backend.aclose()


async def test_an_unset_key_variable_is_a_missing_secret() -> None:
    backend = create_backend({})
    with pytest.raises(MissingSecret, match="GEMINI_API_KEY"):
        await backend.provider_for(make_entry({"api_key_env": "GEMINI_API_KEY"}))
    await backend.aclose()


# --- top_k, a reasoning budget, a failed tool ------------------------------------------------------------------


@MODES
async def test_top_k_and_a_reasoning_budget_go_into_the_config(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    await run(provider, make_params(top_k=5, reasoning_budget_tokens=2048), incremental=incremental)
    [request] = upstream.requests
    # The budget is thinking the caller asked to see: its thoughts are included (the SDK's Python field names).
    assert request.body["generationConfig"] == {
        "topK": 5,
        "thinkingConfig": {"thinking_budget": 2048, "include_thoughts": True},
    }


@MODES
async def test_a_failed_tools_result_is_the_function_responses_error(
    upstream: GeminiUpstream, provider: Provider, incremental: bool
) -> None:
    # The reasoning given back is not sent: Gemini's thought signatures travel in the call ids instead.
    thinking = pb.Message(
        role=pb.Role.ROLE_ASSISTANT,
        tool_calls=[pb.ToolCall(id="fc-9", name="get_weather", arguments='{"city":"Atlantis"}')],
        reasoning=[pb.Reasoning(text="A tool call.", signature="c2ln")],
    )
    failed = pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="fc-9", content='{"code": 404}', is_error=True)
    params = conversation(user("Weather in Atlantis?"), thinking, failed, tools=[WEATHER])
    await run(provider, params, incremental=incremental)
    [request] = upstream.requests
    assert request.body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"id": "fc-9", "name": "get_weather", "args": {"city": "Atlantis"}},
                    "thoughtSignature": PLACEHOLDER_WIRE,
                }
            ],
        },
        # the error text as it is (even when it is JSON), under "error" instead of being the response
        {"role": "user", "parts": [{"functionResponse": {"id": "fc-9", "name": "get_weather",
                                                         "response": {"error": '{"code": 404}'}}}]},
    ]  # fmt: skip


# --- CountTokens -------------------------------------------------------------------------------------------------


async def test_count_tokens_asks_count_tokens_with_the_system_instruction_and_tools(
    upstream: GeminiUpstream, provider: GeminiProvider
) -> None:
    params = conversation(
        pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."),
        user("Weather in Paris?"),
        pb.Message(
            role=pb.Role.ROLE_USER, parts=[pb.ContentPart(image=pb.Image(data=SIGNATURE, media_type="image/png"))]
        ),
        tools=[WEATHER],
        max_tokens=10,  # a generation parameter: not part of the count
    )
    tokens = await provider.count_tokens(params)
    [request] = upstream.requests
    assert (request.version, request.model, request.action) == ("v1beta", MODEL, "countTokens")
    assert request.headers["x-goog-api-key"] == KEY
    # The Gemini API takes the system instruction and tools only inside a generateContentRequest (google-genai's
    # count_tokens refuses them there), in the wire's camelCase, bytes as the SDK encodes them.
    assert request.body == {
        "generateContentRequest": {
            "model": f"models/{MODEL}",
            "contents": [
                {"role": "user", "parts": [{"text": "Weather in Paris?"},
                                           {"inlineData": {"mimeType": "image/png", "data": SIGNATURE_WIRE}}]},
            ],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Current weather in a city.",
                                                 "parametersJsonSchema": SCHEMA}]}],
        }
    }  # fmt: skip
    # The fake's count: a word a token over every string of the request (see tests/fakes/gemini.py).
    words = ["user", "Weather", "in", "Paris?", "image/png", SIGNATURE_WIRE, "Be", "brief."]
    words += ["get_weather", "Current", "weather", "in", "a", "city."]
    assert tokens == len(words) + count_tokens(SCHEMA)  # the schema's words, by the fake's own rule


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (429, R.ERROR_REASON_RATE_LIMITED),
        (400, R.ERROR_REASON_INVALID_REQUEST),
        (503, R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
        (403, R.ERROR_REASON_UPSTREAM_AUTH),
    ],
)
async def test_count_tokens_failures_map_like_a_completions(
    upstream: GeminiUpstream, provider: GeminiProvider, code: int, reason: pb.ErrorReason.ValueType
) -> None:
    upstream.error_status = code
    with pytest.raises(GatewayError) as raised:
        await provider.count_tokens(make_params())
    assert (raised.value.reason, raised.value.provider) == (reason, "gemini")
    assert len(upstream.requests) == 1  # one try: the SDK's retries are off


async def test_count_tokens_on_an_unreachable_upstream_is_unavailable(backend: GeminiBackend) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    options = {"api_key_env": "GEMINI_API_KEY", "base_url": f"http://127.0.0.1:{port}"}
    provider = await backend.provider_for(make_entry(options))
    with pytest.raises(GatewayError) as raised:
        await provider.count_tokens(make_params())
    assert raised.value.reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE
