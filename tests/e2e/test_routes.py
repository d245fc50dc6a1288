"""Routes under faults: retries, fallbacks, Retry-After, cooldowns and weights, counted at two fake upstreams."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

MODEL = "routed"
MESSAGES = [{"role": "user", "content": "hi"}]
FAST_RETRY = {"attempts": 2, "initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.02, "budget_seconds": 5}
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[OpenAIUpstream, OpenAIUpstream]]:
    async with serve_openai_upstream() as a, serve_openai_upstream() as b:
        a.chunks, b.chunks = ["from ", "a"], ["from ", "b"]
        yield a, b


def route(
    a: OpenAIUpstream, b: OpenAIUpstream, *, weights: tuple[float, float] | None = None, **policies: Any
) -> dict[str, Any]:
    deployments = [
        {"provider": "openai", "model": name, "options": {"base_url": fake.url}} for name, fake in (("a", a), ("b", b))
    ]
    if weights is not None:
        for deployment, weight in zip(deployments, weights, strict=True):
            deployment["weight"] = weight
    return {"name": MODEL, "deployments": deployments, **policies}


async def gateway(start: Start, tmp_path: Path, entry: dict[str, Any]) -> httpx.AsyncClient:
    base_url = await start(write_catalog(tmp_path, [entry]))
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=20)


def streamed_text(reply: httpx.Response) -> str:
    chunks = [json.loads(e.removeprefix("data: ")) for e in reply.text.split("\n\n") if e.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


async def ask(http: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    return await http.post("/chat/completions", json={"model": MODEL, "messages": MESSAGES, **fields})


async def test_retry_then_fallback_on_unavailable(gateway_for: Start, tmp_path: Path, upstreams: Any) -> None:
    a, b = upstreams
    a.error_status = 503
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=FAST_RETRY)) as http:
        reply = await ask(http)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "from b"
    assert (len(a.requests), len(b.requests)) == (2, 1), "two tries of a, then b"
    assert reply.headers["x-modelmax-deployment"] == "1:openai:b"
    assert reply.headers["x-modelmax-attempts"] == "3"


async def test_a_retry_that_succeeds_stays_on_the_deployment(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    a.error_status, a.error_times, a.retry_after = 429, 1, "0"
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=FAST_RETRY)) as http:
        reply = await ask(http, stream=True)
    assert reply.status_code == 200 and streamed_text(reply) == "from a"
    assert (len(a.requests), len(b.requests)) == (2, 0)
    assert reply.headers["x-modelmax-deployment"] == "0:openai:a"
    assert reply.headers["x-modelmax-attempts"] == "2"


async def test_a_bad_request_returns_at_once(gateway_for: Start, tmp_path: Path, upstreams: Any) -> None:
    a, b = upstreams
    a.error_status = 400
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=FAST_RETRY)) as http:
        reply = await ask(http)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert (len(a.requests), len(b.requests)) == (1, 0), "a 400 is the request's fault: no retry, no fallback"


async def test_retry_after_beyond_the_budget_falls_back_at_once(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    a.error_status, a.retry_after = 429, "30"
    retry = {**FAST_RETRY, "budget_seconds": 2}
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=retry)) as http:
        started = time.monotonic()
        reply = await ask(http)
        elapsed = time.monotonic() - started
    assert reply.status_code == 200 and reply.headers["x-modelmax-deployment"] == "1:openai:b"
    assert len(a.requests) == 1 and elapsed < 1.5, "a 30 s Retry-After is not waited out within a 2 s budget"


async def test_the_last_failure_reaches_the_client_with_its_retry_after(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    a.error_status = b.error_status = 429
    a.retry_after = b.retry_after = "7"
    retry = {**FAST_RETRY, "attempts": 1}
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=retry)) as http:
        async with openai.AsyncOpenAI(base_url=str(http.base_url), api_key=API_KEY, max_retries=0) as sdk:
            with pytest.raises(openai.RateLimitError) as raised:
                await sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.response.headers["retry-after"] == "7"
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_a_failing_deployment_cools_down_and_is_skipped(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    a.error_status = 503
    entry = route(a, b, retry={**FAST_RETRY, "attempts": 1}, cooldown={"failures": 2, "seconds": 60})
    async with await gateway(gateway_for, tmp_path, entry) as http:
        replies = [await ask(http) for _ in range(4)]
    assert all(r.status_code == 200 for r in replies)
    assert len(a.requests) == 2, "after two failures in a row, a is skipped for the cooldown"
    assert [r.headers["x-modelmax-attempts"] for r in replies] == ["2", "2", "1", "1"]


async def test_when_every_deployment_cools_down_requests_fail_fast_with_retry_after(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    a.error_status = b.error_status = 503
    entry = route(a, b, retry={**FAST_RETRY, "attempts": 1}, cooldown={"failures": 1, "seconds": 60})
    async with await gateway(gateway_for, tmp_path, entry) as http:
        first = await ask(http)
        second = await ask(http)
    assert first.status_code == second.status_code == 503
    assert (len(a.requests), len(b.requests)) == (1, 1), "the second request reached no upstream"
    assert 55 <= int(second.headers["retry-after"]) <= 60


async def test_no_retry_after_the_first_content(gateway_for: Start, tmp_path: Path, upstreams: Any) -> None:
    a, b = upstreams
    a.stream_error_after = 1
    async with await gateway(gateway_for, tmp_path, route(a, b, retry=FAST_RETRY)) as http:
        reply = await ask(http, stream=True)
    events = [e for e in reply.text.split("\n\n") if e]
    assert reply.status_code == 200 and events[-1] == "data: [DONE]" and '"error"' in events[-2]
    assert (len(a.requests), len(b.requests)) == (1, 0), "a stream is never spliced from two upstreams"
    assert '"finish_reason":"stop"' not in reply.text


async def test_weights_spread_requests_and_weight_zero_is_only_a_fallback(
    gateway_for: Start, tmp_path: Path, upstreams: Any
) -> None:
    a, b = upstreams
    async with await gateway(gateway_for, tmp_path, route(a, b, weights=(1, 0))) as http:
        for _ in range(10):
            assert (await ask(http)).status_code == 200
    assert (len(a.requests), len(b.requests)) == (10, 0)


async def test_equal_weights_use_both(gateway_for: Start, tmp_path: Path, upstreams: Any) -> None:
    a, b = upstreams
    async with await gateway(gateway_for, tmp_path, route(a, b, weights=(1, 1))) as http:
        for _ in range(30):
            assert (await ask(http)).status_code == 200
    # Each side gets at least 3 of 30 unless a 1-in-a-million draw happens.
    assert len(a.requests) >= 3 and len(b.requests) >= 3 and len(a.requests) + len(b.requests) == 30
