"""Metering, end to end: every completion's usage record equals, to the token, what its provider reported.

For each provider (Bedrock through real aioboto3, Gemini through real google-genai, an OpenAI-compatible upstream,
the embedded local model) and each store (a SQLite file, a PostgreSQL schema), requests go through the real `openai`
SDK and the bridge with a key from the store: plain, streamed without and with `include_usage`, tool-calling, and
cancelled mid-stream. The fakes report distinct token counts (cached and reasoning ones included) in their own wire
fields; the record read back from `usage_records` must carry exactly those, the cost PRICE makes of them, and who,
what and how the request was. A direct gRPC caller is metered like an HTTP one; a call without a key is not.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.policy.keys import Budget, KeySpec
from tests.e2e.chunks import content_of, finish_reasons
from tests.e2e.metering_support import (
    PROVIDERS,
    Gateway,
    Usage,
    client_usage,
    cost_micros,
    metered_gateway,
    prompt_estimate,
    usage_of,
)
from tests.grpc_client import core_channel

MESSAGES = [{"role": "user", "content": "Write a long essay about the sea."}]
MAX_TOKENS = 4  # the local model writes that many and stops with "length"; the fakes answer their script
REQUEST: dict[str, Any] = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
# What the fakes report, distinct per request so that no record can pass for another's.
PLAIN = Usage(prompt=31, completion=9, cached=5, reasoning=2)  # (31-5)*3 + 5*0.3 + 9*15 = 214.5 micro-USD
UNPRICED = Usage(prompt=23, completion=6, cached=2, reasoning=1)
STREAMED = Usage(prompt=43, completion=12, cached=7, reasoning=3)
STREAMED_WITH_USAGE = Usage(prompt=57, completion=14, cached=11, reasoning=4)
TOOL_CALL = Usage(prompt=64, completion=17, cached=13, reasoning=5)
TOOL_CALL_STREAMED = Usage(prompt=71, completion=19, cached=17, reasoning=6)
NEVER_SENT = Usage(prompt=83, completion=21, cached=19, reasoning=7)  # scripted for the end of a cancelled stream
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
# Greedy SmolLM2 answers this with digits until max_tokens, for many seconds: it is still generating when cancelled.
ENDLESS = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
# Seconds a fake waits before each content chunk: the client has long left before the second one (and were ", "
# relayed too, ceil(7 / 4) would still be the 2 tokens of "Hello" alone).
HOLD = 0.5
# The columns that differ between two records of the same request made twice.
PER_REQUEST = {"request_id", "caller_request_id", "started_at", "duration_s", "first_token_s"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'policy.sqlite3'}"  # an absolute path: sqlite:////tmp/...
    return str(request.getfixturevalue("pg_dsn"))  # PostgreSQL only started for the tests that use it


@pytest.fixture(params=PROVIDERS)
async def gw(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    async with metered_gateway(request.param, database_url, tmp_path, monkeypatch) as gateway:
        yield gateway


def assert_record(
    row: dict[str, Any],
    gw: Gateway,
    usage: Usage,
    *,
    caller_request_id: str,
    stream: bool,
    model: str | None = None,
    status: str = "ok",
    estimated: bool = False,
    priced: bool = True,
) -> None:
    expected = {
        "caller_request_id": caller_request_id,
        "key_id": gw.key_id,
        "model": model or gw.model,
        "deployment": gw.deployment,
        "provider": gw.provider,
        "prompt_tokens": usage.prompt,
        "cached_tokens": usage.cached,
        "completion_tokens": usage.completion,
        "reasoning_tokens": usage.reasoning,
        "cost_micros": cost_micros(usage) if priced else None,  # unpriced: NULL, never 0
        "status": status,
        "stream": stream,
        "cancelled": status == "cancelled",
        "estimated": estimated,
    }
    assert {name: row[name] for name in expected} == expected
    assert len(row["request_id"]) == 32 and row["request_id"] != caller_request_id  # the core's own id
    assert row["first_token_s"] is not None and 0 < row["first_token_s"] <= row["duration_s"]


def caller_ids(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(row["caller_request_id"] for row in rows)


def by_caller(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records by caller request id, each id exactly once."""
    found = {row["caller_request_id"]: row for row in rows}
    assert len(found) == len(rows), f"two records for one request: {caller_ids(rows)}"
    return found


