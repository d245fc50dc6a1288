"""The whole path to AWS Bedrock: openai SDK -> bridge -> core -> `bedrock` provider (real aioboto3) -> the fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.e2e.chunks import content_of, finish_reasons
from tests.fakes.bedrock import BedrockUpstream, ToolUse, isolate_aws_config, serve_bedrock, use_fake_credentials

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
    upstream.reasoning_signature = "c2ln"  # OpenAI's shape has no place for it: no chunk at all, not an empty one
    plain = await client.chat.completions.create(model=PUBLIC, messages=MESSAGES)
    chunks = await stream_all(client, messages=MESSAGES)

    assert plain.choices[0].message.content == "Hello, world!"
    assert getattr(plain.choices[0].message, "reasoning_content", None) == "The user says hello."
    reasoning = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices]
    assert [piece for piece in reasoning if piece is not None] == ["The user ", "says hello."]
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
    assert len(upstream.requests) == (3 if status in (429, 503, 504) else 1)  # retryable: the default 3 tries


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


# --- tools, structured output, parameters ------------------------------------------------------------------------

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER_SCHEMA},
}
WEATHER_SPEC = {
    "toolSpec": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "inputSchema": {"json": WEATHER_SCHEMA},
    }
}
QUESTION: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
PARIS = ToolUse("tooluse_paris01", "get_weather", {"city": "Paris"}, pieces=['{"ci', 'ty": "Par', 'is"}'])
ROME = ToolUse("tooluse_rome02", "get_weather", {"city": "Rome"}, pieces=['{"city": ', '"Rome"}'])


async def complete(client: openai.AsyncOpenAI, stream: bool, **request: Any) -> tuple[Any, str]:
    """The answer's message and finish reason: from a plain call, or from a stream the SDK assembled."""
    if not stream:
        plain = await client.chat.completions.create(model=PUBLIC, **request)
        return plain.choices[0].message, plain.choices[0].finish_reason
    async with client.chat.completions.stream(model=PUBLIC, **request) as events:
        final = await events.get_final_completion()
    return final.choices[0].message, final.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_tool_loop_call_then_result_then_answer(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, stream: bool
) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = [], [PARIS], "tool_use"
    message, finish_reason = await complete(client, stream, messages=QUESTION, tools=[WEATHER_TOOL])

    assert finish_reason == "tool_calls"
    assert not message.content
    [call] = message.tool_calls
    assert (call.id, call.type, call.function.name) == ("tooluse_paris01", "function", "get_weather")
    # Whole answers carry the input as compact JSON; streams carry Bedrock's own pieces, joined by the SDK.
    assert call.function.arguments == ('{"city": "Paris"}' if stream else '{"city":"Paris"}')

    upstream.text, upstream.tool_uses, upstream.stop_reason = ["It is 18°C and sunny in Paris."], [], "end_turn"
    replayed = {
        "role": "assistant",
        "content": message.content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"}
    message, finish_reason = await complete(
        client, stream, messages=[*QUESTION, replayed, result], tools=[WEATHER_TOOL]
    )

    assert (message.content, finish_reason) == ("It is 18°C and sunny in Paris.", "stop")
    assert not message.tool_calls
    first, second = upstream.requests
    assert first.operation == second.operation == ("converse-stream" if stream else "converse")
    assert first.body == {
        "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]}],
        "toolConfig": {"tools": [WEATHER_SPEC]},
    }
    assert second.body == {
        "messages": [
            {"role": "user", "content": [{"text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": [
                    {"toolUse": {"toolUseId": "tooluse_paris01", "name": "get_weather", "input": {"city": "Paris"}}}
                ],
            },
            {
                "role": "user",
                "content": [{"toolResult": {"toolUseId": "tooluse_paris01", "content": [{"text": "18°C, sunny"}]}}],
            },
        ],
        "toolConfig": {"tools": [WEATHER_SPEC]},
    }


async def test_two_parallel_tool_calls_in_one_stream(client: openai.AsyncOpenAI, upstream: BedrockUpstream) -> None:
    upstream.text, upstream.tool_uses, upstream.stop_reason = ["Checking ", "both."], [PARIS, ROME], "tool_use"
    request: dict[str, Any] = {"messages": [{"role": "user", "content": "Paris and Rome?"}], "tools": [WEATHER_TOOL]}
    chunks = await stream_all(client, **request)
    async with client.chat.completions.stream(model=PUBLIC, **request) as events:
        final = await events.get_final_completion()

    # On the wire, exactly as OpenAI streams them: each call's first delta has its id and name, the rest only
    # pieces of its arguments.
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.id, d.function and d.function.name) for d in deltas if d.id] == [
        (0, "tooluse_paris01", "get_weather"),
        (1, "tooluse_rome02", "get_weather"),
    ]
    assert all(d.function is None or d.function.name is None for d in deltas if not d.id)
    pieces = {i: "".join(d.function.arguments or "" for d in deltas if d.index == i and d.function) for i in (0, 1)}
    assert pieces == {0: '{"city": "Paris"}', 1: '{"city": "Rome"}'}
    assert content_of(chunks) == "Checking both."
    assert finish_reasons(chunks) == ["tool_calls"]
    # And the SDK assembles them.
    message = final.choices[0].message
    assert message.content == "Checking both." and final.choices[0].finish_reason == "tool_calls"
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []] == [
        ("tooluse_paris01", "get_weather", {"city": "Paris"}),
        ("tooluse_rome02", "get_weather", {"city": "Rome"}),
    ]


