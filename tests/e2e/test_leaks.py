"""After thousands of healthy and faulty requests mixed, nothing leaks: tasks, descriptors and memory come back."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, running_gateway, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

ROUNDS = 1500  # bounded in count; the whole test takes ~20 s here
CONCURRENCY = 16


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, OpenAIUpstream]]:
    async with AsyncExitStack() as stack:
        made = {name: await stack.enter_async_context(serve_openai_upstream()) for name in
                ("healthy", "failing", "broken", "slow")}  # fmt: skip
        made["failing"].error_status = 503
        made["broken"].stream_error_after = 1
        made["slow"].chunks, made["slow"].chunk_delay = ["x "] * 50, 0.01
        yield made


async def one(http: httpx.AsyncClient, rng: random.Random) -> int:
    kind = rng.choice(["plain", "stream", "failing", "broken", "disconnect", "bad"])
    messages = [{"role": "user", "content": "hi"}]
    if kind == "bad":
        return (await http.post("/chat/completions", json={"model": "healthy", "messages": []})).status_code
    model = {"plain": "healthy", "stream": "healthy", "failing": "failing", "broken": "broken"}.get(kind, "slow")
    body = {"model": model, "messages": messages, "stream": kind != "plain"}
    if kind != "disconnect":
        return (await http.post("/chat/completions", json=body)).status_code
    async with http.stream("POST", "/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        await anext(lines)
        await lines.aclose()
    return 499  # we left mid-stream


async def test_no_task_descriptor_or_memory_leak(tmp_path: Path, fakes: dict[str, OpenAIUpstream]) -> None:
    entries = [
        {"name": name, "provider": "openai", "model": "m", "options": {"base_url": fake.url}}
        for name, fake in fakes.items()
    ]
    rng = random.Random(7)
    async with running_gateway(write_catalog(tmp_path, entries)) as base_url:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10, limits=limits
        ) as http:

            async def run(count: int) -> list[int]:
                semaphore = asyncio.Semaphore(CONCURRENCY)

                async def bounded() -> int:
                    async with semaphore:
                        return await one(http, rng)

                return await asyncio.gather(*(bounded() for _ in range(count)))

            await run(300)  # warm every pool, cache and lazily built object first
            await asyncio.sleep(0.5)
            tasks, fds, rss = len(asyncio.all_tasks()), open_descriptors(), rss_kib()
            statuses = await asyncio.wait_for(run(ROUNDS), timeout=120)
            await asyncio.sleep(1.0)  # let closed streams finish their cleanup
            tasks_after, fds_after, rss_after = len(asyncio.all_tasks()), open_descriptors(), rss_kib()
            if fds_after > fds + 8:
                # The upstream pools keep up to CONCURRENCY idle connections each (two descriptors apiece, both ends
                # being in this process), and the warm-up may not have reached a pool's peak: a leak grows with the
                # requests, a pool filling up to its peak does not. So the same load again must add nothing more.
                fds = fds_after
                statuses += await asyncio.wait_for(run(ROUNDS), timeout=120)
                await asyncio.sleep(1.0)
                fds_after = open_descriptors()
    assert set(statuses) <= {200, 400, 499, 503}, set(statuses)
    assert {200, 400, 499, 503} <= set(statuses), "every kind of request ran"
    assert tasks_after <= tasks + 2, f"asyncio tasks {tasks} -> {tasks_after}"
    assert fds_after <= fds + 8, f"open descriptors {fds} -> {fds_after}"
    assert rss_after - rss < 24 * 1024, f"RSS grew by {(rss_after - rss) / 1024:.1f} MiB over {ROUNDS} requests"