def usage_seen(usage: Any) -> Usage:
    """The usage an OpenAI client was shown, breakdowns included."""
    return Usage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0,
        usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else 0,
    )


async def test_a_plain_request_is_metered_as_the_provider_reported(gw: Gateway) -> None:
    expected = gw.report(PLAIN) if gw.fake is not None else None
    answer, request_id = await gw.chat(**REQUEST)
    if expected is None:  # the local model: what it counted is what the client was told
        assert answer.choices[0].finish_reason == "length"
        expected = usage_seen(answer.usage)
        assert expected.prompt > 5 and expected.completion == MAX_TOKENS
    assert answer.usage.model_dump(exclude_none=True) == client_usage(gw.provider, expected)
    # The same deployment under a name with no price: the cost is unknown (NULL), never 0.
    unpriced = gw.report(UNPRICED) if gw.fake is not None else expected  # the same greedy answer
    answer, unpriced_id = await gw.chat(**{**REQUEST, "model": gw.unpriced})
    assert answer.usage.model_dump(exclude_none=True) == client_usage(gw.provider, unpriced)

    rows = await gw.stop()  # the core's stop drains its usage writer
    assert caller_ids(rows) == sorted([request_id, unpriced_id])
    row = by_caller(rows)[request_id]
    assert_record(row, gw, expected, caller_request_id=request_id, stream=False)
    if gw.fake is not None:
        assert row["cost_micros"] == 215, "214.5 micro-USD rounds half up"
    row = by_caller(rows)[unpriced_id]
    assert_record(row, gw, unpriced, caller_request_id=unpriced_id, stream=False, model=gw.unpriced, priced=False)


async def test_streams_are_metered_exactly_with_and_without_include_usage(gw: Gateway) -> None:
    # With include_usage, and no X-Request-Id sent: the record carries the id the bridge made and returned.
    expected = gw.report(STREAMED_WITH_USAGE) if gw.fake is not None else None
    stream, with_usage_id = await gw.chat(None, **REQUEST, stream=True, stream_options={"include_usage": True})
    *content, last = [chunk async for chunk in stream]
    assert last.choices == [] and last.usage is not None
    assert all(chunk.usage is None and chunk.choices for chunk in content)
    last_chunk = usage_seen(last.usage)
    if expected is None:
        expected = last_chunk
        assert finish_reasons(content) == ["length"] and last_chunk.completion == MAX_TOKENS
    assert last.usage.model_dump(exclude_none=True) == client_usage(gw.provider, expected)

    # Without include_usage the client sees OpenAI's shape unchanged: no usage at all. The local model's count is
    # the one it just reported for the same greedy REQUEST: the same prompt, MAX_TOKENS tokens again ("length").
    unseen = gw.report(STREAMED) if gw.fake is not None else last_chunk
    stream, without_usage_id = await gw.chat(**REQUEST, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None for chunk in chunks), "no usage unless asked"
    assert all(chunk.choices for chunk in chunks), "no usage chunk (empty choices) without include_usage"
    assert finish_reasons(chunks) == ["stop" if gw.fake is not None else "length"]

    rows = await gw.stop()
    assert caller_ids(rows) == sorted([with_usage_id, without_usage_id])
    row = by_caller(rows)[with_usage_id]
    assert usage_of(row) == last_chunk
    assert_record(row, gw, expected, caller_request_id=with_usage_id, stream=True)
    assert_record(by_caller(rows)[without_usage_id], gw, unseen, caller_request_id=without_usage_id, stream=True)


async def test_tool_calling_requests_are_metered_as_the_provider_reported(gw: Gateway) -> None:
    if gw.fake is None:
        # The local model takes no tools: the core refuses the request before admitting it, so nothing is metered.
        request_id = f"metering-{uuid.uuid4().hex}"
        with pytest.raises(openai.BadRequestError) as raised:
            await gw.chat(request_id, **REQUEST, tools=TOOLS)
        assert raised.value.status_code == 400 and raised.value.param == "tools"
        assert raised.value.response.headers["x-request-id"] == request_id
        assert await gw.stop() == [], "a request refused before admission leaves no usage record"
        return
    gw.answer_with_a_tool_call()
    plain = gw.report(TOOL_CALL)
    answer, plain_id = await gw.chat(**REQUEST, tools=TOOLS)
    [call] = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert answer.usage.model_dump(exclude_none=True) == client_usage(gw.provider, plain)

    streamed = gw.report(TOOL_CALL_STREAMED)
    stream, stream_id = await gw.chat(**REQUEST, tools=TOOLS, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or []]
    assert pieces and {piece.function.name for piece in pieces if piece.function.name} == {"get_weather"}
    assert json.loads("".join(piece.function.arguments or "" for piece in pieces)) == {"city": "Paris"}
    assert finish_reasons(chunks) == ["tool_calls"]
    assert chunks[-1].usage.model_dump(exclude_none=True) == client_usage(gw.provider, streamed)

    rows = await gw.stop()
    assert caller_ids(rows) == sorted([plain_id, stream_id])
    assert_record(by_caller(rows)[plain_id], gw, plain, caller_request_id=plain_id, stream=False)
    assert_record(by_caller(rows)[stream_id], gw, streamed, caller_request_id=stream_id, stream=True)


