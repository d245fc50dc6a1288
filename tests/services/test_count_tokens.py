"""CountTokens through a real core and a raw gRPC client: the completion's door (key, allowed models, validation),
the deployment's own count (Gemini via its fake) or the documented estimate (Bedrock), never rate-limited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.policy import open_store
from services.policy.gate import prompt_estimate
from services.policy.keys import KeySpec
from services.server import CoreServer
from tests.conftest import running_core, write_catalog
from tests.fakes.bedrock import BedrockUpstream, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import GeminiUpstream, count_tokens, serve_gemini
from tests.grpc_client import core_channel

GEMINI_KEY = "AIza-count-tokens-test"
PNG = pb.Image(data=b"\x89PNG\r\n\x1a\n", media_type="image/png")
NOW = pb.Tool(name="now", description="The time.", parameters='{"type":"object"}')


def ask(model: str, *messages: pb.Message, **fields: Any) -> svc.CountTokensRequest:
    conversation = list(messages) or [pb.Message(role=pb.Role.ROLE_USER, content="Hi")]
    return svc.CountTokensRequest(params=pb.CompletionParams(model=model, messages=conversation, **fields))


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # an aio error is a Call too
    assert status is not None
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == "modelmax.v1"
    return info


@pytest.fixture
async def bedrock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[BedrockUpstream]:
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as fake:
        yield fake


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiUpstream]:
    async with serve_gemini(api_key=GEMINI_KEY) as fake:
        yield fake


def catalog(tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream) -> str:
    bedrock_options = {"region": "us-east-1", "endpoint_url": bedrock.url, "read_timeout_seconds": 5}
    gemini_options = {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url}
    return write_catalog(
        tmp_path,
        [
            {"name": "deepseek", "provider": "bedrock", "model": "deepseek.v3.2", "options": bedrock_options},
            {"name": "gemini", "provider": "gemini", "model": "gemini-3-flash-preview", "options": gemini_options},
        ],
    )


@asynccontextmanager
async def core_for(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream, **settings: Any
) -> AsyncIterator[CoreServer]:
    async with running_core(catalog(tmp_path, bedrock, gemini), {"GEMINI_API_KEY": GEMINI_KEY}, **settings) as core:
        yield core


async def test_bedrock_answers_the_documented_estimate_and_is_never_called(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream
) -> None:
    request = ask(
        "deepseek",
        pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."),  # 9 characters
        pb.Message(role=pb.Role.ROLE_USER, content="Hé!"),  # 3
        pb.Message(role=pb.Role.ROLE_USER, parts=[pb.ContentPart(text="Look"), pb.ContentPart(image=PNG)]),  # 4
        tools=[NOW],  # 3 + 9 + 17
    )
    async with core_for(tmp_path, bedrock, gemini) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        reply = await svc_grpc.CompletionServiceStub(channel).CountTokens(request, timeout=30)
    # the core's prompt estimate (services/policy/gate.py): ceil(45 characters / 4) + 8 tokens for each of 3
    # messages + 2048 for the image
    assert reply == svc.CountTokensResponse(
        input_tokens=12 + 24 + 2048, estimated=True, deployment="0:bedrock:deepseek.v3.2"
    )
    assert prompt_estimate(request.params) == reply.input_tokens
    assert bedrock.requests == []


async def test_gemini_counts_with_its_own_count_tokens(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream
) -> None:
    request = ask(
        "gemini",
        pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."),
        pb.Message(role=pb.Role.ROLE_USER, content="What time is it?"),
        tools=[NOW],
    )
    async with core_for(tmp_path, bedrock, gemini) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        reply = await svc_grpc.CompletionServiceStub(channel).CountTokens(request, timeout=30)
    [received] = gemini.requests
    assert received.action == "countTokens"
    assert reply == svc.CountTokensResponse(
        input_tokens=count_tokens(received.body), estimated=False, deployment="0:gemini:gemini-3-flash-preview"
    )
    assert reply.input_tokens == 1 + 4 + 2 + 3 + 1  # "user", the question, the system prompt, the tool, its schema


async def test_an_upstream_failure_is_an_error_never_an_estimate(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream
) -> None:
    gemini.error_status = 429
    async with core_for(tmp_path, bedrock, gemini) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await svc_grpc.CompletionServiceStub(channel).CountTokens(ask("gemini"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(raised.value)
    assert (info.reason, info.metadata["provider"]) == ("ERROR_REASON_RATE_LIMITED", "gemini")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ask("deepseek", top_k=5), "top_k"),  # validated and checked against the route, like a completion
        (ask("deepseek", reasoning_budget_tokens=0), "reasoning_budget_tokens"),
        (svc.CountTokensRequest(params=pb.CompletionParams(model="deepseek")), "messages"),
        (ask("gemini", pb.Message(role=pb.Role.ROLE_USER, content="x", is_error=True)), "messages[0].is_error"),
    ],
    ids=["unsupported", "invalid", "no messages", "is_error on a user message"],
)
async def test_the_params_are_checked_like_a_completions(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream, request_: svc.CountTokensRequest, field: str
) -> None:
    async with core_for(tmp_path, bedrock, gemini) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await svc_grpc.CompletionServiceStub(channel).CountTokens(request_, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).metadata["field"] == field
    assert gemini.requests == [] and bedrock.requests == []


async def test_an_unknown_model_is_not_found(tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream) -> None:
    async with core_for(tmp_path, bedrock, gemini) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await svc_grpc.CompletionServiceStub(channel).CountTokens(ask("nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_call_without_a_valid_key_is_unauthenticated(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream
) -> None:
    async with core_for(tmp_path, bedrock, gemini) as core:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:  # a raw client: no key at all
            stub = svc_grpc.CompletionServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer not-a-key"),)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.CountTokens(ask("deepseek"), metadata=metadata, timeout=30)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_info(raised.value).reason == "ERROR_REASON_UNAUTHENTICATED"


async def test_a_stored_key_counts_only_its_models_and_counting_spends_none_of_its_rate(
    tmp_path: Path, bedrock: BedrockUpstream, gemini: GeminiUpstream
) -> None:
    database_url = f"sqlite:///{tmp_path}/policy.sqlite3"
    store = await open_store(database_url)
    try:
        _, key = await store.create_key(KeySpec(name="one-a-minute", allowed_models=frozenset({"deepseek"}), rpm=1))
    finally:
        await store.close()
    async with core_for(tmp_path, bedrock, gemini, database_url=database_url, api_keys=()) as core:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = svc_grpc.CompletionServiceStub(channel)
            bearer = (("authorization", f"Bearer {key}"),)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CountTokens(ask("gemini"), metadata=bearer, timeout=30)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_info(raised.value).metadata["field"] == "model"
            assert gemini.requests == []
            for _ in range(3):  # nothing generated, nothing billed: not held against the request rate
                reply = await stub.CountTokens(ask("deepseek"), metadata=bearer, timeout=30)
                assert reply.estimated
            completion = svc.CreateCompletionRequest(params=ask("deepseek").params)
            await stub.CreateCompletion(completion, metadata=bearer, timeout=30)  # the minute's one request
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateCompletion(completion, metadata=bearer, timeout=30)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the limit is on, for completions


async def test_a_deployment_without_credentials_fails_as_it_would_serve_never_estimates(
    local_core: CoreServer,
) -> None:
    # The default catalog's Gemini entry has no GEMINI_API_KEY here: counting says so, like a completion would.
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await svc_grpc.CompletionServiceStub(channel).CountTokens(ask("gemini-3-flash-preview"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(raised.value).reason == "ERROR_REASON_UPSTREAM_AUTH"


def test_the_estimate_counts_reasoning_given_back_and_the_response_schema() -> None:
    plain = pb.CompletionParams(model="m", messages=[pb.Message(role=pb.Role.ROLE_USER, content="Hi")])
    fuller = pb.CompletionParams()
    fuller.CopyFrom(plain)
    fuller.messages.add(role=pb.Role.ROLE_ASSISTANT, reasoning=[pb.Reasoning(text="x" * 40, signature="s")])
    fuller.response_format.schema = "y" * 40
    assert prompt_estimate(fuller) == prompt_estimate(plain) + 8 + 10 + 10  # a message, and 40 characters twice
