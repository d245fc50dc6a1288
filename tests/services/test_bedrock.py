"""The `bedrock` provider, driven through its backend: the real aioboto3 client against the fake Bedrock server."""

from __future__ import annotations

import asyncio
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
from services.errors import GatewayError
from services.providers import Provider
from services.providers.bedrock import BedrockBackend, create_backend
from tests.fakes.bedrock import BedrockUpstream, frame, isolate_aws_config, serve_bedrock, use_fake_credentials

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
    """Texts of the deltas, texts of the reasoning deltas, and the finish, which must come last and once."""
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
                assert event.reasoning.text
                reasoning.append(event.reasoning.text)
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
        finish_reason=F.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)
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
    assert error.reason == R.ERROR_REASON_INVALID_REQUEST and error.param == "messages"
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
    assert finish.finish_reason == F.FINISH_REASON_STOP and finish.usage.total_tokens == 11
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
    assert finish.finish_reason == finish_reason


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
    upstream.reasoning_signature = "c2lnbmF0dXJl"  # a signature-only delta shows nothing
    texts, reasoning, _ = await run(provider)
    assert reasoning == ["The user ", "greets me."]
    assert texts == ["Hello", ", ", "world", "!"]


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
    assert error.message == message and error.param == "messages"


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
