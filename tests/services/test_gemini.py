"""The `gemini` provider: its tables, and the real google-genai client driven through its backend against the fake."""

from __future__ import annotations

import asyncio
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
from services.errors import GatewayError
from services.providers import Provider
from services.providers import gemini_translate as tr
from services.providers.gemini import GeminiBackend, create_backend
from tests.fakes.gemini import GeminiUpstream, google_error, serve_gemini

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


async def run(
    provider: Provider, params: pb.CompletionParams | None = None, *, incremental: bool = True
) -> tuple[list[tuple[str, str]], svc.CompletionFinish]:
    """(kind, text) of each delta, and the finish; checks that the finish comes last and exactly once."""
    deltas: list[tuple[str, str]] = []
    finish: svc.CompletionFinish | None = None
    async with aclosing(provider.stream(params or make_params(), incremental=incremental)) as events:  # type: ignore[type-var]
        async for event in events:
            assert finish is None, "an event after the finish"
            kind = event.WhichOneof("event")
            if kind == "finish":
                finish = event.finish
            else:
                text = getattr(event, kind).text
                assert text, "deltas are never empty"
                deltas.append((kind, text))
    assert finish is not None
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
    assert finish.finish_reason == F.FINISH_REASON_STOP
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
    assert exc.param == "messages"
    assert upstream.requests == []


def test_assistant_turns_become_model_turns_wherever_they_are() -> None:
    contents, config = tr.to_request(
        make_params((pb.Role.ROLE_ASSISTANT, "a"), (pb.Role.ROLE_ASSISTANT, "b"), (pb.Role.ROLE_USER, "c")), "m"
    )
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
        finish_reason=F.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=7, completion_tokens=4, total_tokens=11)
    )


async def test_no_usage_reported_leaves_it_unset(upstream: GeminiUpstream, provider: Provider) -> None:
    upstream.usage = None
    _, finish = await run(provider)
    assert finish.finish_reason == F.FINISH_REASON_STOP and not finish.HasField("usage")


@MODES
@pytest.mark.parametrize(("gemini", "expected"), sorted(tr.FINISH_REASONS.items()))
async def test_finish_reasons(
    upstream: GeminiUpstream, provider: Provider, gemini: str, expected: pb.FinishReason.ValueType, incremental: bool
) -> None:
    upstream.finish_reason = gemini
    _, finish = await run(provider, incremental=incremental)
    assert finish.finish_reason == expected


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
    upstream.function_call = {"name": "get_weather", "args": {"city": "Paris"}}
    _, finish = await run(provider, incremental=incremental)
    assert finish.finish_reason == expected


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
    assert finish.finish_reason == expected


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
        finish_reason=F.FINISH_REASON_CONTENT_FILTER, usage=pb.Usage(prompt_tokens=7, total_tokens=7)
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
    assert tr.error_reason(code, status, details) == reason


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
