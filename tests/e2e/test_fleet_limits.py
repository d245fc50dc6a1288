"""Rate limits that hold across a fleet: three bridge + core replicas sharing one real redis-server (and one key
store), many concurrent clients, counted at the fake upstream; and a killed Redis in each fail mode.

Each replica is a real core (its own limiter client) and a real bridge; clients spread their requests over the three
bridges, as a load balancer would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from services.policy.limits import window_of
from tests.conftest import running_bridge, running_core, write_catalog
from tests.e2e.test_rate_limits import key_with_limits
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.redis_server import RedisServer

MODEL = "remote"
HI = [{"role": "user", "content": "Hello?"}]


@dataclass
class Fleet:
    bridges: list[str]  # each replica's OpenAI base URL
    upstream: OpenAIUpstream
    database_url: str

    async def key(self, **limits: int) -> str:
        return await key_with_limits(self.database_url, **limits)


@asynccontextmanager
async def fleet(tmp_path: Path, redis_url: str, replicas: int = 3, **core: Any) -> AsyncIterator[Fleet]:
    database_url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(serve_openai_upstream())
        entry = {"name": MODEL, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
        catalog = write_catalog(tmp_path, [entry])
        bridges = []
        for _ in range(replicas):
            replica = await stack.enter_async_context(
                running_core(catalog, database_url=database_url, api_keys=(), limits_redis_url=redis_url, **core)
            )
            bridges.append(await stack.enter_async_context(running_bridge(f"127.0.0.1:{replica.port}")))
        yield Fleet(bridges, upstream, database_url)


async def post(base_url: str, key: str, **fields: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        body = {"model": MODEL, "messages": HI, "max_tokens": 5, **fields}
        return await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


async def wait_for_a_fresh_window(margin: float = 8.0) -> None:
    """Sleep past the minute's end if fewer than `margin` seconds are left of it: the burst below fits one window."""
    left = window_of(time.time())[1]
    if left < margin:
        await asyncio.sleep(left + 0.2)


async def test_three_replicas_admit_exactly_the_limit_per_minute(tmp_path: Path, redis_server: RedisServer) -> None:
    async with fleet(tmp_path, redis_server.url, limits_timeout_seconds=2.0) as gw:  # no fail-open on a slow CI
        key = await gw.key(rpm=20)
        await wait_for_a_fresh_window()
        window = window_of(time.time())[0]
        answers = await asyncio.gather(
            *(post(gw.bridges[n % 3], key, stream=bool(n % 2)) for n in range(90))  # 90 clients at once
        )
        assert window_of(time.time())[0] == window
        served = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code == 429]
        assert len(served) == 20 and len(refused) == 70, sorted({a.status_code for a in answers})
        assert len(gw.upstream.requests) == 20  # counted where it costs: the upstream served exactly the limit
        # Each admitted request saw a distinct count: the remaining values are 19 down to 0, each once.
        assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in served) == list(range(20))
        for answer in refused:
            assert answer.json()["error"]["code"] == "rate_limit_exceeded"
            assert answer.headers["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(answer.headers["retry-after"]) <= 60


async def test_a_429_s_retry_after_is_honoured_by_the_sdk_across_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """max_concurrent=1 across the fleet: a stream on replica 1 makes replica 2 answer 429 (retry-after 1 s); the
    OpenAI SDK waits it out, retries, and is served once the stream is done."""
    async with fleet(tmp_path, redis_server.url, limits_timeout_seconds=2.0) as gw:
        key = await gw.key(max_concurrent=1)
        gw.upstream.chunk_delay = 0.15
        first = asyncio.create_task(post(gw.bridges[0], key, stream=True))
        await asyncio.sleep(0.2)
        assert (await post(gw.bridges[1], key)).status_code == 429
        async with openai.AsyncOpenAI(base_url=gw.bridges[1], api_key=key, max_retries=2) as sdk:
            asked = time.monotonic()
            answer = await sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert time.monotonic() - asked >= 0.9
        assert (await first).status_code == 200 and answer.choices[0].message.content == "Hello, world!"
        assert len(gw.upstream.requests) == 2


async def test_a_killed_redis_fails_open_within_the_timeout_and_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with fleet(tmp_path, redis_server.url, replicas=1, limits_timeout_seconds=1.0) as gw:
        key = await gw.key(rpm=1000)
        assert "x-ratelimit-remaining-requests" in (await post(gw.bridges[0], key)).headers
        redis_server.stop()
        started = time.monotonic()
        served = await post(gw.bridges[0], key)
        assert served.status_code == 200 and "x-ratelimit-remaining-requests" not in served.headers  # uncounted
        assert time.monotonic() - started < 2.5  # the 1 s timeout, and the call around it
        redis_server.start()
        counted = await post(gw.bridges[0], key)
        assert counted.status_code == 200 and "x-ratelimit-remaining-requests" in counted.headers


async def test_a_killed_redis_fails_closed_when_configured(tmp_path: Path, redis_server: RedisServer) -> None:
    async with fleet(tmp_path, redis_server.url, replicas=1, limits_fail_closed=True, limits_timeout_seconds=1.0) as gw:
        key = await gw.key(rpm=1000)
        redis_server.stop()
        started = time.monotonic()
        refused = await post(gw.bridges[0], key)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "policy_unavailable"
        assert refused.headers["retry-after"] == "1" and time.monotonic() - started < 2.5
        assert len(gw.upstream.requests) == 0
        redis_server.start()
        assert (await post(gw.bridges[0], key)).status_code == 200
