"""The floor of ModelMax's architecture on this machine, measured in the same run as ModelMax itself.

`python -m bench.floor core PORT UPSTREAM_PORT` is a grpc.aio CompletionService that makes the one upstream call
every gateway must (streamed, over raw keep-alive HTTP/1.1, read whole) and answers from pre-built messages;
`python -m bench.floor bridge PORT CORE_PORT` is uvicorn (uvloop, httptools, as the bridge runs) whose only work
per request is one call to it: no auth, parsing, validation, routing or translation, and fixed bytes out.
Pinned like the gateway, the pair measures what uvicorn, a grpc.aio hop and the upstream call cost by themselves
(including this machine's cross-CPU wake-ups, which the direct baseline does not pay), which is the least any
bridge-and-core design built on them can cost; `make bench` reports it next to each target.

The model name scripts the answer, as in bench/upstream.py: `chunks-N` streams N deltas, `hold` streams one and then
holds the call until the client leaves.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.load import Connection, Samples, chat_request
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc

_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_STOP = pb.FinishReason.FINISH_REASON_STOP
_ANSWER = svc.CreateCompletionResponse(
    model="chunks-1", choices=[svc.Choice(index=0, content="tok ", finish_reason=_STOP)]
)
_HI = pb.Message(role=pb.Role.ROLE_USER, content="hi")  # a valid request, for a real core behind this bridge
_DELTA = svc.StreamCompletionResponse(delta=svc.ContentDelta(text="tok "))
_FINISH = svc.StreamCompletionResponse(
    finish=svc.CompletionFinish(choices=[svc.ChoiceFinish(index=0, finish_reason=_STOP)])
)
_JSON = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","created":0,"model":"chunks-1","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"tok "},"finish_reason":"stop"}]}'
)
_CHUNK = (
    b'data: {"id":"chatcmpl-floor","object":"chat.completion.chunk","created":0,"model":"chunks-20","choices":'
    b'[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
)
_HELD = _CHUNK.replace(b'"tok "', b'"held "')  # what the bench's client waits for before it counts a stream held
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_JSON)).encode())]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _count(model: str) -> int:
    return int(model.removeprefix("chunks-")) if model.startswith("chunks-") else 1


class _Upstream:
    """The cheapest upstream client this bench has: raw keep-alive HTTP/1.1 connections (bench/load.py), each
    sending a fixed streamed request per model and reading the whole answer, as the gateway's core must."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._idle: list[Connection] = []
        self._requests: dict[str, bytes] = {}  # per model, encoded once

    async def call(self, model: str, until_first_event: bool = False) -> Connection:
        """One streamed upstream call; returns its connection (give it back with `done` once finished)."""
        request = self._requests.get(model)
        if request is None:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            request = self._requests[model] = chat_request("127.0.0.1", self._port, "", body)
        connection = self._idle.pop() if self._idle else await Connection.open("127.0.0.1", self._port)
        await connection.exchange(request, Samples(), until_first_event)
        return connection

    def done(self, connection: Connection) -> None:
        self._idle.append(connection)


class FloorServicer(svc_grpc.CompletionServiceServicer):
    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream

    async def CreateCompletion(  # noqa: N802 (gRPC method name)
        self, request: svc.CreateCompletionRequest, context: grpc.aio.ServicerContext
    ) -> svc.CreateCompletionResponse:
        self._upstream.done(await self._upstream.call(request.params.model))
        return _ANSWER

    async def StreamCompletion(  # noqa: N802
        self, request: svc.StreamCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        model = request.params.model
        if model == "hold":
            connection = await self._upstream.call(model, until_first_event=True)
            try:
                yield svc.StreamCompletionResponse(batch=svc.EventBatch(events=[_DELTA]))
                await asyncio.Event().wait()  # until the caller cancels
            finally:
                connection.close()  # the upstream still holds its stream: this connection is not reusable
        self._upstream.done(await self._upstream.call(model))
        # All deltas as one batch, as ModelMax relays the bench upstream's answers (written with one send).
        yield svc.StreamCompletionResponse(batch=svc.EventBatch(events=[_DELTA] * _count(model)))
        yield _FINISH


async def serve_core(port: int, upstream_port: int) -> None:
    server = grpc.aio.server()
    svc_grpc.add_CompletionServiceServicer_to_server(FloorServicer(_Upstream(upstream_port)), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class FloorBridge:
    """An ASGI app whose per-request work is one CreateCompletion or StreamCompletion call, relayed as fixed bytes."""

    def __init__(self, core_target: str) -> None:
        self._core_target = core_target
        self._stub: svc_grpc.CompletionServiceStub | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            self._stub = svc_grpc.CompletionServiceStub(grpc.aio.insecure_channel(self._core_target))
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = (await receive()).get("body", b"")
        if scope["path"] != "/v1/chat/completions":  # /readyz and the like
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        found = _MODEL.search(body)
        params = pb.CompletionParams(model=found.group(1).decode() if found else "chunks-1", messages=[_HI])
        assert self._stub is not None
        if _STREAM.search(body) is None:
            await self._stub.CreateCompletion(svc.CreateCompletionRequest(params=params))
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": _JSON})
            return
        chunk = _HELD if params.model == "hold" else _CHUNK
        call = self._stub.StreamCompletion(svc.StreamCompletionRequest(params=params))
        watcher = asyncio.ensure_future(_client_gone(receive))
        watcher.add_done_callback(lambda gone: gone.cancelled() or call.cancel())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for message in call:
                chunks = chunk * len(message.batch.events) if message.HasField("batch") else chunk
                await send({"type": "http.response.body", "body": chunks, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except asyncio.CancelledError:
            pass  # the client left
        finally:
            watcher.cancel()


async def _client_gone(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def main() -> None:
    import uvicorn
    import uvloop

    role, port = sys.argv[1], int(sys.argv[2])
    if role == "core":
        uvloop.run(serve_core(port, int(sys.argv[3])))
        return
    app = FloorBridge(f"127.0.0.1:{sys.argv[3]}")
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="on")  # fmt: skip


if __name__ == "__main__":
    main()
