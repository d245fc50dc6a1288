"""The combined mode's in-process transport (startup/inprocess.py) behaves as the wire does: each scenario runs the
real core's servicers once through a grpc.aio channel to its port and once through the in-process channel, and
what the caller observes must be the same (the e2e suite also runs whole with `--transport=inprocess`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from bridge.core_errors import error_info
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.server import CoreServer, start_core
from services.settings import Settings as CoreSettings
from startup.inprocess import EOF, WINDOW, Channel, Handlers
from tests.conftest import API_KEY, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

MODEL = "chat"
AUTH = (("authorization", f"Bearer {API_KEY}"),)


def params(**fields: Any) -> pb.CompletionParams:
    fields.setdefault("model", MODEL)
    return pb.CompletionParams(messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")], **fields)


@asynccontextmanager
async def core_for(tmp_path: Path, upstream: OpenAIUpstream) -> AsyncIterator[tuple[CoreServer, Handlers]]:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": upstream.url}}
    settings = CoreSettings(catalog_path=write_catalog(tmp_path, [entry]), port=0, api_keys=(API_KEY,))
    handlers = Handlers()
    core = await start_core(settings, {}, handlers)
    try:
        yield core, handlers
    finally:
        await core.stop(grace=None)


@asynccontextmanager
async def stub(kind: str, core: CoreServer, handlers: Handlers, **channel: Any) -> AsyncIterator[Any]:
    if kind == "grpc":
        options = [("grpc.max_send_message_length", channel["max_send_bytes"])] if channel else None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}", options=options) as wire:
            yield svc_grpc.CompletionServiceStub(wire)
    else:
        yield svc_grpc.CompletionServiceStub(cast(grpc.aio.Channel, Channel(handlers, **channel)))


TRANSPORTS = pytest.mark.parametrize("kind", ["grpc", "inprocess"])


async def _observed(call: Callable[[], Any]) -> tuple[object, ...]:
    """What a caller sees of a failed call: its code, details, ErrorInfo reason and metadata keys."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call()
    exc = raised.value
    info = error_info(exc)
    trailing = sorted(k for k, _ in exc.trailing_metadata() or ())
    return exc.code(), exc.details(), None if info is None else info.reason, trailing


async def test_answers_errors_and_metadata_are_the_same_both_ways(tmp_path: Path) -> None:
    seen: dict[str, list[object]] = {}
    async with serve_openai_upstream() as upstream, core_for(tmp_path, upstream) as (core, handlers):
        for kind in ("grpc", "inprocess"):
            async with stub(kind, core, handlers) as s:
                call = s.CreateCompletion(svc.CreateCompletionRequest(params=params()), metadata=AUTH, timeout=10)
                answer = await call
                trailing = {k: v for k, v in await call.trailing_metadata()}
                streamed = s.StreamCompletion(svc.StreamCompletionRequest(params=params()), metadata=AUTH)
                kinds = [event.WhichOneof("event") async for event in streamed]
                seen[kind] = [
                    answer.choices[0].content, answer.deployment, sorted(trailing), kinds,
                    await streamed.code(),
                    await _observed(lambda: s.CreateCompletion(svc.CreateCompletionRequest(params=params())) ),
                    await _observed(lambda: s.CreateCompletion(
                        svc.CreateCompletionRequest(params=params(model="nope")), metadata=AUTH)),
                    await _observed(lambda: s.CreateCompletion(
                        svc.CreateCompletionRequest(params=params(temperature=7)), metadata=AUTH)),
                ]  # fmt: skip
    assert seen["grpc"] == seen["inprocess"]
    assert seen["grpc"][0] == "Hello, world!" and seen["grpc"][3][0] == "start" and seen["grpc"][3][-1] == "finish"
    unauthenticated = cast(tuple[object, ...], seen["grpc"][5])
    assert unauthenticated[0] == grpc.StatusCode.UNAUTHENTICATED and "grpc-status-details-bin" in unauthenticated[3]


@TRANSPORTS
async def test_a_deadline_ends_the_call_and_the_upstream(tmp_path: Path, kind: str) -> None:
    async with (
        serve_openai_upstream(chunks=["a"] * 50, chunk_delay=0.05) as upstream,
        core_for(tmp_path, upstream) as (core, handlers),
        stub(kind, core, handlers) as s,
    ):
        streamed = s.StreamCompletion(svc.StreamCompletionRequest(params=params()), metadata=AUTH, timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in streamed:
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(upstream.disconnected.wait(), 5)  # the core's handler was cancelled, and so its call


@TRANSPORTS
async def test_a_caller_that_cancels_ends_the_upstream(tmp_path: Path, kind: str) -> None:
    async with (
        serve_openai_upstream(chunks=["a"] * 50, chunk_delay=0.05) as upstream,
        core_for(tmp_path, upstream) as (core, handlers),
        stub(kind, core, handlers) as s,
    ):
        streamed = s.StreamCompletion(svc.StreamCompletionRequest(params=params()), metadata=AUTH)
        assert (await streamed.read()).HasField("start")
        assert streamed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await streamed.read()
        await asyncio.wait_for(upstream.disconnected.wait(), 5)
        assert await streamed.code() == grpc.StatusCode.CANCELLED


@TRANSPORTS
async def test_a_request_over_the_send_limit_is_resource_exhausted(tmp_path: Path, kind: str) -> None:
    async with (
        serve_openai_upstream() as upstream,
        core_for(tmp_path, upstream) as (core, handlers),
        stub(kind, core, handlers, max_send_bytes=1000) as s,
    ):
        big = pb.CompletionParams(model=MODEL, messages=[pb.Message(role=pb.Role.ROLE_USER, content="x" * 2000)])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await s.CreateCompletion(svc.CreateCompletionRequest(params=big), metadata=AUTH)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert upstream.requests == []


async def test_a_stream_nobody_reads_waits_after_its_window(tmp_path: Path) -> None:
    """Backpressure, as HTTP/2 flow control gives it: the core's handler stops WINDOW events ahead of its reader,
    so a slow HTTP client holds the upstream back instead of filling memory."""
    chunks = [f"c{i}" for i in range(4 * WINDOW)]
    async with serve_openai_upstream(chunks=chunks) as upstream, core_for(tmp_path, upstream) as (core, handlers):
        channel = Channel(handlers)
        s = svc_grpc.CompletionServiceStub(cast(grpc.aio.Channel, channel))
        streamed = s.StreamCompletion(svc.StreamCompletionRequest(params=params()), metadata=AUTH)
        assert (await streamed.read()).HasField("start")
        await asyncio.sleep(0.3)  # the upstream has long sent everything; the handler must not have relayed it all
        ahead = len(streamed._events)  # type: ignore[attr-defined]
        assert 0 < ahead <= WINDOW
        assert not streamed.done()
        texts = []
        while (event := await streamed.read()) is not EOF:
            if event.HasField("delta"):
                texts.append(event.delta.text)
        assert "".join(texts) == "".join(chunks)
        assert await streamed.code() == grpc.StatusCode.OK


async def test_an_unknown_method_is_unimplemented() -> None:
    channel = Channel(Handlers())
    s = svc_grpc.CompletionServiceStub(cast(grpc.aio.Channel, channel))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await s.ListModels(svc.ListModelsRequest())
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
