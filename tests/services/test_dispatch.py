"""Dispatch through a real core: the deployment that served is the one counted, the caller's deadline caps the
retry budget, and a route is checked once against what every one of its deployments supports."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.server import CoreServer
from tests.conftest import running_core, write_catalog
from tests.fakes.bedrock import BedrockUpstream, serve_bedrock, use_fake_credentials
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

MODEL = "routed"
FAST_RETRY = {"attempts": 2, "initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.02, "budget_seconds": 5}


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake_credentials(monkeypatch, tmp_path)


@pytest.fixture
async def bedrock() -> AsyncIterator[BedrockUpstream]:
    async with serve_bedrock() as fake:
        yield fake


@pytest.fixture
async def openai_upstreams() -> AsyncIterator[tuple[OpenAIUpstream, OpenAIUpstream]]:
    async with serve_openai_upstream() as a, serve_openai_upstream() as b:
        a.chunks, b.chunks = ["from ", "a"], ["from ", "b"]
        yield a, b


def bedrock_deployment(fake: BedrockUpstream) -> dict[str, Any]:
    options = {"region": "us-east-1", "endpoint_url": fake.url, "read_timeout_seconds": 5}
    return {"provider": "bedrock", "model": "deepseek.v3.2", "options": options}


def openai_deployment(fake: OpenAIUpstream, name: str = "m") -> dict[str, Any]:
    return {"provider": "openai", "model": name, "options": {"base_url": fake.url}}


def ask(**fields: Any) -> svc.CreateCompletionRequest:
    messages = [pb.Message(role=pb.Role.ROLE_USER, content="hi")]
    return svc.CreateCompletionRequest(params=pb.CompletionParams(model=MODEL, messages=messages, **fields))


def sample(core: CoreServer, name: str, **labels: str) -> float:
    value = core.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_after_a_fallback_metrics_and_logs_name_the_deployment_that_served(
    tmp_path: Path,
    bedrock: BedrockUpstream,
    openai_upstreams: tuple[OpenAIUpstream, OpenAIUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Bedrock -> OpenAI route whose Bedrock is down: the tokens and the success are OpenAI's, never Bedrock's."""
    bedrock.error_status, bedrock.error_type = 503, "ServiceUnavailableException"
    upstream, _ = openai_upstreams
    deployments = [bedrock_deployment(bedrock), openai_deployment(upstream)]
    entry: dict[str, object] = {"name": MODEL, "deployments": deployments, "retry": {"attempts": 1}}  # no retry
    caplog.set_level(logging.INFO, logger="services.requests")
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            reply = await svc_grpc.CompletionServiceStub(channel).CreateCompletion(ask())
        assert reply.deployment == "1:openai:m" and reply.choices[0].content == "from a"
        assert len(bedrock.requests) == 1 and len(upstream.requests) == 1
        served = {"model": MODEL, "provider": "openai"}
        assert sample(core, "modelmax_core_requests_total", **served, status="ok") == 1
        assert sample(core, "modelmax_core_requests_total", model=MODEL, provider="bedrock", status="ok") == 0
        tokens = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL, "gen_ai_token_type": "output"}
        openai_served = {"gen_ai_provider_name": "openai", "gen_ai_response_model": "m"}
        bedrock_tried = {"gen_ai_provider_name": "aws.bedrock", "gen_ai_response_model": "deepseek.v3.2"}
        assert sample(core, "gen_ai_client_token_usage_count", **tokens, **openai_served) == 1
        assert sample(core, "gen_ai_client_token_usage_count", **tokens, **bedrock_tried) == 0
        assert sample(core, "modelmax_core_fallbacks_total", model=MODEL) == 1
        for provider in ("bedrock", "openai"):  # the in-flight gauge followed the fallback and is back to zero
            assert sample(core, "modelmax_core_inflight_streams", model=MODEL, provider=provider) == 0
    [line] = [record for record in caplog.records if record.name == "services.requests"]
    assert (line.provider, line.deployment, line.attempts) == ("openai", "1:openai:m", 2)  # type: ignore[attr-defined]


async def test_the_callers_deadline_caps_the_retry_budget(
    tmp_path: Path, openai_upstreams: tuple[OpenAIUpstream, OpenAIUpstream]
) -> None:
    """A Retry-After beyond the caller's deadline is not slept through: the route falls back at once and serves."""
    a, b = openai_upstreams
    a.error_status, a.retry_after = 429, "5"
    retry = {**FAST_RETRY, "attempts": 3, "budget_seconds": 30}  # the route alone would wait the 5 s
    entry = {"name": MODEL, "deployments": [openai_deployment(a, "a"), openai_deployment(b, "b")], "retry": retry}
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            started = time.monotonic()
            reply = await svc_grpc.CompletionServiceStub(channel).CreateCompletion(ask(), timeout=2.0)
            took = time.monotonic() - started
    assert reply.choices[0].content == "from b" and reply.deployment == "1:openai:b"
    assert (len(a.requests), len(b.requests)) == (1, 1) and took < 2.0


async def test_a_route_is_checked_against_what_all_its_deployments_support(
    tmp_path: Path, bedrock: BedrockUpstream, openai_upstreams: tuple[OpenAIUpstream, OpenAIUpstream]
) -> None:
    """`n` is honoured by the OpenAI deployment but not by its Bedrock fallback: refused before any upstream call,
    so no fallback can silently drop it."""
    upstream, _ = openai_upstreams
    entry = {"name": MODEL, "deployments": [openai_deployment(upstream), bedrock_deployment(bedrock)]}
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            stub = svc_grpc.CompletionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateCompletion(ask(choice_count=2))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'choice_count' (several choices) is not supported" in (raised.value.details() or "")
            reply = await stub.CreateCompletion(ask())  # what both honour is served as usual
    assert reply.choices[0].content == "from a"
    assert len(upstream.requests) == 1 and bedrock.requests == []