class WeatherReport(pydantic.BaseModel):
    city: str
    celsius: float


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_structured_output_with_a_json_schema(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, stream: bool
) -> None:
    pieces = ['{"city": "Pa', 'ris", "celsius": 18.5}']
    upstream.text, upstream.stop_reason = [], "tool_use"
    upstream.tool_uses = [ToolUse("tooluse_report04", "WeatherReport", {"city": "Paris", "celsius": 18.5}, pieces)]
    if stream:
        async with client.chat.completions.stream(model=PUBLIC, messages=QUESTION, response_format=WeatherReport) as s:
            answer = await s.get_final_completion()
    else:
        answer = await client.chat.completions.parse(model=PUBLIC, messages=QUESTION, response_format=WeatherReport)

    [choice] = answer.choices
    assert choice.finish_reason == "stop"  # never tool_calls: the forced tool is how Bedrock answers, not a call
    assert not choice.message.tool_calls
    assert choice.message.content == ("".join(pieces) if stream else '{"city":"Paris","celsius":18.5}')
    assert choice.message.parsed == WeatherReport(city="Paris", celsius=18.5)
    schema = {
        "type": "object",
        "title": "WeatherReport",
        "properties": {"city": {"title": "City", "type": "string"}, "celsius": {"title": "Celsius", "type": "number"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    }
    assert upstream.requests[0].body == {
        "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]}],
        "toolConfig": {
            "tools": [{"toolSpec": {"name": "WeatherReport", "inputSchema": {"json": schema}}}],
            "toolChoice": {"tool": {"name": "WeatherReport"}},
        },
    }


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"seed": 7}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
    ],
    ids=["n", "seed", "presence_penalty", "frequency_penalty", "logprobs", "reasoning_effort", "format-and-tools"],
)
async def test_what_bedrock_cannot_honour_is_a_400_naming_the_param(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, request_fields: dict[str, Any], param: str
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model=PUBLIC, messages=MESSAGES, stream=stream, **request_fields)
        assert raised.value.param == param and raised.value.type == "invalid_request_error"
    assert upstream.requests == []


# --- strict: enforced by the gateway, since Converse cannot promise it --------------------------------------------


