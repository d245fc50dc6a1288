"""A key's rate limits (requests and tokens per minute, requests in flight), enforced by the core for every caller,
with OpenAI's x-ratelimit-* headers on every response (streams included, before the first byte) and a 429
`rate_limit_exceeded` with retry-after(-ms) past a limit; gRPC callers get RESOURCE_EXHAUSTED and the delay.

One replica, the in-process limiter (services/policy/limits.py), a real SQLite key store, the real bridge and core
in front of the fake OpenAI upstream, which counts what it served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.policy import open_store
from services.policy.keys import KeySpec
from services.policy.limits import window_of
from tests.conftest import running_bridge, running_core, write_catalog
from tests.fakes.openai_upstream import DEFAULT_USAGE, OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

MODEL = "remote"
HI = [{"role": "user", "content": "Hello?"}]
USED = DEFAULT_USAGE["prompt_tokens"] + DEFAULT_USAGE["completion_tokens"]  # what the fake reports per request


@dataclass
class Gateway:
    base_url: str
    core_port: int
    upstream: OpenAIUpstream
    database_url: str

    async def key(self, **limits: int) -> str:
        return await key_with_limits(self.database_url, **limits)


async def key_with_limits(database_url: str, **limits: int) -> str:
    """A new inference key with these limits (rpm, tpm, max_concurrent) in the store at `database_url`."""
    store = await open_store(database_url)
    try:
        _, secret = await store.create_key(KeySpec(name="limited", **limits))  # type: ignore[arg-type]
    finally:
        await store.close()
    return secret


@asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    database_url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    async with serve_openai_upstream() as upstream:
        entry = {"name": MODEL, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
        async with (
            running_core(write_catalog(tmp_path, [entry]), database_url=database_url, api_keys=()) as core,
            running_bridge(f"127.0.0.1:{core.port}") as base_url,
        ):
            yield Gateway(base_url, core.port, upstream, database_url)


def same_window(started: float) -> bool:
    """Whether the clock is still in the limiter's window of `started` (a test straddling a minute retries)."""
    return window_of(time.time())[0] == window_of(started)[0]


async def post(http: httpx.AsyncClient, key: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": HI, "max_tokens": 5, **fields}
    return await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


async def test_requests_per_minute_exactly_then_429_with_headers(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        for _ in range(2):  # a second go if the first straddled a minute boundary
            key = await gw.key(rpm=3)
            started = time.time()
            answers = [await post(http, key), await post(http, key, stream=True), await post(http, key)]
            refused = await post(http, key)
            if same_window(started):
                break
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0"]
        for answer in answers:
            assert answer.headers["x-ratelimit-limit-requests"] == "3"
            assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
            assert "x-ratelimit-limit-tokens" not in answer.headers  # the key has no token limit
        assert answers[1].headers["content-type"].startswith("text/event-stream")  # headers before the stream
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
        assert len(gw.upstream.requests) == 3 * (1 + (not same_window(started)))  # the refused one never went on


async def test_tokens_per_minute_reserve_the_estimate_then_count_what_was_used(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        for _ in range(2):
            key = await gw.key(tpm=1000)
            started = time.time()
            first = await post(http, key, max_tokens=100)
            await asyncio.sleep(0.1)  # its settlement (off the request path) is in
            second = await post(http, key, max_tokens=100)
            if same_window(started):
                break
        reserved = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert 100 < reserved < 200  # the prompt's estimate and max_tokens, before the call
        # The second sees the first settled to what the upstream reported, plus its own reservation.
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - USED - reserved
        too_big = await post(http, key, max_tokens=5000)
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens", too_big.text


async def test_requests_in_flight_and_the_sdk_honours_retry_after(tmp_path: Path) -> None:
    """max_concurrent=1: a second request while one streams is a 429 with a 1 s retry-after; the OpenAI SDK waits
    it out and its retry is served once the first request is done."""
    async with gateway(tmp_path) as gw, httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
        key = await gw.key(max_concurrent=1)
        gw.upstream.chunk_delay = 0.15  # about 0.6 s per request
        first = asyncio.create_task(post(http, key, stream=True))
        await asyncio.sleep(0.2)
        refused = await post(http, key)
        assert refused.status_code == 429 and refused.headers["retry-after-ms"] == "1000", refused.text
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=2) as sdk:
            asked = time.monotonic()
            answer = await sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)  # type: ignore[arg-type]
            waited = time.monotonic() - asked
        assert (await first).status_code == 200
        assert answer.choices[0].message.content == "Hello, world!"
        assert waited >= 0.9  # it waited as told, then was served
        assert len(gw.upstream.requests) == 2


async def test_a_grpc_caller_gets_resource_exhausted_with_the_delay(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        params = pb.CompletionParams(model=MODEL, messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
        for _ in range(2):  # a second go if the first straddled a minute boundary
            key = await gw.key(rpm=2)
            started = time.time()
            async with core_channel(f"127.0.0.1:{gw.core_port}", key=key) as channel:
                stub = svc_grpc.CompletionServiceStub(channel)
                served = stub.CreateCompletion(svc.CreateCompletionRequest(params=params))
                await served
                whole = (dict(await served.initial_metadata()), dict(await served.trailing_metadata()))
                streamed = stub.StreamCompletion(svc.StreamCompletionRequest(params=params))
                stream_initial = dict(await streamed.initial_metadata())
                assert [event async for event in streamed]
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CreateCompletion(svc.CreateCompletionRequest(params=params))
            if same_window(started):
                break
        # a whole answer's values come with its trailers (no send of their own), a stream's before its first event
        assert whole[1]["x-ratelimit-remaining-requests"] == "1" and "x-ratelimit-limit-requests" not in whole[0]
        assert stream_initial["x-ratelimit-remaining-requests"] == "0"
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.reason == "ERROR_REASON_RATE_LIMITED" and 0 < float(info.metadata["retry_after"]) <= 60


async def test_the_anthropic_dialect_reports_the_same_limits_its_own_way(tmp_path: Path) -> None:
    """The same key limits on /v1/messages: anthropic-ratelimit-* headers (resets as RFC 3339 times), then a 429
    rate_limit_error with retry-after, which Anthropic's SDKs raise as RateLimitError."""
    async with gateway(tmp_path) as gw:
        root = gw.base_url.removesuffix("/v1")
        for _ in range(2):  # a second go if the first straddled a minute boundary
            key = await gw.key(rpm=2)
            started = time.time()
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
            body = {"model": MODEL, "max_tokens": 5, "messages": HI}
            async with httpx.AsyncClient(base_url=root, timeout=30) as http:
                answers = [await http.post("/v1/messages", json=body, headers=headers),
                           await http.post("/v1/messages", json={**body, "stream": True}, headers=headers)]  # fmt: skip
            async with anthropic.AsyncAnthropic(base_url=root, api_key=key, max_retries=0) as client:
                with pytest.raises(anthropic.RateLimitError) as refused:
                    await client.messages.create(model=MODEL, max_tokens=5, messages=HI)  # type: ignore[arg-type]
            if same_window(started):
                break
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["anthropic-ratelimit-requests-remaining"] for a in answers] == ["1", "0"]
    reset = datetime.strptime(answers[0].headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%S%z")
    assert 0 <= reset.timestamp() - started <= 61
    assert all(a.headers["anthropic-ratelimit-requests-limit"] == "2" for a in answers)
    error = refused.value
    assert error.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": error.body["error"]["message"]},
    }  # type: ignore[index]
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
