"""An in-process gRPC transport: the bridge calls the core's servicers on the same event loop, with no serialisation
and no HTTP/2, for the combined mode (`modelmax run --combined`, startup/combined.py).

`Handlers` stands in for a `grpc.aio.Server` in the generated `add_*Servicer_to_server` functions and keeps the method
handlers they register; `Channel` stands in for a `grpc.aio.Channel` under the generated stubs, so the bridge's code
is the same in both modes. What a call keeps from the wire, because the core and the bridge rely on it:

- the same request and response messages (the objects themselves: the core never changes a request, and builds a new
  message for each event it sends), the metadata both ways (invocation, initial, trailing), deadlines
  (`time_remaining`; the call ends DEADLINE_EXCEEDED), cancellation (the handler's task is cancelled, as grpc.aio
  does), and error statuses (`abort_with_status` reaches the caller as `grpc.aio.AioRpcError` with the same code,
  details and trailing metadata, the ErrorInfo's `grpc-status-details-bin` included);
- backpressure: a stream's handler runs in its own task and waits while `WINDOW` events are unread, as it waits for
  HTTP/2 flow control over the wire;
- the channel's send limit: a request larger than `max_send_bytes` is RESOURCE_EXHAUSTED, as grpc.aio refuses it.

The handler runs in a task of its own (a copy of the caller's context, as a new RPC would have none of the bridge's
context variables to see), so the bridge's disconnect watcher can cancel a call whatever the bridge's task is doing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from contextlib import aclosing
from typing import Any, cast

import grpc

MetadataPairs = Sequence[tuple[str, str | bytes]]
WINDOW = 8  # events a stream's handler may have sent ahead of its reader
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks the end-of-stream sentinel


class Handlers:
    """The method handlers of the servicers added to it, by full method name ("/package.Service/Method")."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]) -> None:
        """What the generated code calls first; the registered handlers below carry the same methods."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler


class Both:
    """A real server and the in-process handlers at once: the generated `add_*_to_server` registers on both."""

    def __init__(self, server: grpc.aio.Server, handlers: Handlers) -> None:
        self._server, self._handlers = server, handlers

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        self._server.add_generic_rpc_handlers(handlers)
        self._handlers.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]  # grpc-stubs gap
        self._handlers.add_registered_method_handlers(service, handlers)


def _metadata(pairs: MetadataPairs) -> grpc.aio.Metadata:
    return grpc.aio.Metadata(*pairs)


class _Context:
    """The servicer's side of one call: what the core uses of grpc.aio's ServicerContext, and no more."""

    __slots__ = ("_deadline", "_initial", "_invocation", "_loop", "_trailing", "initial_sent")

    def __init__(self, invocation: MetadataPairs, deadline: float | None, loop: asyncio.AbstractEventLoop) -> None:
        self._invocation = tuple(invocation)
        self._deadline = deadline
        self._loop = loop
        self._initial: MetadataPairs = ()
        self._trailing: MetadataPairs = ()
        self.initial_sent: asyncio.Future[None] = loop.create_future()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._invocation

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def send_initial_metadata(self, metadata: MetadataPairs) -> None:
        if self.initial_sent.done():
            raise grpc.aio.UsageError("Send initial metadata failed: already sent")
        self._initial = tuple(metadata)
        self.initial_sent.set_result(None)

    def set_trailing_metadata(self, metadata: MetadataPairs) -> None:
        self._trailing = tuple(metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: MetadataPairs = ()) -> None:
        self._trailing = tuple(trailing_metadata or ())
        raise _Aborted(code, details)

    # what the caller's side reads

    def mark_initial_sent(self) -> None:
        if not self.initial_sent.done():
            self.initial_sent.set_result(None)

    @property
    def initial(self) -> grpc.aio.Metadata:
        return _metadata(self._initial)

    @property
    def trailing(self) -> grpc.aio.Metadata:
        return _metadata(self._trailing)

    def error(self, code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        self.mark_initial_sent()
        return grpc.aio.AioRpcError(code, self.initial, self.trailing, details, None)


class _Aborted(grpc.aio.AbortError):
    """`abort` in a handler: the status the caller gets (grpc.aio raises its AbortError there too)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _failure(context: _Context, exc: BaseException) -> grpc.aio.AioRpcError:
    """The caller's error for a handler that ended with `exc`, as grpc.aio reports it."""
    if isinstance(exc, _Aborted):
        return context.error(exc.code, exc.details)
    if isinstance(exc, TimeoutError):
        return context.error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    return context.error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")


