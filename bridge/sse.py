"""Relays one StreamCompletion call as OpenAI SSE: errors before the first byte are statuses, later ones events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

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
    return SSEResponse(call, encoder, seen, release, headers)


class SSEResponse(Response):
    """The SSE body of one StreamCompletion call.

    Starlette's StreamingResponse opens a task group with a second task per stream to notice a client that leaves
    (uvicorn speaks ASGI 2.3, whose `send` to a gone client is silently dropped). This response watches with one
    plain task instead, whose completion cancels the gRPC call: the relay then stops at once and the cancel reaches
    the provider in the core. Fewer tasks per open stream, and no middleware between the relay and `send`.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall,
        encoder: ChunkEncoder,
        seen: Observation,
        release: Callable[[], None],
        headers: dict[str, str],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._call, self._encoder, self._seen, self._release = call, encoder, seen, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = self._seen
        call = self._call
        watcher = asyncio.ensure_future(client_gone(receive))
        # A client that leaves stops the generation it asked for (a watcher cancelled at the end has nothing to stop).
        watcher.add_done_callback(lambda gone: gone.cancelled() or call.cancel())
        inflight = seen.metrics.inflight_of(seen.metrics.label(seen.model, 200))
        inflight.inc()
        status = 499  # unless the stream reaches its end: the client went away
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with aclosing(_events(call, self._encoder, seen)) as chunks:
                async for chunk in chunks:
                    if seen.first_chunk is None:
                        seen.chunk()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            status = seen.stream_status or 200
        except asyncio.CancelledError:
            if not (watcher.done() and not watcher.cancelled()):
                raise  # cancelled from outside (shutdown), not by a client that left
        finally:
            watcher.cancel()
            call.cancel()  # no-op once the call is done; otherwise carries the disconnect into the core
            inflight.dec()
            self._release()
            seen.finish(status)


async def client_gone(receive: Receive) -> None:
    """Returns when the client has disconnected (the request body, if any, was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _events(call: grpc.aio.UnaryStreamCall, encoder: ChunkEncoder, seen: Observation) -> AsyncIterator[bytes]:
    """Role chunk(s), content, reasoning and tool-call chunks, the finish chunk(s), the usage chunk when asked, [DONE].

    With several choices, every delta carries its choice's index; each choice has its own role and finish chunk.
    A `batch` event from the core becomes the same chunks its events would have, written with one ASGI send.
    If the client disconnects, SSEResponse cancels the gRPC call (reads then raise CancelledError) and the core
    cancels the provider. A failure mid-stream ends with an error event, never with an invented finish_reason.
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
            if kind == "finish":
                finished = True
                yield encoder.finish(event.finish)
                if event.finish.HasField("usage"):
                    yield encoder.usage(event.finish.usage)
            elif kind == "batch":  # events the core had ready together: their chunks in order, in one send
                yield b"".join(_chunk(encoder, inner, inner.WhichOneof("event")) for inner in event.batch.events)
            else:
                chunk = _chunk(encoder, event, kind)
                if chunk:
                    yield chunk
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


def _chunk(encoder: ChunkEncoder, event: svc.StreamCompletionResponse, kind: str | None) -> bytes:
    """The SSE chunk of a delta, reasoning or tool-call event (`kind` is its oneof case); nothing for any other."""
    if kind == "delta":
        return encoder.content(event.delta.text, event.delta.choice_index)
    if kind == "tool_call":
        return encoder.tool_call(event.tool_call)
    if kind == "reasoning":
        return encoder.reasoning(event.reasoning.text, event.reasoning.choice_index)
    return b""
