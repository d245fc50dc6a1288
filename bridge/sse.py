"""Relays one StreamCompletion call as OpenAI SSE: errors before the first byte are statuses, later ones events."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from bridge.errors import OpenAIError, from_rpc_error
from bridge.metrics import Observation
from bridge.translate import SSE_DONE, ChunkEncoder, sse_data
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc

log = logging.getLogger(__name__)

_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def open_stream(
    stub: svc_grpc.CompletionServiceStub,
    request: svc.StreamCompletionRequest,
    timeout: float,
    metadata: tuple[tuple[str, str], ...],
    seen: Observation,
    release: Callable[[], None],
) -> Response:
    """Start the call and wait for its first event, so a failure to start is a real HTTP status, not a 200."""
    call = stub.StreamCompletion(request, timeout=timeout, metadata=metadata)
    waiting = time.perf_counter()
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    except BaseException:
        call.cancel()
        raise
    finally:
        seen.core_wait += time.perf_counter() - waiting
    if first is grpc.aio.EOF or not first.HasField("start"):
        call.cancel()
        raise OpenAIError(502, "The gateway core sent a malformed stream.", "api_error", None, "internal_error")
    encoder = ChunkEncoder(first.start, request.params.include_usage, request.params.choice_count)  # 0 (unset): 1
    headers = {
        **_HEADERS,
        "x-request-id": seen.request_id,
        "x-modelmax-deployment": first.start.deployment,
        "x-modelmax-attempts": str(first.start.attempts),
    }
    return StreamingResponse(
        _observed(_events(call, encoder, seen), seen, release),
        media_type="text/event-stream",
        headers=headers,
        background=BackgroundTask(release),  # also when the body never started (the client left at once)
    )


async def _observed(
    events: AsyncIterator[bytes], seen: Observation, release: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Counts the stream as in flight while it is open, and finishes the observation however it ends."""
    inflight = seen.metrics.inflight.labels(seen.metrics.label(seen.model, 200))
    inflight.inc()
    status = 499  # unless the stream reaches its end: the client went away
    try:
        async with aclosing(events) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                seen.chunk()
                yield chunk
        status = seen.stream_status or 200
    finally:
        inflight.dec()
        release()
        seen.finish(status)


async def _events(call: grpc.aio.UnaryStreamCall, encoder: ChunkEncoder, seen: Observation) -> AsyncIterator[bytes]:
    """Role chunk(s), content, reasoning and tool-call chunks, the finish chunk(s), the usage chunk when asked, [DONE].

    With several choices, every delta carries its choice's index; each choice has its own role and finish chunk.
    If the client disconnects, Starlette cancels this generator; the `finally` cancels the gRPC call, which cancels
    the provider in the core. A failure mid-stream ends with an error event, never with an invented finish_reason.
    """
    finished = False
    try:
        yield encoder.role()
        while True:
            waiting = time.perf_counter()
            event = await call.read()
            seen.core_wait += time.perf_counter() - waiting
            if event is grpc.aio.EOF:
                break
            kind = event.WhichOneof("event")
            if kind == "delta":
                yield encoder.content(event.delta.text, event.delta.choice_index)
            elif kind == "tool_call":
                yield encoder.tool_call(event.tool_call)
            elif kind == "reasoning":
                yield encoder.reasoning(event.reasoning.text, event.reasoning.choice_index)
            elif kind == "finish":
                finished = True
                yield encoder.finish(event.finish)
                if event.finish.HasField("usage"):
                    yield encoder.usage(event.finish.usage)
        if not finished:
            log.error("core stream ended without a finish event")
            seen.stream_status = 502
            yield sse_data(
                OpenAIError(502, "The stream ended unexpectedly.", "api_error", None, "internal_error").body()
            )
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        seen.stream_status = error.status  # the status this error would have had before the first byte
        yield sse_data(error.body())
    finally:
        call.cancel()  # no-op once the call is done; otherwise carries a client disconnect into the core
    yield SSE_DONE
