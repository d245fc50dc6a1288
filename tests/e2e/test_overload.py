"""Overload: past its concurrency limit each process answers a fast 503 with Retry-After, and capacity comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, running_bridge, running_core, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

MODEL = "remote-chat"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def slow_upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        fake.chunks = ["slow "] * 10
        fake.chunk_delay = 0.1  # one second of stream
        yield fake


def catalog(tmp_path: Path, upstream: OpenAIUpstream) -> str:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": upstream.url}}
    return write_catalog(tmp_path, [entry])


async def hold_one_and_probe(base_url: str) -> tuple[httpx.Response, float, httpx.Response]:
    """While one stream is open, a second request is refused; once it is gone, a third is served."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=10) as http:
        async with http.stream("POST", "/chat/completions", json=BODY) as held:
            assert held.status_code == 200
            lines = held.aiter_lines()  # kept referenced: a collected iterator would close the held stream
            await anext(lines)
            started = time.monotonic()
            refused = await http.post("/chat/completions", json=BODY)
            waited = time.monotonic() - started
            await lines.aclose()
        # The held client left mid-stream: its slot must come back.
        for _ in range(50):
            served = await http.post("/chat/completions", json={**BODY, "stream": False})
            if served.status_code == 200:
                break
            await asyncio.sleep(0.05)
    return refused, waited, served


async def test_core_limit(tmp_path: Path, slow_upstream: OpenAIUpstream) -> None:
    async with running_core(catalog(tmp_path, slow_upstream), max_concurrent_requests=1) as core:
        async with running_bridge(f"127.0.0.1:{core.port}") as base_url:
            refused, waited, served = await hold_one_and_probe(base_url)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert waited < 0.5, "refused at once, not queued behind the open stream"
    assert served.status_code == 200


async def test_bridge_limit(tmp_path: Path, slow_upstream: OpenAIUpstream) -> None:
    async with running_core(catalog(tmp_path, slow_upstream)) as core:
        async with running_bridge(f"127.0.0.1:{core.port}", max_concurrent_requests=1) as base_url:
            refused, waited, served = await hold_one_and_probe(base_url)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert waited < 0.5
    assert served.status_code == 200
    assert len(slow_upstream.requests) == 2, "the refused request never reached the upstream"
