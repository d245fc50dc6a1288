"""Streamed responses relayed from one gRPC call, and noticing a client that left; shared by every dialect.

A dialect turns the core's events into its own SSE bytes (an async generator of chunks); `StreamResponse` sends
them, watches for the client leaving with one plain task, and carries a disconnect into the core by cancelling
the call. `cancel_when_gone` is the same watcher for a unary call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from types import MappingProxyType
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge.metrics import Observation

# Every SSE response's own headers; a dialect puts its headers after these.
SSE_HEADERS: Mapping[str, str] = MappingProxyType({"cache-control": "no-cache", "x-accel-buffering": "no"})


class Cancellable(Protocol):
    """A gRPC call, as far as the client's leaving is concerned."""

    def cancel(self) -> bool: ...


class StreamResponse(Response):
    """The SSE body of one streaming gRPC call.

    Starlette's StreamingResponse opens a task group with a second task per stream to notice a client that leaves
    (uvicorn speaks ASGI 2.3, whose `send` to a gone client is silently dropped). This response watches with one
    plain task instead, whose completion cancels the gRPC call: the relay then stops at once and the cancel reaches
    the provider in the core. Fewer tasks per open stream, and nothing between the relay and `send`.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        call: Cancellable,
        chunks: AsyncGenerator[bytes, None],
        seen: Observation,
        headers: Mapping[str, str],
        watcher: asyncio.Future[None] | None = None,
    ) -> None:
        """`chunks` reads `call` and yields the dialect's SSE bytes; it sets `seen.stream_status` on an error.
        `watcher`: the `cancel_when_gone` of `call` if the dialect started one while it waited for the first event."""
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._call, self._chunks, self._seen, self._watcher = call, chunks, seen, watcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = self._seen
        call = self._call
        watcher = self._watcher or cancel_when_gone(receive, call)
        inflight = seen.metrics.inflight_of(seen.metrics.label(seen.model, 200))
        inflight.inc()
        status = 499  # unless the stream reaches its end: the client went away
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with aclosing(self._chunks) as chunks:
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
            seen.finish(status)


def cancel_when_gone(receive: Receive, call: Cancellable) -> asyncio.Future[None]:
    """Watch for the client leaving and cancel `call` when it does; cancel the returned watcher once done.

    A client that leaves stops the generation it asked for (a watcher cancelled at the end has nothing to stop).
    """
    watcher = asyncio.ensure_future(client_gone(receive))
    watcher.add_done_callback(lambda gone: gone.cancelled() or call.cancel())
    return watcher


async def client_gone(receive: Receive) -> None:
    """Returns when the client has disconnected (the request body, if any, was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