async def cancel_after_the_first_piece(gw: Gateway, **request: Any) -> tuple[str, str]:
    """A stream the client leaves after its first content chunk; returns that text and the request id."""
    stream, request_id = await gw.chat(**request, stream=True)
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if content_of(chunks):
            break
    await stream.close()
    return content_of(chunks), request_id


async def test_a_cancelled_stream_is_metered_as_estimated_and_cancelled(gw: Gateway) -> None:
    if gw.fake is not None:
        gw.report(NEVER_SENT)  # at the end of the stream, which the client never lets it reach
        gw.fake.chunk_delay = HOLD
        messages, request = MESSAGES, REQUEST
    else:
        messages = ENDLESS
        request = {"messages": ENDLESS, "max_tokens": 1000, "temperature": 0}
    # The client leaves after its first content chunk (having asked for a usage chunk it will never get).
    first, request_id = await cancel_after_the_first_piece(gw, **request, stream_options={"include_usage": True})
    if gw.fake is not None:
        await asyncio.wait_for(gw.fake.disconnected.wait(), 10)  # the cancel reached the provider
        assert first == "Hello"  # the fakes' first piece; the next one was still HOLD seconds away
    row = await gw.table.record(request_id)

    # The provider reported nothing before the cut: the gateway's estimate, marked so. The prompt as estimated from
    # the request, the completion from the text relayed (about four characters a token, rounded up).
    relayed = row["completion_tokens"]
    if gw.fake is not None:
        assert relayed == math.ceil(len(first) / 4) == 2  # exactly "Hello" was relayed
    else:  # the model may have produced a few more tokens than the client read before it left
        assert relayed >= max(1, math.ceil(len(first) / 4))
    assert_record(
        row,
        gw,
        Usage(prompt_estimate(messages), relayed),
        caller_request_id=request_id,
        stream=True,
        status="cancelled",
        estimated=True,
    )
    assert row["prompt_tokens"] > 0
    assert caller_ids(await gw.stop()) == [request_id]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_cancelled_stream_of_a_budgeted_key_is_metered_at_the_same_estimate(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate of an uncounted prompt does not depend on the key: a budgeted key's cancelled stream is metered
    (and charged) at prompt_estimate, as an unbudgeted key's is, not at the reservation's upper bound."""
    budgeted = KeySpec(name="budgeted", budget=Budget(10_000_000, "total"))  # $10: far more than this request
    async with metered_gateway("openai", database_url, tmp_path, monkeypatch, key=budgeted) as gw:
        assert gw.fake is not None
        gw.report(NEVER_SENT)
        gw.fake.chunk_delay = HOLD
        first, request_id = await cancel_after_the_first_piece(gw, **REQUEST)
        await asyncio.wait_for(gw.fake.disconnected.wait(), 10)
        row = await gw.table.record(request_id)
        assert first == "Hello"
        assert_record(
            row,
            gw,
            Usage(prompt_estimate(MESSAGES), 2),
            caller_request_id=request_id,
            stream=True,
            status="cancelled",
            estimated=True,
        )


async def test_a_grpc_caller_is_metered_like_an_http_caller_and_one_without_a_key_is_not(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with metered_gateway("openai", database_url, tmp_path, monkeypatch) as gw:
        assert gw.fake is not None
        expected = gw.report(PLAIN)
        _, http_id = await gw.chat(**REQUEST)
        sse, http_stream_id = await gw.chat(**REQUEST, stream=True)
        assert content_of([chunk async for chunk in sse]) == "Hello, world!"
        params = pb.CompletionParams(
            model=gw.model,
            messages=[pb.Message(role=pb.Role.ROLE_USER, content=MESSAGES[0]["content"])],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        unary_id, stream_id = f"grpc-{uuid.uuid4().hex}", f"grpc-{uuid.uuid4().hex}"
        async with core_channel(gw.target, key=gw.key) as channel:
            stub = svc_grpc.CompletionServiceStub(channel)
            whole = await stub.CreateCompletion(
                svc.CreateCompletionRequest(params=params), metadata=(("x-request-id", unary_id),), timeout=30
            )
            call = stub.StreamCompletion(
                svc.StreamCompletionRequest(params=params), metadata=(("x-request-id", stream_id),), timeout=30
            )
            events = [event async for event in call]
        assert whole.usage == pb.Usage(prompt_tokens=31, completion_tokens=9, total_tokens=40, cached_tokens=5,
                                       reasoning_tokens=2)  # fmt: skip
        assert events[-1].HasField("finish") and not events[-1].finish.HasField("usage")  # include_usage unset
        served = len(gw.fake.requests)

        refused_ids = []
        wrong_key = "mm-aaaaaaaaaaaa-" + "x" * 43  # well-formed, in no store
        for channel in (grpc.aio.insecure_channel(gw.target), core_channel(gw.target, key=wrong_key)):
            async with channel:
                stub = svc_grpc.CompletionServiceStub(channel)
                for rpc in ("unary", "stream"):
                    refused_ids.append(f"refused-{uuid.uuid4().hex}")
                    metadata = (("x-request-id", refused_ids[-1]),)
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        if rpc == "unary":
                            await stub.CreateCompletion(
                                svc.CreateCompletionRequest(params=params), metadata=metadata, timeout=30
                            )
                        else:
                            async for _ in stub.StreamCompletion(
                                svc.StreamCompletionRequest(params=params), metadata=metadata, timeout=30
                            ):
                                pass
                    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
        assert len(gw.fake.requests) == served, "a caller without a valid key never reaches the provider"

        rows = await gw.stop()
        assert caller_ids(rows) == sorted([http_id, http_stream_id, unary_id, stream_id])
        assert not set(refused_ids) & set(caller_ids(rows))
        found = by_caller(rows)
        http, unary, http_stream, stream = (found[i] for i in (http_id, unary_id, http_stream_id, stream_id))
        assert_record(unary, gw, expected, caller_request_id=unary_id, stream=False)
        assert_record(stream, gw, expected, caller_request_id=stream_id, stream=True)
        for grpc_row, http_row in ((unary, http), (stream, http_stream)):
            assert {k: v for k, v in grpc_row.items() if k not in PER_REQUEST} == {
                k: v for k, v in http_row.items() if k not in PER_REQUEST
            }


async def test_anthropic_messages_are_metered_like_chat_completions(gw: Gateway) -> None:
    """/v1/messages, whole and streamed: one record each, with the provider's usage, neither marked cancelled, and
    what the Anthropic client was shown agrees with it."""
    expected = gw.report(PLAIN) if gw.fake is not None else None
    root = str(gw.client.base_url).rstrip("/").removesuffix("/v1")
    request: dict[str, Any] = {"model": gw.model, "max_tokens": MAX_TOKENS, "messages": MESSAGES,
                               "extra_body": {"temperature": 0}}  # fmt: skip
    shown: dict[str, tuple[bool, Any]] = {}
    async with anthropic.AsyncAnthropic(base_url=root, api_key=gw.key, max_retries=0) as client:
        for stream in (False, True):
            request_id = f"metering-{uuid.uuid4().hex}"
            headers = {"X-Request-Id": request_id}
            if stream:
                async with client.messages.stream(**request, extra_headers=headers) as events:
                    message = await events.get_final_message()
            else:
                message = await client.messages.create(**request, extra_headers=headers)
            shown[request_id] = (stream, message.usage)

    rows = by_caller(await gw.stop())
    assert sorted(rows) == sorted(shown)
    for request_id, (stream, usage) in shown.items():
        row = rows[request_id]
        cached = usage.cache_read_input_tokens or 0
        seen = Usage(usage.input_tokens + cached, usage.output_tokens, cached, row["reasoning_tokens"])
        assert usage_of(row) == seen  # Anthropic's input_tokens excludes the cache reads
        assert_record(row, gw, expected or seen, caller_request_id=request_id, stream=stream)
