"""A client that leaves mid-stream (or mid-request) stops the work it asked for, all the way down to the model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEY, running_bridge_app, running_core, write_catalog
from tests.fakes.openai_upstream import serve_openai_upstream

MODEL = "smollm2-135m"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Greedy SmolLM2 answers this with digits until max_tokens: 1000 tokens take well over 10 s on one thread.
ENDLESS = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
    "temperature": 0,
    "max_tokens": 1000,
}
QUICK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
# The model runs one generation at a time: a request queued behind an abandoned 1000-token generation that kept
# running would wait > 10 s. Stopped generation lets it through at once; this bound is generous on purpose.
QUEUED_BOUND_SECONDS = 4.0


async def test_stream_disconnect_stops_the_generation(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, headers=AUTH, timeout=30) as client:
        async with client.stream("POST", "/chat/completions", json={**ENDLESS, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            seen = 0
            async for line in lines:
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        # The `async with` closed the connection after three chunks.
        started = time.monotonic()
        quick = await client.post("/chat/completions", json=QUICK)
        waited = time.monotonic() - started
    assert quick.status_code == 200, quick.text
    assert waited < QUEUED_BOUND_SECONDS, f"the abandoned generation kept the model busy for {waited:.1f}s"


async def test_non_streaming_disconnect_stops_the_generation(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, headers=AUTH, timeout=30) as client:
        abandoned = asyncio.create_task(client.post("/chat/completions", json=ENDLESS))
        await asyncio.sleep(1.0)  # the generation is under way
        abandoned.cancel()  # closes the connection, as a client that gives up would
        await asyncio.gather(abandoned, return_exceptions=True)
        started = time.monotonic()
        quick = await client.post("/chat/completions", json=QUICK)
        waited = time.monotonic() - started
    assert quick.status_code == 200, quick.text
    assert waited < QUEUED_BOUND_SECONDS, f"the abandoned generation kept the model busy for {waited:.1f}s"


async def test_a_stream_abandoned_before_its_first_token_is_noticed_at_once(tmp_path: Path) -> None:
    """The bridge waits for the core's first event before it answers (so a failure to start is a real status); a
    client that leaves in that wait used to keep its upstream call and slot until the first event or the deadline
    (6 s here). Now the call is cancelled, all the way to the upstream, as soon as the client is gone."""
    async with serve_openai_upstream(hang=True) as upstream:
        entry = {"name": "slow", "provider": "openai", "model": "fake-model",
                 "options": {"base_url": upstream.url, "timeout_seconds": 30}}  # fmt: skip
        async with (
            running_core(write_catalog(tmp_path, [entry])) as core,
            running_bridge_app(f"127.0.0.1:{core.port}", request_timeout_seconds=6.0) as (base_url, app),
        ):
            async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client:
                body = {"model": "slow", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
                abandoned = asyncio.create_task(client.post("/chat/completions", json=body))
                await asyncio.sleep(0.5)  # the core has called the upstream, which sends no event
                assert app.gateway.active == 1  # type: ignore[attr-defined]
                abandoned.cancel()  # closes the connection before the first token
                await asyncio.gather(abandoned, return_exceptions=True)
                left = time.monotonic()
                async with asyncio.timeout(2.0):
                    await upstream.disconnected.wait()  # the cancel reached the upstream call
                noticed = time.monotonic() - left
                assert app.gateway.active == 0  # type: ignore[attr-defined]
    assert noticed < 1.0, f"the abandoned stream held its upstream call for {noticed:.1f}s"
