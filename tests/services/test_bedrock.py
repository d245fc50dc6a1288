"""The `bedrock` provider, driven through its backend: the real aioboto3 client against the fake Bedrock server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, CatalogError, MissingSecret
from services.completion.validation import check_supported
from services.errors import GatewayError
from services.providers import FEATURES, Provider
from services.providers.bedrock import BedrockBackend, BedrockProvider, create_backend
from services.providers.bedrock.tools import AnswerShape
from services.providers.bedrock.translate import converse_request
from tests.fakes.bedrock import (
    DEFAULT_USAGE,
    BedrockUpstream,
    ToolUse,
    frame,
    isolate_aws_config,
    serve_bedrock,
    use_fake_credentials,
)

R = pb.ErrorReason
F = pb.FinishReason
MODEL_ID = "deepseek.v3.2"
# Bedrock's words for a prompt over the model's window, verbatim from live logs; the provider recognises them.
TOO_LONG_MESSAGES = [
    # aws-samples/bedrock-chat#95 (an exception frame) and continuedev/continue#6005, #9592 (HTTP 400)
    "Input is too long for requested model.",
    "The model returned the following errors: Input is too long for requested model.",
    # daisuke-awaji/moca#254: a ValidationException from Claude on Bedrock
    "The model returned the following errors: prompt is too long: 200049 tokens > 200000 maximum",
]


def make_entry(options: Mapping[str, Any], *, name: str = "deepseek-v3.2", model: str = MODEL_ID) -> CatalogEntry:
    return CatalogEntry(name, "bedrock", model, "deepseek", dict(options), where=f"catalog.yaml: models[0] ({name})")


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_USER, content=text)


def assistant(text: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_ASSISTANT, content=text)


def system(text: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_SYSTEM, content=text)


def make_params(*messages: pb.Message, **fields: Any) -> pb.CompletionParams:
    return pb.CompletionParams(model="deepseek-v3.2", messages=list(messages) or [user("Say hello")], **fields)


async def run(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> tuple[list[str], list[str], svc.CompletionFinish]:
    """Texts of the deltas, texts of the reasoning deltas, and the finish, which must come last and once. Reasoning
    deltas without text carry a signature or redacted bytes (see test_reasoning_blocks_...)."""
    texts: list[str] = []
    reasoning: list[str] = []
    finish: svc.CompletionFinish | None = None
    async with aclosing(provider.stream(params or make_params(), incremental=incremental)) as events:  # type: ignore[type-var]
        async for event in events:
            assert finish is None, "an event after the finish"
            kind = event.WhichOneof("event")
            if kind == "delta":
                assert event.delta.text
                texts.append(event.delta.text)
            elif kind == "reasoning":
                thought = event.reasoning
                assert [bool(thought.text), bool(thought.signature), bool(thought.redacted)].count(True) == 1
                if thought.text:
                    reasoning.append(thought.text)
            else:
                assert kind == "finish"
                finish = event.finish
    assert finish is not None
    return texts, reasoning, finish


async def fail(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await run(provider, params, incremental=incremental)
    assert info.value.provider == "bedrock"
    return info.value


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake_credentials(monkeypatch, tmp_path)


@pytest.fixture
async def upstream() -> AsyncIterator[BedrockUpstream]:
    async with serve_bedrock() as fake:
        yield fake


@pytest.fixture
async def backend(upstream: BedrockUpstream) -> AsyncIterator[BedrockBackend]:
    backend = create_backend({})  # depends on `upstream` so its clients close before the server stops
    yield backend
    await backend.aclose()


def fake_options(upstream: BedrockUpstream, **extra: Any) -> dict[str, Any]:
    return {"region": "us-east-1", "endpoint_url": upstream.url, "read_timeout_seconds": 5, **extra}


@pytest.fixture
async def provider(upstream: BedrockUpstream, backend: BedrockBackend) -> Provider:
    return await backend.provider_for(make_entry(fake_options(upstream)))


# --- catalog options and clients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "model", "problem"),
    [
        ({"region": "us-east-1", "aws_region": "x"}, MODEL_ID, "unknown options ['aws_region']"),
        ({}, MODEL_ID, "option 'region' is required"),
        ({"region": 1}, MODEL_ID, "option 'region' must be of type str"),
        ({"region": "us-east-1"}, "", "'model' is required"),
        ({"region": "us-east-1", "endpoint_url": "127.0.0.1:9"}, MODEL_ID, "must be an http(s) URL"),
        ({"region": "us-east-1", "read_timeout_seconds": "60s"}, MODEL_ID, "must be of type float"),
        ({"region": "us-east-1", "connect_timeout_seconds": 0}, MODEL_ID, "must be > 0"),
        ({"region": "us-east-1", "profile": ["dev"]}, MODEL_ID, "option 'profile' must be of type str"),
        ({"region": "us east 1"}, MODEL_ID, "not a valid AWS region name"),
    ],
)
async def test_bad_entries_are_catalog_errors(
    backend: BedrockBackend, options: dict[str, Any], model: str, problem: str
) -> None:
    with pytest.raises(CatalogError, match=r"catalog\.yaml: models\[0\] \(deepseek-v3\.2\): ") as raised:
        await backend.provider_for(make_entry(options, model=model))
    assert problem in str(raised.value)
    assert not isinstance(raised.value, MissingSecret)


async def test_entries_share_one_client_per_configuration(upstream: BedrockUpstream, backend: BedrockBackend) -> None:
    first = await backend.provider_for(make_entry(fake_options(upstream), name="a"))
    second = await backend.provider_for(make_entry(fake_options(upstream), name="b", model="other.model-v1:0"))
    assert backend.client_count == 1
    await backend.provider_for(make_entry(fake_options(upstream, region="eu-west-1"), name="c"))
    await backend.provider_for(make_entry(fake_options(upstream, read_timeout_seconds=9), name="d"))
    assert backend.client_count == 3
    await run(first)
    await run(second)
    assert [r.model_id for r in upstream.requests] == [MODEL_ID, "other.model-v1:0"]


async def test_an_unknown_profile_makes_the_entry_unavailable_not_the_gateway(
    upstream: BedrockUpstream, backend: BedrockBackend
) -> None:
    with pytest.raises(MissingSecret, match="AWS profile 'nope'"):
        await backend.provider_for(make_entry(fake_options(upstream, profile="nope")))
    assert backend.client_count == 0


@pytest.mark.parametrize("chosen_by", ["option", "AWS_PROFILE"])
async def test_a_shared_profile_supplies_the_credentials(
    upstream: BedrockUpstream,
    backend: BedrockBackend,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    chosen_by: str,
) -> None:
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[team]\naws_access_key_id = AKIATEAMTEAMTEAMTEAM\naws_secret_access_key = team-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    if chosen_by == "option":  # the environment's keys stay set: an explicit profile sets them aside (botocore)
        options = fake_options(upstream, profile="team")
    else:  # the usual chain: AWS_PROFILE names the profile when no keys are in the environment
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_PROFILE", "team")
        options = fake_options(upstream)
    await run(await backend.provider_for(make_entry(options)))
    assert "Credential=AKIATEAMTEAMTEAMTEAM/" in upstream.requests[0].headers["authorization"]


async def test_sdk_retries_stay_off_whatever_the_environment_says(
    upstream: BedrockUpstream, backend: BedrockBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    provider = await backend.provider_for(make_entry(fake_options(upstream)))
    upstream.error_status = 503
    upstream.error_type = "ServiceUnavailableException"
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE
    assert len(upstream.requests) == 1


# --- OpenAI -> Converse ------------------------------------------------------------------------------------------


async def test_streams_deltas_then_finish_and_sends_the_converse_request(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    params = make_params(
        system("Be brief."),
        user("Hi"),
        assistant("Hello?"),
        user("Say hello"),
        temperature=0.0,
        top_p=0.5,
        max_tokens=50,
        stop_sequences=["\n\n", "END"],
    )
    texts, reasoning, finish = await run(provider, params)

    assert texts == ["Hello", ", ", "world", "!"] and reasoning == []
    assert finish == svc.CompletionFinish(
        choices=[svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11),
    )
    [request] = upstream.requests
    assert (request.model_id, request.operation) == (MODEL_ID, "converse-stream")
    assert request.body == {
        "messages": [
            {"role": "user", "content": [{"text": "Hi"}]},
            {"role": "assistant", "content": [{"text": "Hello?"}]},
            {"role": "user", "content": [{"text": "Say hello"}]},
        ],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 50, "temperature": 0.0, "topP": 0.5, "stopSequences": ["\n\n", "END"]},
    }
    assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAFAKEFAKEFAKEFAKE/")
    assert "/us-east-1/bedrock/aws4_request" in request.headers["authorization"]


async def test_sends_only_what_the_caller_set(upstream: BedrockUpstream, provider: Provider) -> None:
    await run(provider)
    assert upstream.requests[0].body == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


async def test_system_messages_are_hoisted_and_same_role_turns_merged(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    params = make_params(
        system("Be brief."),
        user("First."),
        user("Second."),
        system("Answer in French."),
        assistant("Un."),
        assistant("Deux."),
        user("Trois?"),
    )
    await run(provider, params)
    body = upstream.requests[0].body
    assert body["system"] == [{"text": "Be brief."}, {"text": "Answer in French."}]
    assert body["messages"] == [
        {"role": "user", "content": [{"text": "First."}, {"text": "Second."}]},
        {"role": "assistant", "content": [{"text": "Un."}, {"text": "Deux."}]},
        {"role": "user", "content": [{"text": "Trois?"}]},
    ]


async def test_blank_messages_are_left_out(upstream: BedrockUpstream, provider: Provider) -> None:
    params = make_params(system(" "), user("Hi"), assistant(""), user("\n"), user("Again"), assistant("  "))
    await run(provider, params)
    body = upstream.requests[0].body
    assert "system" not in body
    assert body["messages"] == [{"role": "user", "content": [{"text": "Hi"}, {"text": "Again"}]}]


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([assistant("How can I help?"), user("Hi")], "start with a user message"),
        ([system("Be brief."), assistant("Hi!"), user("Hi")], "start with a user message"),
        ([user(""), assistant("Hi!"), user("Hi")], "start with a user message"),
        ([system("Be brief.")], "at least one user message"),
        ([user("   "), assistant("")], "at least one user message"),
    ],
    ids=["assistant-first", "assistant-after-system", "assistant-after-blank", "system-only", "all-blank"],
)
async def test_conversations_converse_cannot_take_are_refused(
    upstream: BedrockUpstream, provider: Provider, messages: list[pb.Message], says: str
) -> None:
    error = await fail(provider, make_params(*messages))
    assert error.reason == R.ERROR_REASON_INVALID_REQUEST and error.field == "messages"
    assert says in error.message
    assert upstream.requests == []


async def test_an_inference_profile_arn_is_the_path_model_id(
    upstream: BedrockUpstream, backend: BedrockBackend
) -> None:
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.deepseek.v3.2"
    provider = await backend.provider_for(make_entry(fake_options(upstream), model=arn))
    await run(provider)
    await run(provider, incremental=False)
    assert [r.model_id for r in upstream.requests] == [arn, arn]


# --- Converse -> OpenAI ------------------------------------------------------------------------------------------


async def test_a_whole_answer_uses_converse_and_yields_the_same_events(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.reasoning = ["Think", "ing."]
    texts, reasoning, finish = await run(provider, incremental=False)
    assert texts == ["Hello, world!"] and reasoning == ["Thinking."]
    assert finish.choices[0].finish_reason == F.FINISH_REASON_STOP and finish.usage.total_tokens == 11
    [request] = upstream.requests
    assert request.operation == "converse"
    assert request.body == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", F.FINISH_REASON_STOP),
        ("stop_sequence", F.FINISH_REASON_STOP),
        ("max_tokens", F.FINISH_REASON_LENGTH),
        ("model_context_window_exceeded", F.FINISH_REASON_LENGTH),
        ("guardrail_intervened", F.FINISH_REASON_CONTENT_FILTER),
        ("content_filtered", F.FINISH_REASON_CONTENT_FILTER),
        ("tool_use", F.FINISH_REASON_TOOL_CALLS),
    ],
)
async def test_stop_reasons_map_to_finish_reasons(
    upstream: BedrockUpstream, provider: Provider, stop_reason: str, finish_reason: int, incremental: bool
) -> None:
    upstream.stop_reason = stop_reason
    _, _, finish = await run(provider, incremental=incremental)
    assert finish.choices[0].finish_reason == finish_reason


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_stop_sequence_stop_does_not_name_the_sequence(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    # Converse says only that a stop sequence matched, never which one: with several, the finish leaves it empty.
    upstream.stop_reason = "stop_sequence"
    _, _, finish = await run(provider, make_params(stop_sequences=["world", "END"]), incremental=incremental)
    assert list(finish.choices) == [svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_stop_sequence_stop_names_the_requests_only_stop_sequence(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    # With one stop sequence, Converse's `stop_sequence` can only mean that one: it is known, not guessed.
    upstream.stop_reason = "stop_sequence"
    _, _, finish = await run(provider, make_params(stop_sequences=["END"]), incremental=incremental)
    assert list(finish.choices) == [svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP, stop_sequence="END")]
    upstream.stop_reason = "end_turn"  # a natural end names none, one stop sequence or not
    _, _, finish = await run(provider, make_params(stop_sequences=["END"]), incremental=incremental)
    assert list(finish.choices) == [svc.ChoiceFinish(index=0, finish_reason=F.FINISH_REASON_STOP)]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_an_unknown_stop_reason_is_a_protocol_error(
    upstream: BedrockUpstream, provider: Provider, incremental: bool, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.stop_reason = "malformed_model_output"
    error = await fail(provider, incremental=incremental)
    assert error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    assert "malformed_model_output" in caplog.text and upstream.request_id in caplog.text


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {
                "inputTokens": 5,
                "outputTokens": 4,
                "totalTokens": 39,
                "cacheReadInputTokens": 20,
                "cacheWriteInputTokens": 10,
            },  # fmt: skip
            pb.Usage(prompt_tokens=35, completion_tokens=4, total_tokens=39, cached_tokens=20),
        ),
        (
            {"inputTokens": 5, "outputTokens": 4, "totalTokens": 19, "cacheWriteInputTokens": 10},
            pb.Usage(prompt_tokens=15, completion_tokens=4, total_tokens=19, cached_tokens=0),
        ),
        (
            {"inputTokens": 5, "outputTokens": 4, "totalTokens": 9},
            pb.Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9),
        ),
    ],
    ids=["cache-read-and-write", "cache-write-only", "no-cache-fields"],
)
async def test_usage_counts_cache_tokens_in_the_prompt(
    upstream: BedrockUpstream, provider: Provider, usage: dict[str, int], expected: pb.Usage, incremental: bool
) -> None:
    upstream.usage = usage
    _, _, finish = await run(provider, incremental=incremental)
    assert finish.usage == expected
    assert finish.usage.HasField("cached_tokens") == ("cached_tokens" in str(expected))
    assert not finish.usage.HasField("reasoning_tokens")


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_bad_usage_is_a_protocol_error(upstream: BedrockUpstream, provider: Provider, incremental: bool) -> None:
    upstream.usage = {"outputTokens": 4, "totalTokens": 4}  # no inputTokens: never guess it
    assert (await fail(provider, incremental=incremental)).reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


async def test_reasoning_streams_apart_from_the_answer(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.reasoning = ["The user ", "greets me."]
    upstream.reasoning_signature = "c2lnbmF0dXJl"  # a signature-only delta: no text (see the test below)
    texts, reasoning, _ = await run(provider)
    assert reasoning == ["The user ", "greets me."]
    assert texts == ["Hello", ", ", "world", "!"]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_reasoning_blocks_come_back_with_their_signature_and_redactions(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.reasoning = ["The user ", "greets me."]
    upstream.reasoning_signature = "c2lnbmF0dXJl"
    upstream.reasoning_redacted = b"\x00opaque\xff"
    events = await events_of(provider, make_params(), incremental=incremental)
    thoughts = [event.reasoning for event in events if event.HasField("reasoning")]
    texts = [svc.ReasoningDelta(text=t) for t in (upstream.reasoning if incremental else ["The user greets me."])]
    assert thoughts == [
        *texts,
        svc.ReasoningDelta(signature="c2lnbmF0dXJl"),  # after its block's text, ending the block
        svc.ReasoningDelta(redacted=b"\x00opaque\xff"),  # botocore decoded the blob's base64
    ]
    assert [e.delta.text for e in events if e.HasField("delta")] == (
        ["Hello", ", ", "world", "!"] if incremental else ["Hello, world!"]
    )


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_reasoning_and_a_failed_tool_in_the_history_become_converse_blocks(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    thinking = [pb.Reasoning(text="Paris, so the tool.", signature="c2ln"), pb.Reasoning(redacted=b"\x01\x02")]
    assistant = pb.Message(
        role=pb.Role.ROLE_ASSISTANT,
        content="Let me check.",
        reasoning=thinking,
        tool_calls=[pb.ToolCall(id="tooluse_1", name="get_weather", arguments='{"city":"Paris"}')],
    )
    failed = pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="tooluse_1", content="city not found", is_error=True)
    params = make_params(user("Weather in Paris?"), assistant, failed, tools=[WEATHER])
    await events_of(provider, params, incremental=incremental)
    assert upstream.requests[0].body["messages"] == [
        {"role": "user", "content": [{"text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [  # the reasoning first, in order, then the text, then the call
                {"reasoningContent": {"reasoningText": {"text": "Paris, so the tool.", "signature": "c2ln"}}},
                {"reasoningContent": {"redactedContent": base64.b64encode(b"\x01\x02").decode()}},
                {"text": "Let me check."},
                {"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {"city": "Paris"}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "city not found"}], "status": "error"}}
            ],
        },
    ]


async def test_a_reasoning_block_without_a_signature_is_sent_without_one(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    assistant = pb.Message(role=pb.Role.ROLE_ASSISTANT, content="Hi.", reasoning=[pb.Reasoning(text="Greet back.")])
    await run(provider, make_params(user("Hi"), assistant, user("Again")))
    assert upstream.requests[0].body["messages"][1] == {
        "role": "assistant",
        "content": [{"reasoningContent": {"reasoningText": {"text": "Greet back."}}}, {"text": "Hi."}],
    }


async def test_frames_split_across_reads_and_unknown_events_are_fine(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.write_size = 1
    upstream.events = [
        ("messageStart", {"role": "assistant"}),
        ("someFutureEvent", {"x": 1}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hé"}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": ""}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": "end_turn"}),
        ("metadata", {"usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}, "metrics": {"latencyMs": 1}}),
    ]
    texts, _, finish = await run(provider)
    assert texts == ["Hé"] and finish.usage.total_tokens == 2


@pytest.mark.parametrize(
    "script",
    [{"cut_after": 2}, {"send_message_stop": False}, {"usage": None}, {"cut_after": 0}],
    ids=["cut-mid-answer", "no-message-stop", "no-metadata", "cut-before-text"],
)
async def test_a_stream_that_ends_early_is_an_error_never_a_made_up_finish(
    upstream: BedrockUpstream, provider: Provider, script: dict[str, Any]
) -> None:
    for name, value in script.items():
        setattr(upstream, name, value)
    received: list[str] = []
    with pytest.raises(GatewayError) as raised:
        async with aclosing(provider.stream(make_params())) as events:  # type: ignore[type-var]
            async for event in events:
                assert not event.HasField("finish")
                received.append(event.delta.text)
    assert raised.value.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    assert received == ["Hello", ", ", "world", "!"][: script.get("cut_after", 4)]


# --- tools, structured output, images ----------------------------------------------------------------------------

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = pb.Tool(name="get_weather", description="The weather in a city.", parameters=json.dumps(WEATHER_SCHEMA))
NOW = pb.Tool(name="now")  # no description, no parameters
WEATHER_SPECS = [
    {
        "toolSpec": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "inputSchema": {"json": WEATHER_SCHEMA},
        }
    },
    {"toolSpec": {"name": "now", "inputSchema": {"json": {"type": "object", "properties": {}}}}},
]
PARIS = ToolUse("tooluse_paris01", "get_weather", {"city": "Paris"}, pieces=['{"ci', 'ty": "Par', 'is"}'])
ROME = ToolUse("tooluse_rome02", "get_weather", {"city": "Rome"}, pieces=['{"city": ', '"Rome"}'])
REPORT_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
USAGE = pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)


def tool_call(index: int, arguments: str, *, id: str = "", name: str = "") -> svc.StreamCompletionResponse:
    return svc.StreamCompletionResponse(tool_call=svc.ToolCallDelta(index=index, id=id, name=name, arguments=arguments))


def content(text: str) -> svc.StreamCompletionResponse:
    return svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text))


def finished(reason: int) -> svc.StreamCompletionResponse:
    choices = [svc.ChoiceFinish(index=0, finish_reason=reason)]
    return svc.StreamCompletionResponse(finish=svc.CompletionFinish(choices=choices, usage=USAGE))


def called(id: str, name: str, arguments: str) -> pb.ToolCall:
    return pb.ToolCall(id=id, name=name, arguments=arguments)


def calling(text: str, *calls: pb.ToolCall) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_ASSISTANT, content=text, tool_calls=list(calls))


def result(tool_call_id: str, text: str) -> pb.Message:
    return pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id=tool_call_id, content=text)


def choice(mode: int, name: str = "") -> pb.ToolChoice:
    return pb.ToolChoice(mode=mode, name=name)  # type: ignore[arg-type]


async def events_of(
    provider: Provider, params: pb.CompletionParams, *, incremental: bool = True
) -> list[svc.StreamCompletionResponse]:
    async with aclosing(provider.stream(params, incremental=incremental)) as events:  # type: ignore[type-var]
        return [event async for event in events]


# A weather conversation: the model called the tool twice, both results came back, the user asks on.
TOOL_HISTORY = [
    user("Weather in Paris and Rome?"),
    calling(
        "Let me check.",
        called("tooluse_paris01", "get_weather", '{"city": "Paris"}'),
        called("tooluse_rome02", "get_weather", '{"city":"Rome"}'),
    ),
    result("tooluse_paris01", "18°C, sunny"),
    result("tooluse_rome02", " "),  # blank: the block stays (it answers a call), its blank text does not
    user("And tomorrow?"),
    calling("", called("tooluse_now03", "now", "{}")),  # no text: only the toolUse block
    result("tooluse_now03", "2025-06-01"),
]
TOOL_HISTORY_TURNS = [
    {"role": "user", "content": [{"text": "Weather in Paris and Rome?"}]},
    {
        "role": "assistant",
        "content": [
            {"text": "Let me check."},
            {"toolUse": {"toolUseId": "tooluse_paris01", "name": "get_weather", "input": {"city": "Paris"}}},
            {"toolUse": {"toolUseId": "tooluse_rome02", "name": "get_weather", "input": {"city": "Rome"}}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"toolResult": {"toolUseId": "tooluse_paris01", "content": [{"text": "18°C, sunny"}]}},
            {"toolResult": {"toolUseId": "tooluse_rome02", "content": []}},
            {"text": "And tomorrow?"},
        ],
    },
    {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_now03", "name": "now", "input": {}}}]},
    {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_now03", "content": [{"text": "2025-06-01"}]}}]},
]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, None),  # unset: Converse's default (auto) without saying so; some models refuse any toolChoice
        (choice(pb.TOOL_CHOICE_MODE_AUTO), {"auto": {}}),
        (choice(pb.TOOL_CHOICE_MODE_REQUIRED), {"any": {}}),
        (choice(pb.TOOL_CHOICE_MODE_FUNCTION, "now"), {"tool": {"name": "now"}}),
    ],
    ids=["unset", "auto", "required", "function"],
)
@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_tools_and_tool_choice_become_the_tool_config(
    upstream: BedrockUpstream,
    provider: Provider,
    tool_choice: pb.ToolChoice | None,
    expected: dict[str, Any] | None,
    incremental: bool,
) -> None:
    params = make_params(user("Weather in Paris?"), tools=[WEATHER, NOW], tool_choice=tool_choice)
    await events_of(provider, params, incremental=incremental)
    tool_config: dict[str, Any] = {"tools": WEATHER_SPECS}
    if expected is not None:
        tool_config["toolChoice"] = expected
    assert upstream.requests[0].body == {
        "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]}],
        "toolConfig": tool_config,
    }


async def test_tool_choice_none_offers_no_tools(upstream: BedrockUpstream, provider: Provider) -> None:
    params = make_params(tools=[WEATHER], tool_choice=choice(pb.TOOL_CHOICE_MODE_NONE))
    await run(provider, params)
    assert upstream.requests[0].body == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_tool_calls_and_results_in_the_history_become_tool_blocks(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    params = make_params(system("Be brief."), *TOOL_HISTORY, tools=[WEATHER, NOW])
    await events_of(provider, params, incremental=incremental)
    assert upstream.requests[0].body == {
        "messages": TOOL_HISTORY_TURNS,
        "system": [{"text": "Be brief."}],
        "toolConfig": {"tools": WEATHER_SPECS},
    }


async def test_a_history_with_tool_blocks_but_no_tools_gets_a_tool_config_of_the_tools_it_used(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    await run(provider, make_params(*TOOL_HISTORY))
    assert upstream.requests[0].body == {
        "messages": TOOL_HISTORY_TURNS,
        "toolConfig": {
            "tools": [
                {"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}},
                {"toolSpec": {"name": "now", "inputSchema": {"json": {"type": "object"}}}},
            ]
        },
    }


@pytest.mark.parametrize("tools", [[], [WEATHER, NOW]], ids=["history-only", "with-tools"])
async def test_tool_choice_none_with_tool_blocks_in_the_history_is_refused(
    upstream: BedrockUpstream, provider: Provider, tools: list[pb.Tool]
) -> None:
    params = make_params(*TOOL_HISTORY, tools=tools, tool_choice=choice(pb.TOOL_CHOICE_MODE_NONE))
    error = await fail(provider, params)
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, "tool_choice")
    assert '"none"' in error.message
    assert upstream.requests == []


def replaying(arguments: str, *, id: str = "c1") -> dict[str, Any]:
    """The fields of a request whose history replays one call of `now` with these arguments."""
    return {"messages": [user("Hi"), calling("", called(id, "now", arguments))]}


ARGUMENTS = "messages[1].tool_calls[0].arguments"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (replaying("not json"), ARGUMENTS),
        (replaying("[1, 2]"), ARGUMENTS),
        (replaying(""), ARGUMENTS),
        (replaying('{"x": NaN}'), ARGUMENTS),
        (replaying("[" * 100_000), ARGUMENTS),
        (replaying("{}", id=""), "messages[1].tool_calls[0].id"),
        ({"messages": [*replaying("{}")["messages"], result("", "ok")]}, "messages[2].tool_call_id"),
        ({"messages": [pb.Message(role=pb.Role.ROLE_USER, content="Hi", tool_calls=[called("c1", "now", "{}")])]},
         "messages[0].tool_calls"),
        ({"tools": [pb.Tool(name="f", parameters="{'type': 'object'}")]}, "tools[0].parameters"),
        ({"tools": [WEATHER, pb.Tool(name="f", parameters='"object"')]}, "tools[1].parameters"),
        ({"tool_choice": choice(pb.TOOL_CHOICE_MODE_REQUIRED)}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": choice(pb.TOOL_CHOICE_MODE_FUNCTION, "now")}, "tool_choice"),
    ],
    ids=[
        "arguments-not-json",
        "arguments-not-an-object",
        "arguments-empty",
        "arguments-nan",
        "arguments-too-deep",
        "call-without-id",
        "result-without-call-id",
        "calls-on-a-user-message",
        "parameters-not-json",
        "parameters-not-an-object",
        "required-without-tools",
        "function-not-in-tools",
    ],
)  # fmt: skip
async def test_tool_requests_converse_cannot_take_are_400s_naming_the_param(
    upstream: BedrockUpstream, provider: Provider, fields: dict[str, Any], param: str
) -> None:
    messages = fields.pop("messages", [user("Hi")])
    error = await fail(provider, make_params(*messages, **fields))
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert upstream.requests == []


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # every byte value, so base64 and its decoding are tested
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_images_become_image_blocks_with_their_bytes(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    question = pb.Message(
        role=pb.Role.ROLE_USER,
        parts=[
            pb.ContentPart(text="What is in these?"),
            pb.ContentPart(image=pb.Image(data=PNG, media_type="image/png")),
            pb.ContentPart(text=" "),  # blank: left out
            pb.ContentPart(image=pb.Image(data=JPEG, media_type="image/jpeg")),
        ],
    )
    await events_of(provider, make_params(question, user("Briefly.")), incremental=incremental)
    [request] = upstream.requests
    assert request.body == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"text": "What is in these?"},
                    {"image": {"format": "png", "source": {"bytes": base64.b64encode(PNG).decode()}}},
                    {"image": {"format": "jpeg", "source": {"bytes": base64.b64encode(JPEG).decode()}}},
                    {"text": "Briefly."},
                ],
            }
        ]
    }
    assert request.images == [PNG, JPEG]  # botocore base64-encoded them on the wire; the fake decoded them back


def with_image(image: pb.Image, role: int = pb.Role.ROLE_USER) -> pb.Message:
    return pb.Message(role=role, parts=[pb.ContentPart(text="?"), pb.ContentPart(image=image)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        with_image(pb.Image(data=PNG, media_type="image/tiff")),
        with_image(pb.Image(url="https://example.com/a.png", media_type="image/png")),  # never resolved by the core
        with_image(pb.Image(data=PNG, media_type="image/png"), pb.Role.ROLE_SYSTEM),
    ],
    ids=["unsupported-type", "unresolved-url", "image-in-system"],
)
async def test_images_converse_cannot_take_are_400s(
    upstream: BedrockUpstream, provider: Provider, message: pb.Message
) -> None:
    error = await fail(provider, make_params(message, user("Hi")))
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, "messages[0].parts[1]")
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("response_format", "spec"),
    [
        (
            pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                name="weather_report",
                description="A weather report.",
                schema=json.dumps(REPORT_SCHEMA),
                strict=True,
            ),
            {"name": "weather_report", "description": "A weather report.", "inputSchema": {"json": REPORT_SCHEMA}},
        ),
        (
            pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
            {
                "name": "json_object",
                "description": "Give your answer as a JSON object.",
                "inputSchema": {"json": {"type": "object"}},
            },
        ),
    ],
    ids=["json_schema", "json_object"],
)
@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_response_format_is_a_forced_tool(
    upstream: BedrockUpstream,
    provider: Provider,
    response_format: pb.ResponseFormat,
    spec: dict[str, Any],
    incremental: bool,
) -> None:
    upstream.text, upstream.stop_reason = [], "tool_use"
    upstream.tool_uses = [ToolUse("tooluse_report04", spec["name"], {"city": "Paris", "celsius": 18})]
    events = await events_of(provider, make_params(response_format=response_format), incremental=incremental)
    assert json.loads("".join(event.delta.text for event in events[:-1])) == {"city": "Paris", "celsius": 18}
    assert events[-1] == finished(F.FINISH_REASON_STOP)
    assert upstream.requests[0].body == {
        "messages": [{"role": "user", "content": [{"text": "Say hello"}]}],
        "toolConfig": {"tools": [{"toolSpec": spec}], "toolChoice": {"tool": {"name": spec["name"]}}},
    }


async def test_response_format_with_tool_blocks_in_the_history_forces_the_answer_even_after_none(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    response_format = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    tool_choice = choice(pb.TOOL_CHOICE_MODE_NONE)  # honoured: the model can only call the answer tool
    await run(provider, make_params(*TOOL_HISTORY, response_format=response_format, tool_choice=tool_choice))
    assert upstream.requests[0].body["toolConfig"] == {
        "tools": [
            {"toolSpec": {"name": "get_weather", "inputSchema": {"json": {"type": "object"}}}},
            {"toolSpec": {"name": "now", "inputSchema": {"json": {"type": "object"}}}},
            {
                "toolSpec": {
                    "name": "json_object",
                    "description": "Give your answer as a JSON object.",
                    "inputSchema": {"json": {"type": "object"}},
                }
            },
        ],
        "toolChoice": {"tool": {"name": "json_object"}},
    }


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "response_format": pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)},
            "response_format",
        ),
        (
            {"response_format": pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="r", schema="{")},
            "response_format.schema",
        ),
    ],
    ids=["with-tools", "schema-not-json"],
)
async def test_response_formats_converse_cannot_take_are_400s(
    upstream: BedrockUpstream, provider: Provider, fields: dict[str, Any], param: str
) -> None:
    error = await fail(provider, make_params(**fields))
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert upstream.requests == []


async def test_whole_tool_calls_become_tool_call_events_in_block_order(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = ["Let me check."], [PARIS, ROME], "tool_use"
    events = await events_of(provider, make_params(tools=[WEATHER]), incremental=False)
    assert events == [
        content("Let me check."),
        tool_call(0, '{"city":"Paris"}', id="tooluse_paris01", name="get_weather"),
        tool_call(1, '{"city":"Rome"}', id="tooluse_rome02", name="get_weather"),
        finished(F.FINISH_REASON_TOOL_CALLS),
    ]


async def test_streamed_parallel_tool_calls_keep_their_own_indexes(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = ["Let me ", "check."], [PARIS, ROME], "tool_use"
    events = await events_of(provider, make_params(tools=[WEATHER]))
    assert events == [
        content("Let me "),
        content("check."),
        tool_call(0, "", id="tooluse_paris01", name="get_weather"),  # contentBlockIndex 1 is call 0
        tool_call(0, '{"ci'),
        tool_call(0, 'ty": "Par'),
        tool_call(0, 'is"}'),
        tool_call(1, "", id="tooluse_rome02", name="get_weather"),  # contentBlockIndex 2 is call 1
        tool_call(1, '{"city": '),
        tool_call(1, '"Rome"}'),
        finished(F.FINISH_REASON_TOOL_CALLS),
    ]
    [request] = upstream.requests
    assert request.operation == "converse-stream"


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_parallel_tool_calls_false_relays_only_the_first_call(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [PARIS, ROME], "tool_use"
    params = make_params(tools=[WEATHER], parallel_tool_calls=False)
    events = await events_of(provider, params, incremental=incremental)
    calls = [event.tool_call for event in events if event.HasField("tool_call")]
    assert {call.index for call in calls} == {0}
    assert [call.id for call in calls if call.id] == ["tooluse_paris01"]
    assert json.loads("".join(call.arguments for call in calls)) == {"city": "Paris"}
    assert events[-1] == finished(F.FINISH_REASON_TOOL_CALLS)
    assert "parallel" not in json.dumps(upstream.requests[0].body)  # Converse has no such switch


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", F.FINISH_REASON_TOOL_CALLS),  # an answer with calls finishes tool_calls, whatever was said
        ("max_tokens", F.FINISH_REASON_LENGTH),
        ("content_filtered", F.FINISH_REASON_CONTENT_FILTER),
    ],
)
async def test_an_answer_with_tool_calls_finishes_tool_calls_unless_cut(
    upstream: BedrockUpstream, provider: Provider, stop_reason: str, finish_reason: int, incremental: bool
) -> None:
    upstream.tool_uses, upstream.stop_reason = [PARIS], stop_reason
    events = await events_of(provider, make_params(tools=[WEATHER]), incremental=incremental)
    assert events[-1].finish.choices[0].finish_reason == finish_reason


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_call_without_arguments_gets_an_empty_object(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text, upstream.stop_reason = [], "tool_use"
    upstream.tool_uses = [ToolUse("tooluse_now03", "now", {}, pieces=[])]  # Bedrock streams no input at all
    events = await events_of(provider, make_params(tools=[NOW]), incremental=incremental)
    calls = [event.tool_call for event in events if event.HasField("tool_call")]
    assert "".join(call.arguments for call in calls) == "{}"
    assert calls[0].id == "tooluse_now03" and calls[0].name == "now"


@pytest.mark.parametrize(
    "events",
    [
        [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '{"a": 1}'}}})],
        [
            ("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "t1", "name": "now"}}}),
            ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{}"}}}),
        ],
        [
            ("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "t1", "name": "now"}}}),
            ("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "t2", "name": "now"}}}),
        ],
    ],
    ids=["never-started", "another-block", "started-twice"],
)
async def test_tool_deltas_that_break_the_block_order_are_protocol_errors(
    upstream: BedrockUpstream, provider: Provider, events: list[tuple[str, dict[str, Any]]]
) -> None:
    upstream.events = [
        ("messageStart", {"role": "assistant"}),
        *events,
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": DEFAULT_USAGE, "metrics": {"latencyMs": 1}}),
    ]
    with pytest.raises(GatewayError) as raised:
        await events_of(provider, make_params(tools=[NOW]))
    assert raised.value.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


REPORT = pb.ResponseFormat(
    type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather_report", schema=json.dumps(REPORT_SCHEMA)
)
REPORT_USE = ToolUse(
    "tooluse_report04",
    "weather_report",
    {"city": "Paris", "celsius": 18},
    pieces=['{"city": "Pa', 'ris", "celsius": 18}'],
)


async def test_structured_output_streams_the_forced_tool_input_as_content(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = ["Here you go: "], [REPORT_USE], "tool_use"
    events = await events_of(provider, make_params(response_format=REPORT))
    # The model's words beside the answer are not the answer; the tool_use stop is a plain stop.
    assert events == [content('{"city": "Pa'), content('ris", "celsius": 18}'), finished(F.FINISH_REASON_STOP)]


async def test_structured_output_whole_is_the_forced_tool_input_as_compact_json(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = ["Here you go: "], [REPORT_USE], "tool_use"
    events = await events_of(provider, make_params(response_format=REPORT), incremental=False)
    assert events == [content('{"city":"Paris","celsius":18}'), finished(F.FINISH_REASON_STOP)]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_structured_output_the_model_wrote_as_text_is_the_content(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text = ['{"city": "Paris",', ' "celsius": 18}']  # a model that ignored the forced tool
    events = await events_of(provider, make_params(response_format=REPORT), incremental=incremental)
    assert events == [content('{"city": "Paris", "celsius": 18}'), finished(F.FINISH_REASON_STOP)]


async def test_structured_output_that_calls_another_tool_is_a_protocol_error(
    upstream: BedrockUpstream, provider: Provider
) -> None:
    upstream.tool_uses, upstream.stop_reason = [PARIS], "tool_use"
    error = await fail(provider, make_params(*TOOL_HISTORY, response_format=REPORT))
    assert error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL


# --- strict: the gateway enforces what Converse cannot promise ----------------------------------------------------

STRICT_REPORT = pb.ResponseFormat(
    type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="weather_report", schema=json.dumps(REPORT_SCHEMA), strict=True
)
STRICT_WEATHER = pb.Tool(
    name="get_weather", description="The weather in a city.", parameters=json.dumps(WEATHER_SCHEMA), strict=True
)
MISMATCH = "The model's answer for 'deepseek-v3.2' did not match the schema (strict: true), so it is not passed on: "


async def relayed(
    provider: Provider, params: pb.CompletionParams, *, incremental: bool
) -> tuple[list[svc.StreamCompletionResponse], GatewayError | None]:
    """The events relayed, and the error that ended them; None when they ended with their finish."""
    events: list[svc.StreamCompletionResponse] = []
    try:
        async with aclosing(provider.stream(params, incremental=incremental)) as stream:  # type: ignore[type-var]
            async for event in stream:
                events.append(event)
    except GatewayError as error:
        assert error.provider == "bedrock"
        return events, error
    return events, None


def report_use(answer: dict[str, Any]) -> ToolUse:
    """The forced answer tool's call with this input, streamed as json.dumps(answer) cut in two."""
    return ToolUse("tooluse_report04", "weather_report", answer)


