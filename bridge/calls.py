"""The two ways a dialect calls the core for a completion, shared by every dialect: one whole answer, or a stream
started and read up to its first event. Each dialect passes its own mapping of a failed call to its error shape.

Both watch for the client leaving while they wait (cancelling the call, which reaches the provider in the core),
and both account the time spent waiting on the core in the request's observation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import grpc

from bridge.core_errors import rate_limit_headers
from bridge.dialect import DialectError
from bridge.pipeline import OVERHEAD, ClientGone, Exchange
from bridge.streaming import Cancellable, cancel_when_gone
from modelmax.v1 import completion_service_pb2 as svc

ToError = Callable[[grpc.aio.AioRpcError], DialectError]
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks the end-of-stream sentinel


@dataclass(slots=True)
class Answer:
    """A whole completion, and what came with it."""

    response: svc.CreateCompletionResponse
    limits: Mapping[str, str]  # the key's x-ratelimit-* values, when it has limits
    core_overhead_ms: float | None  # the core's own time, from its trailing metadata


async def complete(exchange: Exchange, request: svc.CreateCompletionRequest, to_error: ToError) -> Answer:
    """One CreateCompletion call; raises the dialect's error, or ClientGone if the client left meanwhile."""
    gateway, seen = exchange.gateway, exchange.seen
    call = gateway.stub.CreateCompletion(request, timeout=gateway.timeout, metadata=exchange.metadata)
    watcher = cancel_when_gone(exchange.request.receive, call)
    waiting = time.perf_counter()
    try:
        response = await call
        trailing = await call.trailing_metadata()
        # the core sends a whole answer's values with its trailers (one send fewer); a core of an earlier version,
        # during a rolling update, in the initial metadata
        limits = rate_limit_headers(trailing) or rate_limit_headers(await call.initial_metadata())
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and watcher.done() and not watcher.cancelled():
            raise ClientGone from None  # nobody is listening any more
        raise to_error(exc) from None
    finally:
        seen.core_wait += time.perf_counter() - waiting
        watcher.cancel()
    return Answer(response, limits, _core_overhead_ms(trailing))


class Events(Cancellable, Protocol):
    """A StreamCompletion call as a relay reads it. `read` returns grpc.aio.EOF after the last event: typed as the
    event alone because a type checker cannot narrow a sentinel, and relays check `is EOF` first."""

    async def read(self) -> svc.StreamCompletionResponse: ...

    async def initial_metadata(self) -> grpc.aio.Metadata: ...


@dataclass(slots=True)
class Started:
    """A stream whose first event (its start) has arrived."""

    call: Events
    start: svc.CompletionStart
    limits: Mapping[str, str]
    watcher: asyncio.Future[None]  # the client-gone watcher, handed on to the StreamResponse


async def open_stream(
    exchange: Exchange, request: svc.StreamCompletionRequest, to_error: ToError, malformed: Callable[[], DialectError]
) -> Started:
    """Start the call and wait for its first event, so a failure to start is a real HTTP status, not a 200.
    `malformed` is the dialect's error for a core stream that does not begin with its start event."""
    gateway, seen = exchange.gateway, exchange.seen
    call = cast(Events, gateway.stub.StreamCompletion(request, timeout=gateway.timeout, metadata=exchange.metadata))
    watcher = cancel_when_gone(exchange.request.receive, call)  # a client gone before the first event ends it now
    waiting = time.perf_counter()
    try:
        first = await call.read()
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():  # the client left: the watcher cancelled the call
            raise ClientGone from None
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise to_error(exc) from None
    except BaseException:
        watcher.cancel()
        call.cancel()
        raise
    finally:
        seen.core_wait += time.perf_counter() - waiting
    if first is EOF or not first.HasField("start"):
        watcher.cancel()
        call.cancel()
        raise malformed()
    limits = rate_limit_headers(await call.initial_metadata())  # arrived with the first event: no wait
    return Started(call, first.start, limits, watcher)


def _core_overhead_ms(trailing: grpc.aio.Metadata) -> float | None:
    for key, value in trailing:
        if key == OVERHEAD and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
    return None