class WeatherQuery(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_strict_answer_that_does_not_match_its_schema_is_a_502_never_parsed(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, stream: bool
) -> None:
    # parse() and stream() send the pydantic model's schema with strict: true.
    upstream.text, upstream.stop_reason = [], "tool_use"
    pieces = ['{"city": "Paris", ', '"celsius": "mild"}']
    upstream.tool_uses = [ToolUse("tooluse_report04", "WeatherReport", {"city": "Paris", "celsius": "mild"}, pieces)]
    with pytest.raises(openai.APIError) as raised:
        if stream:
            async with client.chat.completions.stream(
                model=PUBLIC, messages=QUESTION, response_format=WeatherReport
            ) as s:
                await s.get_final_completion()
        else:
            await client.chat.completions.parse(model=PUBLIC, messages=QUESTION, response_format=WeatherReport)
    if not stream:
        assert isinstance(raised.value, openai.InternalServerError) and raised.value.status_code == 502
    assert (raised.value.type, raised.value.code) == ("api_error", "upstream_protocol_error")
    assert raised.value.message.endswith(  # the SDK puts "Error code: 502 - " before a status error's message
        "The model's answer for 'deepseek-v3.2' did not match the schema (strict: true), so it is not passed on: "
        "the structured answer does not match 'response_format.json_schema.schema' at $.celsius: "
        "'mild' is not of type 'number'"
    )


async def test_a_strict_stream_relays_its_pieces_then_ends_with_the_error_and_no_finish(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream
) -> None:
    upstream.text, upstream.stop_reason = [], "tool_use"
    pieces = ['{"city": "Paris", ', '"celsius": "mild"}']
    upstream.tool_uses = [ToolUse("tooluse_report04", "report", {"city": "Paris", "celsius": "mild"}, pieces)]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "report", "schema": schema, "strict": True}}
    base_url = str(client.base_url).rstrip("/")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        response = await http.post(
            f"{base_url}/chat/completions",
            json={"model": PUBLIC, "messages": QUESTION, "stream": True, "response_format": response_format},
        )
    events = [event for event in response.text.split("\n\n") if event]
    assert response.status_code == 200
    contents = [json.loads(event[len("data: ") :])["choices"][0]["delta"].get("content") for event in events[:-2]]
    assert [piece for piece in contents if piece] == pieces  # relayed as they came
    assert events[-2].startswith('data: {"error":') and "upstream_protocol_error" in events[-2]
    assert "did not match the schema" in events[-2]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"' not in response.text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_strict_tool_call_arguments_that_do_not_match_are_an_error(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, stream: bool
) -> None:
    tool = openai.pydantic_function_tool(WeatherQuery, name="get_weather")  # strict: true
    assert tool["function"].get("strict") is True
    upstream.text, upstream.stop_reason = [], "tool_use"
    upstream.tool_uses = [ToolUse("tooluse_paris01", "get_weather", {"town": "Paris"}, pieces=['{"town": "Paris"}'])]
    with pytest.raises(openai.APIError) as raised:
        await complete(client, stream, messages=QUESTION, tools=[tool])
    assert raised.value.code == "upstream_protocol_error"
    assert raised.value.message.endswith(
        "tool call 0 does not match 'tools[0].function.parameters' at $: 'city' is a required property"
    )

    upstream.tool_uses = [PARIS]  # matching arguments pass as before
    message, finish_reason = await complete(client, stream, messages=QUESTION, tools=[tool])
    assert finish_reason == "tool_calls"
    assert [json.loads(call.function.arguments) for call in message.tool_calls] == [{"city": "Paris"}]


NOT_A_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {"type": "x"}}}
NOT_A_SCHEMA_TOOL = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"$ref": "#/$defs/A"}}}


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"response_format": NOT_A_SCHEMA_FORMAT}, "response_format.json_schema.schema"),
        ({"tools": [NOT_A_SCHEMA_TOOL]}, "tools[0].function.parameters"),
    ],
    ids=["response_format", "tool"],
)
async def test_a_strict_schema_that_is_not_a_json_schema_is_a_400_naming_it(
    client: openai.AsyncOpenAI, upstream: BedrockUpstream, request_fields: dict[str, Any], param: str
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model=PUBLIC, messages=QUESTION, stream=stream, **request_fields)
        assert raised.value.param == param and raised.value.type == "invalid_request_error"
        assert "is not a valid JSON Schema (needed for strict: true)" in raised.value.message
    assert upstream.requests == []
