"""A client that leaves mid-stream (or mid-request) stops the work it asked for, all the way down to the model."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import API_KEY

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