class _Call:
    """What both kinds of call share: the handler's task, its context, cancellation and the final status."""

    __slots__ = ("_cancelled", "_context", "_task")

    def __init__(self, context: _Context) -> None:
        self._context = context
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    def cancel(self) -> bool:
        """Cancel the handler (it sees CancelledError where it waits), as a client's RST_STREAM does."""
        if self._task is None or self._task.done():
            return False
        self._cancelled = True
        self._task.cancel()
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        await asyncio.shield(self._context.initial_sent)
        return self._context.initial

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        if self._task is not None and not self._task.done():
            await asyncio.wait((self._task,))
        return self._context.trailing


def _deadline_of(timeout: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if timeout is None else loop.time() + timeout


class _UnaryCall(_Call):
    """A unary call in flight; awaiting it gives the response or raises AioRpcError (CancelledError once cancelled)."""

    __slots__ = ()

    def __init__(self, behaviour: Callable[[Any, Any], Awaitable[Any]], request: Any, context: _Context) -> None:
        super().__init__(context)
        self._task = asyncio.get_running_loop().create_task(
            self._run(behaviour, request), context=contextvars.Context()
        )

    async def _run(self, behaviour: Callable[[Any, Any], Awaitable[Any]], request: Any) -> Any:
        context = self._context
        try:
            async with asyncio.timeout_at(context._deadline):
                response = await behaviour(request, context)
        except asyncio.CancelledError:
            context.mark_initial_sent()
            raise
        except BaseException as exc:  # noqa: BLE001 (every ending is a status for the caller)
            raise _failure(context, exc) from None
        context.mark_initial_sent()
        return response

    def __await__(self) -> Generator[Any, None, Any]:
        assert self._task is not None
        return self._task.__await__()

    async def code(self) -> grpc.StatusCode:
        assert self._task is not None
        await asyncio.wait((self._task,))
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        exc = self._task.exception()
        return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.OK


class _StreamCall(_Call):
    """A server-streaming call in flight: `read` gives each message, then EOF; a failure raises AioRpcError."""

    __slots__ = ("_events", "_ended", "_space", "_waiting")

    def __init__(
        self, behaviour: Callable[[Any, Any], AsyncGenerator[Any, None]], request: Any, context: _Context
    ) -> None:
        super().__init__(context)
        loop = asyncio.get_running_loop()
        self._events: deque[Any] = deque()
        self._ended: BaseException | object | None = None  # EOF, the caller's error, or CancelledError
        self._waiting: asyncio.Future[None] | None = None  # the reader, waiting for an event
        self._space: asyncio.Future[None] | None = None  # the handler, waiting for the reader
        self._task = loop.create_task(self._run(behaviour, request), context=contextvars.Context())

    async def _run(self, behaviour: Callable[[Any, Any], AsyncGenerator[Any, None]], request: Any) -> None:
        context = self._context
        ended: BaseException | object = EOF
        try:
            # closed where it stands when the call ends early (GeneratorExit at its `yield`), as grpc.aio does
            async with asyncio.timeout_at(context._deadline), aclosing(behaviour(request, context)) as messages:
                async for message in messages:
                    context.mark_initial_sent()
                    self._events.append(message)
                    self._wake()
                    if len(self._events) >= WINDOW:  # the reader is behind: wait, as for HTTP/2 flow control
                        self._space = asyncio.get_running_loop().create_future()
                        await self._space
        except asyncio.CancelledError as exc:
            ended = exc
            raise
        except BaseException as exc:  # noqa: BLE001 (every ending is a status for the caller)
            ended = _failure(context, exc)
        finally:
            context.mark_initial_sent()
            self._ended = ended
            self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def read(self) -> Any:
        if self._cancelled:  # what was sent before the cancel is not read after it, as over the wire
            raise asyncio.CancelledError()
        while not self._events:
            ended = self._ended
            if ended is not None:
                if isinstance(ended, BaseException):
                    raise ended if not isinstance(ended, asyncio.CancelledError) else asyncio.CancelledError()
                return EOF
            self._waiting = asyncio.get_running_loop().create_future()
            try:
                await self._waiting
            finally:
                self._waiting = None
        message = self._events.popleft()
        space = self._space
        if space is not None and not space.done() and len(self._events) < WINDOW:
            space.set_result(None)
        return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not EOF:
            yield message

    async def code(self) -> grpc.StatusCode:
        assert self._task is not None
        await asyncio.wait((self._task,))
        ended = self._ended
        if isinstance(ended, grpc.aio.AioRpcError):
            return ended.code()
        return grpc.StatusCode.CANCELLED if isinstance(ended, asyncio.CancelledError) else grpc.StatusCode.OK


class _Multicallable:
    """`channel.unary_unary(...)` / `unary_stream(...)`: calling it starts a call."""

    __slots__ = ("_channel", "_handler", "_method")

    def __init__(self, channel: Channel, method: str) -> None:
        self._channel, self._method = channel, method
        self._handler: grpc.RpcMethodHandler[Any, Any] | None = None

    def _start(self, request: Any, timeout: float | None, metadata: MetadataPairs | None) -> _Context:
        loop = asyncio.get_running_loop()
        return _Context(metadata or (), _deadline_of(timeout, loop), loop)

    def _refusal(self, request: Any) -> _Aborted | None:
        """What the channel itself refuses before any handler runs: an unknown method, a request over the limit
        (reported when the call is awaited or read, as grpc.aio does)."""
        if self._handler is None:
            self._handler = self._channel.methods.get(self._method)
            if self._handler is None:
                return _Aborted(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {self._method}")
        limit = self._channel.max_send_bytes
        if limit is not None and (size := request.ByteSize()) > limit:
            return _Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Sent message larger than max ({size} vs. {limit})")
        return None


async def _refused_unary(refusal: _Aborted) -> Any:
    raise refusal


async def _refused_stream(refusal: _Aborted) -> AsyncGenerator[Any, None]:
    raise refusal
    yield  # an async generator, as a streaming handler is


class _UnaryUnary(_Multicallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: MetadataPairs | None = None, **_: object
    ) -> _UnaryCall:
        context = self._start(request, timeout, metadata)
        refusal = self._refusal(request)
        if refusal is not None:
            return _UnaryCall(lambda _request, _context: _refused_unary(refusal), request, context)
        assert self._handler is not None and self._handler.unary_unary is not None, self._method
        return _UnaryCall(self._handler.unary_unary, request, context)


class _UnaryStream(_Multicallable):
    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: MetadataPairs | None = None, **_: object
    ) -> _StreamCall:
        context = self._start(request, timeout, metadata)
        refusal = self._refusal(request)
        if refusal is not None:
            return _StreamCall(lambda _request, _context: _refused_stream(refusal), request, context)
        assert self._handler is not None and self._handler.unary_stream is not None, self._method
        behaviour = cast(Callable[[Any, Any], AsyncGenerator[Any, None]], self._handler.unary_stream)
        return _StreamCall(behaviour, request, context)


class Channel:
    """The generated stubs' channel, in process: each method is the servicer's handler, called directly."""

    def __init__(self, handlers: Handlers, *, max_send_bytes: int | None = None) -> None:
        self.methods = handlers.methods  # read at each call's start: servicers may be added after the stubs
        self.max_send_bytes = max_send_bytes

    def unary_unary(self, method: str, *_: object, **__: object) -> _UnaryUnary:
        return _UnaryUnary(self, method)

    def unary_stream(self, method: str, *_: object, **__: object) -> _UnaryStream:
        return _UnaryStream(self, method)

    async def close(self, grace: float | None = None) -> None:
        """Nothing to close: the core's own shutdown ends its calls."""

    async def channel_ready(self) -> None:
        """Always ready: there is no connection to wait for."""
