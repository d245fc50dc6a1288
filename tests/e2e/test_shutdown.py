"""Graceful shutdown: on SIGTERM a process stops taking work, lets the stream in flight finish, and exits."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from services.policy import open_store
from services.policy.keys import KeySpec
from tests.conftest import API_KEY, running_bridge, running_core, write_catalog
from tests.fakes.openai_upstream import DEFAULT_USAGE, OpenAIUpstream, serve_openai_upstream
from tests.processes import free_port, process

MODEL = "remote-chat"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def slow_upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        fake.chunks = [f"part{i} " for i in range(15)]
        fake.chunk_delay = 0.1  # a stream of about 1.5 s
        yield fake


async def read_stream_then_terminate(
    base_url: str, child: asyncio.subprocess.Process, key: str = API_KEY
) -> tuple[list[str], int]:
    """Open a stream, SIGTERM `child` after its first chunk, read the stream to its end; also try a new request."""
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=15) as http:
        async with http.stream("POST", "/chat/completions", json=BODY) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            events = [await anext(lines)]
            child.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            try:
                refused = (await http.post("/chat/completions", json=BODY)).status_code
            except httpx.HTTPError:
                refused = 0  # the bridge's listening socket is already closed: also a refusal
            events += [line async for line in lines]
    return [e for e in events if e.startswith("data: ")], refused


def assert_complete(events: list[str]) -> None:
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert not any("error" in c for c in chunks), "the stream in flight was not cut"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    assert text == "".join(f"part{i} " for i in range(15))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_core_drains_its_streams_on_sigterm(tmp_path: Path, slow_upstream: OpenAIUpstream) -> None:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": slow_upstream.url}}
    port, metrics = free_port(), free_port()
    env = {"MODELMAX_CATALOG": write_catalog(tmp_path, [entry]), "MODELMAX_CORE_PORT": str(port),
           "MODELMAX_API_KEY": API_KEY,
           "MODELMAX_CORE_METRICS_PORT": str(metrics), "MODELMAX_CORE_SHUTDOWN_GRACE_SECONDS": "10"}  # fmt: skip
    async with process("services", env, f"http://127.0.0.1:{metrics}/metrics") as core:
        async with running_bridge(f"127.0.0.1:{port}") as base_url:
            started = time.monotonic()
            events, refused = await read_stream_then_terminate(base_url, core)
            code = await asyncio.wait_for(core.wait(), timeout=10)
    assert_complete(events)
    assert refused == 503, "a draining core takes no new work"
    assert code == 0 and time.monotonic() - started < 10, "it exits once its streams are done, within the grace"


async def test_bridge_drains_its_streams_on_sigterm(tmp_path: Path, slow_upstream: OpenAIUpstream) -> None:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": slow_upstream.url}}
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        port = free_port()
        env = {"MODELMAX_CORE_TARGET": f"127.0.0.1:{core.port}",
               "MODELMAX_BRIDGE_PORT": str(port), "MODELMAX_BRIDGE_METRICS_PORT": "off",
               "MODELMAX_BRIDGE_SHUTDOWN_GRACE_SECONDS": "10"}  # fmt: skip
        async with process("bridge", env, f"http://127.0.0.1:{port}/healthz") as bridge:
            events, refused = await read_stream_then_terminate(f"http://127.0.0.1:{port}/v1", bridge)
            code = await asyncio.wait_for(bridge.wait(), timeout=10)
    assert_complete(events)
    assert refused in (0, 503), "a draining bridge takes no new work"
    # uvicorn re-raises the signal once its graceful shutdown is done, so a process manager sees it.
    assert code in (0, -signal.SIGTERM)


async def test_streams_past_the_grace_period_end_with_an_error_event(
    tmp_path: Path, slow_upstream: OpenAIUpstream
) -> None:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": slow_upstream.url}}
    port, metrics = free_port(), free_port()
    env = {"MODELMAX_CATALOG": write_catalog(tmp_path, [entry]), "MODELMAX_CORE_PORT": str(port),
           "MODELMAX_API_KEY": API_KEY,
           "MODELMAX_CORE_METRICS_PORT": str(metrics), "MODELMAX_CORE_SHUTDOWN_GRACE_SECONDS": "0.3"}  # fmt: skip
    async with process("services", env, f"http://127.0.0.1:{metrics}/metrics") as core:
        async with running_bridge(f"127.0.0.1:{port}") as base_url:
            events, _ = await read_stream_then_terminate(base_url, core)
            code = await asyncio.wait_for(core.wait(), timeout=10)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "core_unavailable" and error["type"] == "api_error"
    assert not any('"finish_reason":"stop"' in e for e in events), "a cut stream never claims to have finished"
    assert code == 0


async def test_the_core_writes_every_usage_record_before_it_exits_on_sigterm(tmp_path: Path) -> None:
    """Records still in the writer's buffer (it writes every 0.5 s) are written by the drain: none is lost."""
    async with serve_openai_upstream() as upstream:
        entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": upstream.url}}
        port, metrics = free_port(), free_port()
        database = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
        store = await open_store(database)
        try:
            record, key = await store.create_key(KeySpec("metered"))
        finally:
            await store.close()
        env = {"MODELMAX_CATALOG": write_catalog(tmp_path, [entry]), "MODELMAX_CORE_PORT": str(port),
               "MODELMAX_DATABASE_URL": database, "MODELMAX_CORE_METRICS_PORT": str(metrics)}  # fmt: skip
        async with process("services", env, f"http://127.0.0.1:{metrics}/metrics") as core:
            async with (
                running_bridge(f"127.0.0.1:{port}") as base_url,
                httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=15) as http,
            ):
                replies = [await http.post("/chat/completions", json={**BODY, "stream": False}) for _ in range(20)]
                assert [reply.status_code for reply in replies] == [200] * 20
                core.send_signal(signal.SIGTERM)  # at once: the last records are still in the buffer
                assert await asyncio.wait_for(core.wait(), timeout=15) == 0
    store = await open_store(database)
    try:
        [row] = await store.usage_report(datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC), "key")
    finally:
        await store.close()
    assert (row.group, row.requests) == (record.id, 20)
    assert row.prompt_tokens == 20 * DEFAULT_USAGE["prompt_tokens"]
