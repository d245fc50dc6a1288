"""Timeouts: a provider that never answers, a stream that overruns, and a caller's deadline reaching the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.catalog import parse_catalog
from tests.conftest import API_KEY, running_core, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

MODEL = "timed"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[OpenAIUpstream, OpenAIUpstream]]:
    async with serve_openai_upstream() as a, serve_openai_upstream() as b:
        yield a, b


def deployment(fake: OpenAIUpstream) -> dict[str, object]:
    return {"provider": "openai", "model": "m", "options": {"base_url": fake.url}}


async def test_a_provider_that_never_answers_times_out_and_falls_back(
    gateway_for: Start, tmp_path: Path, upstreams: tuple[OpenAIUpstream, OpenAIUpstream]
) -> None:
    a, b = upstreams
    a.hang = True
    entry = {"name": MODEL, "deployments": [deployment(a), deployment(b)], "timeouts": {"first_token_seconds": 0.3}}
    base_url = await gateway_for(write_catalog(tmp_path, [entry]))
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        started = time.monotonic()
        reply = await http.post("/chat/completions", json=BODY, timeout=10)
        elapsed = time.monotonic() - started
    assert reply.status_code == 200 and reply.headers["x-modelmax-deployment"] == "1:openai:m"
    assert 0.3 <= elapsed < 1.5
    await asyncio.wait_for(a.disconnected.wait(), timeout=2)  # the abandoned try was closed, not left open


async def test_a_stream_past_its_total_time_ends_with_a_timeout_event(
    gateway_for: Start, tmp_path: Path, upstreams: tuple[OpenAIUpstream, OpenAIUpstream]
) -> None:
    a, _ = upstreams
    a.chunks, a.chunk_delay = ["tick "] * 20, 0.1  # two seconds of stream
    entry = {"name": MODEL, **deployment(a), "timeouts": {"total_seconds": 0.6}}
    base_url = await gateway_for(write_catalog(tmp_path, [entry]))
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        reply = await http.post("/chat/completions", json={**BODY, "stream": True}, timeout=10)
    events = [e for e in reply.text.split("\n\n") if e]
    assert reply.status_code == 200 and events[-1] == "data: [DONE]"
    assert '"upstream_timeout"' in events[-2] and '"finish_reason":"stop"' not in reply.text
    await asyncio.wait_for(a.disconnected.wait(), timeout=2)


async def test_the_callers_grpc_deadline_closes_the_upstream_call(
    tmp_path: Path, upstreams: tuple[OpenAIUpstream, OpenAIUpstream]
) -> None:
    a, _ = upstreams
    a.hang = True
    entry = {"name": MODEL, **deployment(a)}  # no timeouts of its own: only the caller's deadline
    request = svc.CreateCompletionRequest(
        params=pb.CompletionParams(model=MODEL, messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
    )
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await svc_grpc.CompletionServiceStub(channel).CreateCompletion(request, timeout=0.5)
            left = time.monotonic()
            await asyncio.wait_for(a.disconnected.wait(), timeout=2)
            open_after_deadline = time.monotonic() - left
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert open_after_deadline < 0.5, f"the upstream call outlived the caller by {open_after_deadline:.3f}s"


def test_deployment_timeouts_override_the_entrys(tmp_path: Path) -> None:
    document = {"models": [{"name": MODEL, "timeouts": {"first_token_seconds": 5, "total_seconds": 60},
                            "deployments": [{"provider": "openai", "timeouts": {"first_token_seconds": 1}},
                                            {"provider": "openai"}]}]}  # fmt: skip
    (first, second) = parse_catalog(yaml.safe_load(yaml.safe_dump(document)), "c").entries[0].routes()
    assert (first.timeouts.first_token_seconds, first.timeouts.total_seconds) == (1, 60)
    assert (second.timeouts.first_token_seconds, second.timeouts.total_seconds) == (5, 60)