def halves(value: dict[str, Any]) -> list[str]:
    text = json.dumps(value)
    return [text[: len(text) // 2], text[len(text) // 2 :]]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_strict_structured_output_that_matches_is_relayed_as_it_comes(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [REPORT_USE], "tool_use"
    events, error = await relayed(provider, make_params(response_format=STRICT_REPORT), incremental=incremental)
    assert error is None
    pieces = ['{"city": "Pa', 'ris", "celsius": 18}'] if incremental else ['{"city":"Paris","celsius":18}']
    assert events == [*map(content, pieces), finished(F.FINISH_REASON_STOP)]
    # Converse has no strict switch: the request is the one a non-strict json_schema makes.
    assert upstream.requests[0].body["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "weather_report", "inputSchema": {"json": REPORT_SCHEMA}}}],
        "toolChoice": {"tool": {"name": "weather_report"}},
    }


NOT_REPORTS = [
    ({"city": "Paris", "celsius": "mild"}, "at $.celsius: 'mild' is not of type 'number'"),
    ({"city": "Paris"}, "at $: 'celsius' is a required property"),
    (
        {"city": "Paris", "celsius": 18, "wind": 3},
        "at $: Additional properties are not allowed ('wind' was unexpected)",
    ),
]


@pytest.mark.parametrize(("answer", "problem"), NOT_REPORTS, ids=["wrong-type", "missing", "extra"])
async def test_a_strict_structured_answer_that_does_not_match_is_an_error_not_the_content(
    upstream: BedrockUpstream, provider: Provider, answer: dict[str, Any], problem: str
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [report_use(answer)], "tool_use"
    params = make_params(response_format=STRICT_REPORT)
    expected = f"{MISMATCH}the structured answer does not match 'response_format.schema' {problem}"

    # A whole answer: nothing is relayed, the call fails (a 502 through the bridge).
    events, error = await relayed(provider, params, incremental=False)
    assert events == []
    assert error is not None and (error.reason, error.message) == (R.ERROR_REASON_UPSTREAM_PROTOCOL, expected)

    # A stream: the pieces went out as they came (nothing held back), then the error ends it instead of a finish.
    events, error = await relayed(provider, params, incremental=True)
    assert events == [content(piece) for piece in halves(answer)]
    assert error is not None and (error.reason, error.message) == (R.ERROR_REASON_UPSTREAM_PROTOCOL, expected)


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_strict_structured_answer_written_as_prose_is_an_error(
    upstream: BedrockUpstream, provider: Provider, incremental: bool, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.text = ["Sorry, ", "I cannot tell."]  # the model ignored the forced tool: its text would be the answer
    events, error = await relayed(provider, make_params(response_format=STRICT_REPORT), incremental=incremental)
    assert events == []  # such text is held until the answer ends anyway
    assert error is not None and error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    assert error.message == f"{MISMATCH}the structured answer is not JSON text"
    [record] = [r for r in caplog.records if "strict schema" in r.getMessage()]
    assert record.levelno == logging.WARNING and "555555555555" in record.getMessage()  # with AWS's request id


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_strict_tool_call_arguments_that_do_not_match_are_an_error(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    rome = ToolUse("tooluse_rome02", "get_weather", {"town": "Rome"}, pieces=['{"town": ', '"Rome"}'])
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [PARIS, rome], "tool_use"
    events, error = await relayed(provider, make_params(tools=[NOW, STRICT_WEATHER]), incremental=incremental)
    assert error is not None and error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    assert error.message == (
        f"{MISMATCH}tool call 1 does not match 'tools[1].parameters' at $: 'city' is a required property"
    )
    if incremental:  # both calls went out as they came; the check ran when the answer ended, before any finish
        assert events == [
            tool_call(0, "", id="tooluse_paris01", name="get_weather"),
            tool_call(0, '{"ci'),
            tool_call(0, 'ty": "Par'),
            tool_call(0, 'is"}'),
            tool_call(1, "", id="tooluse_rome02", name="get_weather"),
            tool_call(1, '{"town": '),
            tool_call(1, '"Rome"}'),
        ]
    else:
        assert events == []


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_strict_tool_calls_that_match_and_calls_of_other_tools_pass(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    anything = ToolUse("tooluse_now03", "now", {"zone": 1}, pieces=['{"zone": 1}'])  # `now` is not strict
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [PARIS, anything, ROME], "tool_use"
    events, error = await relayed(provider, make_params(tools=[STRICT_WEATHER, NOW]), incremental=incremental)
    assert error is None
    calls = [event.tool_call for event in events if event.HasField("tool_call")]
    arguments = {index: "".join(c.arguments for c in calls if c.index == index) for index in (0, 1, 2)}
    assert {index: json.loads(text) for index, text in arguments.items()} == {
        0: {"city": "Paris"},
        1: {"zone": 1},
        2: {"city": "Rome"},
    }
    assert events[-1] == finished(F.FINISH_REASON_TOOL_CALLS)


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_strict_call_without_arguments_is_checked_as_an_empty_object(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text, upstream.stop_reason = [], "tool_use"
    upstream.tool_uses = [ToolUse("tooluse_paris01", "get_weather", {}, pieces=[])]  # Bedrock streams no input
    events, error = await relayed(provider, make_params(tools=[STRICT_WEATHER]), incremental=incremental)
    assert error is not None and error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL
    problem = "tool call 0 does not match 'tools[0].parameters' at $: 'city' is a required property"
    assert error.message == MISMATCH + problem
    # The stream relayed the call's start and the `{}` it stands for, then the error instead of the finish.
    start = tool_call(0, "", id="tooluse_paris01", name="get_weather")
    assert events == ([start, tool_call(0, "{}")] if incremental else [])


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_without_strict_answers_that_do_not_match_are_passed_through(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [report_use({"celsius": "mild"})], "tool_use"
    events, error = await relayed(provider, make_params(response_format=REPORT), incremental=incremental)
    assert error is None and events[-1] == finished(F.FINISH_REASON_STOP)
    assert json.loads("".join(event.delta.text for event in events[:-1])) == {"celsius": "mild"}

    upstream.tool_uses = [ToolUse("tooluse_rome02", "get_weather", {"town": "Rome"})]
    events, error = await relayed(provider, make_params(tools=[WEATHER]), incremental=incremental)
    assert error is None and events[-1] == finished(F.FINISH_REASON_TOOL_CALLS)
    arguments = "".join(event.tool_call.arguments for event in events if event.HasField("tool_call"))
    assert json.loads(arguments) == {"town": "Rome"}


def test_without_strict_nothing_is_checked_or_kept() -> None:
    # No schema compiled, so no copy of the relayed pieces is kept either (tools with `strict: false` alike).
    lax = pb.Tool(name="get_weather", parameters=json.dumps(WEATHER_SCHEMA), strict=False)
    assert converse_request(MODEL_ID, make_params(response_format=REPORT))[1] == AnswerShape("weather_report")
    assert converse_request(MODEL_ID, make_params(tools=[WEATHER, NOW, lax]))[1] == AnswerShape()
    shape = converse_request(MODEL_ID, make_params(tools=[NOW, STRICT_WEATHER]))[1]
    assert (shape.answer_check, list(shape.call_checks)) == (None, ["get_weather"])
    assert shape.call_checks["get_weather"].field == "tools[1].parameters"


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
async def test_a_strict_answer_cut_by_length_keeps_its_finish(
    upstream: BedrockUpstream, provider: Provider, incremental: bool
) -> None:
    # The finish says the answer is incomplete, as OpenAI's does for a strict answer cut by max_tokens.
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [report_use({"city": "Par"})], "max_tokens"
    events, error = await relayed(provider, make_params(response_format=STRICT_REPORT), incremental=incremental)
    assert error is None and events[-1].finish.choices[0].finish_reason == F.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"city": {"type": "strin"}}}, "at $.properties.city.type: 'strin' is not"),
        ({"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}}, "the reference '#/$defs/City' does"),
        ({"$schema": "https://example.com/my-dialect", "type": "object"}, "'$schema' 'https://example.com/my-dialect'"),
    ],
    ids=["bad-keyword", "dangling-ref", "unknown-dialect"],
)
@pytest.mark.parametrize("where", ["response_format", "tool"])
async def test_a_strict_schema_that_is_not_a_valid_json_schema_is_a_400_naming_it(
    upstream: BedrockUpstream, provider: Provider, schema: dict[str, Any], problem: str, where: str
) -> None:
    if where == "tool":
        tool = pb.Tool(name="get_weather", parameters=json.dumps(schema), strict=True)
        params, param = make_params(tools=[NOW, tool]), "tools[1].parameters"
    else:
        response_format = pb.ResponseFormat(
            type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="r", schema=json.dumps(schema), strict=True
        )
        params, param = make_params(response_format=response_format), "response_format.schema"
    error = await fail(provider, params)
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert error.message.startswith(f"'{param}' is not a valid JSON Schema (needed for strict: true): {problem}")
    assert upstream.requests == []

    # Without strict the gateway checks nothing: the schema goes to Bedrock as before, which may judge it itself.
    if where == "tool":
        params.tools[1].ClearField("strict")
    else:
        params.response_format.strict = False
    await run(provider, params)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"choice_count": 2}, "choice_count"),
        ({"seed": 7}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"reasoning_effort": pb.REASONING_EFFORT_HIGH}, "reasoning_effort"),
        ({"top_k": 40}, "top_k"),
        ({"reasoning_budget_tokens": 2048}, "reasoning_budget_tokens"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_parameters_converse_cannot_honour_are_refused_before_any_request(
    upstream: BedrockUpstream, provider: Provider, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(GatewayError) as raised:  # the core's one check, before dispatch, against the declared data
        check_supported(make_params(**fields), provider.supported, provider="bedrock")
    error = raised.value
    assert (error.reason, error.field) == (R.ERROR_REASON_INVALID_REQUEST, param)
    assert f"'{param}'" in error.message
    assert upstream.requests == []


def test_supported_features_are_what_converse_can_honour() -> None:
    # The core refuses the others before dispatch (the parameters above): Converse has no field for any of them.
    assert BedrockProvider.supported == {"tools", "parallel_tool_calls", "response_format", "images"}
    assert BedrockProvider.supported <= set(FEATURES)


async def test_defaults_of_refused_parameters_and_user_are_fine(upstream: BedrockUpstream, provider: Provider) -> None:
    params = make_params(
        choice_count=1, presence_penalty=0.0, frequency_penalty=0.0, user="end-user-42", parallel_tool_calls=True
    )
    await run(provider, params)
    assert upstream.requests[0].body == {"messages": [{"role": "user", "content": [{"text": "Say hello"}]}]}


# --- errors ------------------------------------------------------------------------------------------------------

HTTP_ERRORS = [
    (400, "ValidationException", R.ERROR_REASON_INVALID_REQUEST),
    (403, "AccessDeniedException", R.ERROR_REASON_UPSTREAM_AUTH),
    (403, "UnrecognizedClientException", R.ERROR_REASON_UPSTREAM_AUTH),
    (403, "ExpiredTokenException", R.ERROR_REASON_UPSTREAM_AUTH),
    (403, "InvalidSignatureException", R.ERROR_REASON_UPSTREAM_AUTH),
    (404, "ResourceNotFoundException", R.ERROR_REASON_MODEL_NOT_FOUND),
    (408, "ModelTimeoutException", R.ERROR_REASON_UPSTREAM_TIMEOUT),
    (424, "ModelErrorException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (429, "ThrottlingException", R.ERROR_REASON_RATE_LIMITED),
    (429, "ModelNotReadyException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (500, "InternalServerException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (503, "ServiceUnavailableException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    (503, "", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),  # no error type: botocore's code is the bare status
    (429, "", R.ERROR_REASON_RATE_LIMITED),
    (504, "", R.ERROR_REASON_UPSTREAM_TIMEOUT),
]


@pytest.mark.parametrize("incremental", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(("status", "error_type", "reason"), HTTP_ERRORS, ids=[f"{s}-{t}" for s, t, _ in HTTP_ERRORS])
async def test_http_errors_map_through_the_table(
    upstream: BedrockUpstream, provider: Provider, status: int, error_type: str, reason: int, incremental: bool
) -> None:
    upstream.error_status, upstream.error_type = status, error_type
    upstream.error_message = "User: arn:aws:iam::123456789012:user/gw is not authorized (AKIAFAKEFAKEFAKEFAKE)"
    error = await fail(provider, incremental=incremental)
    assert error.reason == reason
    assert len(upstream.requests) == 1  # the SDK retried nothing
    if reason == R.ERROR_REASON_INVALID_REQUEST:
        assert error.message == upstream.error_message  # the caller's own mistake: AWS's words help
    else:  # a fixed message: no account, key or upstream detail reaches the caller
        assert "arn:aws" not in error.message and "AKIA" not in error.message and "401" not in error.message
        assert "'deepseek-v3.2'" in error.message


STREAM_ERRORS = [
    ("throttlingException", R.ERROR_REASON_RATE_LIMITED),
    ("validationException", R.ERROR_REASON_INVALID_REQUEST),
    ("internalServerException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    ("serviceUnavailableException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
    ("modelStreamErrorException", R.ERROR_REASON_UPSTREAM_UNAVAILABLE),
]


@pytest.mark.parametrize(("code", "reason"), STREAM_ERRORS, ids=[c for c, _ in STREAM_ERRORS])
async def test_exception_frames_mid_stream_map_through_the_same_table(
    upstream: BedrockUpstream, provider: Provider, code: str, reason: int
) -> None:
    upstream.stream_error_after, upstream.stream_error_type = 2, code
    received: list[str] = []
    with pytest.raises(GatewayError) as raised:
        async with aclosing(provider.stream(make_params())) as events:  # type: ignore[type-var]
            async for event in events:
                assert not event.HasField("finish")
                received.append(event.delta.text)
    assert received == ["Hello", ", "]
    assert raised.value.reason == reason and raised.value.provider == "bedrock"


@pytest.mark.parametrize("in_stream", [False, True], ids=["http-400", "exception-frame"])
@pytest.mark.parametrize("message", TOO_LONG_MESSAGES)
async def test_a_prompt_over_the_window_is_context_length_exceeded(
    upstream: BedrockUpstream, provider: Provider, message: str, in_stream: bool
) -> None:
    if in_stream:
        upstream.stream_error_after, upstream.stream_error_type, upstream.stream_error_message = (
            0,
            "validationException",
            message,
        )
    else:
        upstream.error_status, upstream.error_type, upstream.error_message = 400, "ValidationException", message
    error = await fail(provider)
    assert error.reason == R.ERROR_REASON_CONTEXT_LENGTH_EXCEEDED
    assert error.message == message and error.field == "messages"


async def test_other_validation_messages_are_forwarded_truncated(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.error_status, upstream.error_type = 400, "ValidationException"
    upstream.error_message = "The provided request is not valid. " + "x" * 1000
    error = await fail(provider)
    assert error.reason == R.ERROR_REASON_INVALID_REQUEST
    assert error.message == upstream.error_message[:500]


@pytest.mark.parametrize(
    ("script", "logged"),
    [
        ({"error_status": 418, "error_type": "BrandNewException"}, "BrandNewException"),
        (
            {"stream_error_after": 1, "stream_error_kind": "error", "stream_error_type": "brandNewError"},
            "brandNewError",
        ),
        # botocore gives an exception frame of a type it does not know an empty code: only the id identifies it
        ({"stream_error_after": 1, "stream_error_type": "brandNewException"}, "(no code)"),
    ],
    ids=["http", "error-frame", "unknown-exception-frame"],
)
async def test_an_unknown_error_is_internal_and_logged_once_with_the_request_id(
    upstream: BedrockUpstream, provider: Provider, caplog: pytest.LogCaptureFixture, script: dict[str, Any], logged: str
) -> None:
    for name, value in script.items():
        setattr(upstream, name, value)
    upstream.error_message = upstream.stream_error_message = "something new"
    with caplog.at_level(logging.ERROR, logger="services.providers.bedrock"):
        error = await fail(provider)
    assert error.reason == R.ERROR_REASON_INTERNAL
    assert "something new" not in error.message
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged in record.getMessage() and upstream.request_id in record.getMessage()


async def test_a_dropped_connection_mid_stream_is_unavailable(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.abort_after = 2
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE


@pytest.mark.parametrize(
    ("script", "incremental"),
    [({"response_delay": 0.6}, True), ({"response_delay": 0.6}, False), ({"chunk_delay": 0.6}, True)],
    ids=["before-the-stream", "before-the-answer", "between-events"],
)
async def test_read_timeouts(
    upstream: BedrockUpstream, backend: BedrockBackend, script: dict[str, float], incremental: bool
) -> None:
    provider = await backend.provider_for(make_entry(fake_options(upstream, read_timeout_seconds=0.2)))
    for name, value in script.items():
        setattr(upstream, name, value)
    started = asyncio.get_running_loop().time()
    assert (await fail(provider, incremental=incremental)).reason == R.ERROR_REASON_UPSTREAM_TIMEOUT
    assert asyncio.get_running_loop().time() - started < 0.5
    assert len(upstream.requests) == 1


async def test_an_unreachable_endpoint_is_unavailable(backend: BedrockBackend) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = make_entry(
        {"region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{port}", "connect_timeout_seconds": 1}
    )
    provider = await backend.provider_for(entry)
    assert (await fail(provider)).reason == R.ERROR_REASON_UPSTREAM_UNAVAILABLE


async def test_no_credentials_at_all_fails_fast_as_upstream_auth(
    upstream: BedrockUpstream, backend: BedrockBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    isolate_aws_config(monkeypatch, tmp_path)
    provider = await backend.provider_for(make_entry(fake_options(upstream)))
    started = asyncio.get_running_loop().time()
    error = await fail(provider)
    assert error.reason == R.ERROR_REASON_UPSTREAM_AUTH
    assert error.message == "The gateway has no usable AWS credentials for 'deepseek-v3.2'."
    assert asyncio.get_running_loop().time() - started < 1.0
    assert upstream.requests == []  # nothing unsigned was sent


# --- connections -------------------------------------------------------------------------------------------------


async def test_a_consumer_that_stops_closes_the_upstream_stream(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.text = [f"token{i} " for i in range(200)]
    upstream.chunk_delay = 0.05  # ten seconds of stream
    async with aclosing(provider.stream(make_params())) as events:  # type: ignore[type-var]
        async for event in events:
            if event.HasField("delta"):
                break
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=3)
    upstream.text, upstream.chunk_delay = ["Again"], 0.0
    texts, _, _ = await run(provider)  # the shared client still serves
    assert texts == ["Again"]


async def test_a_cancelled_consumer_closes_the_upstream_stream(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.text = [f"token{i} " for i in range(200)]
    upstream.chunk_delay = 0.05
    first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(provider.stream(make_params())) as events:  # type: ignore[type-var]
            async for _ in events:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=3)


async def test_finished_streams_reuse_the_connection(upstream: BedrockUpstream, provider: Provider) -> None:
    await run(provider)
    await run(provider)
    await run(provider, incremental=False)
    assert len({r.client_port for r in upstream.requests}) == 1


async def test_one_client_carries_many_concurrent_streams(upstream: BedrockUpstream, provider: Provider) -> None:
    upstream.text, upstream.chunk_delay = ["a", "b"], 0.3  # every stream stays open for 0.6 s
    results = await asyncio.wait_for(asyncio.gather(*(run(provider) for _ in range(16))), timeout=3)
    assert all(texts == ["a", "b"] for texts, _, _ in results)
    assert upstream.peak_open_streams == 16  # botocore's default pool (10) would have queued six of them


def test_the_frame_encoder_matches_the_documented_example() -> None:
    encoded = frame("messageStop", {"stopReason": "end_turn"})
    assert len(encoded) == 123
    assert encoded[:12].hex() == "0000007b00000051f74c6fd5" and encoded[-4:].hex() == "e70e424b"
