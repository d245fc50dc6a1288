"""Default retries: an entry written without a `retry:` section (the README's first example) rides out upstream
throttling and unavailability before the first byte with a few tries, while `retry: {attempts: 1}` still means none.
A real core over gRPC against the fake OpenAI-compatible upstream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from tests.conftest import running_core, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

CODES = {429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


def entry(upstream: OpenAIUpstream, name: str = "plain", **fields: Any) -> dict[str, Any]:
    """An entry as the README's first example writes one: no retry section unless `fields` adds one."""
    return {"name": name, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}, **fields}


def ask(model: str = "plain") -> svc.CreateCompletionRequest:
    messages = [pb.Message(role=pb.Role.ROLE_USER, content="hi")]
    return svc.CreateCompletionRequest(params=pb.CompletionParams(model=model, messages=messages))


@asynccontextmanager
async def core_stub(tmp_path: Path, *entries: dict[str, Any]) -> AsyncIterator[svc_grpc.CompletionServiceStub]:
    async with running_core(write_catalog(tmp_path, list(entries))) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            yield svc_grpc.CompletionServiceStub(channel)


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, None), (429, "0.3"), (503, None)], ids=["429", "429 Retry-After", "503"]
)
async def test_without_a_retry_section_one_failure_is_ridden_out(
    tmp_path: Path, upstream: OpenAIUpstream, status: int, retry_after: str | None
) -> None:
    upstream.error_status, upstream.error_times, upstream.retry_after = status, 1, retry_after
    async with core_stub(tmp_path, entry(upstream)) as stub:
        started = time.monotonic()
        reply = await stub.CreateCompletion(ask(), timeout=10)
        took = time.monotonic() - started
    assert reply.choices[0].content == "Hello, world!"
    assert (len(upstream.requests), reply.attempts) == (2, 2)
    if retry_after is not None:
        assert took >= 0.3  # the upstream's Retry-After was waited out, not the shorter backoff


@pytest.mark.parametrize("status", [429, 503])
async def test_attempts_1_still_means_no_retry(tmp_path: Path, upstream: OpenAIUpstream, status: int) -> None:
    """The same failure, once: the default entry serves after it, the `attempts: 1` entry returns it."""
    upstream.error_status, upstream.error_times = status, 1
    once = entry(upstream, "once", retry={"attempts": 1})
    async with core_stub(tmp_path, once, entry(upstream)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(ask("once"), timeout=10)
        assert raised.value.code() == CODES[status] and len(upstream.requests) == 1
        upstream.requests.clear()  # error_times counts requests seen: the next one fails once again
        reply = await stub.CreateCompletion(ask("plain"), timeout=10)
    assert reply.choices[0].content == "Hello, world!" and len(upstream.requests) == 2


@pytest.mark.parametrize("retry", [None, {"budget_seconds": 10}], ids=["no retry section", "no attempts"])
@pytest.mark.parametrize("status", [429, 503])
async def test_the_default_gives_up_after_three_tries(
    tmp_path: Path, upstream: OpenAIUpstream, status: int, retry: dict[str, Any] | None
) -> None:
    upstream.error_status = status  # every time
    fields = {} if retry is None else {"retry": retry}
    async with core_stub(tmp_path, entry(upstream, **fields)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(ask(), timeout=10)
    assert raised.value.code() == CODES[status]
    assert len(upstream.requests) == 3


async def test_the_default_retries_a_first_token_timeout(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    """An upstream that answers headers and then nothing, before the first byte of the completion."""
    upstream.hang = True
    async with core_stub(tmp_path, entry(upstream, timeouts={"first_token_seconds": 0.2})) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(ask(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(upstream.requests) == 3
