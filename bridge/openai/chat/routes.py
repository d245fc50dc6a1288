"""POST /v1/chat/completions: parse, translate, then stream (sse.py) or one whole completion as JSON."""

from __future__ import annotations

import time
import uuid

import grpc
import orjson
from starlette.responses import Response

from bridge.openai.chat.request import parse_chat_request
from bridge.openai.chat.sse import open_stream
from bridge.openai.chat.translate import completion_json, to_params
from bridge.openai.errors import from_rpc_error, rate_limit_headers
from bridge.pipeline import ATTEMPTS, DEPLOYMENT, OVERHEAD, REQUEST_ID, Exchange
from bridge.streaming import cancel_when_gone
from modelmax.v1 import completion_service_pb2 as svc


async def chat_completions(exchange: Exchange) -> Response:
    seen = exchange.seen
    chat = parse_chat_request(exchange.body)
    seen.model, seen.stream = chat.model, chat.stream
    params = to_params(chat)
    completion_id = "chatcmpl-" + uuid.uuid4().hex  # the dialect's id, minted here: the core mints none
    if chat.stream:
        request = svc.StreamCompletionRequest(params=params, accept_batches=True)  # see sse._events
        return await open_stream(exchange, request, completion_id)
    gateway = exchange.gateway
    call = gateway.stub.CreateCompletion(
        svc.CreateCompletionRequest(params=params), timeout=gateway.timeout, metadata=exchange.metadata
    )
    watcher = cancel_when_gone(exchange.request.receive, call)
    waiting = time.perf_counter()
    try:
        response = await call
        trailing = await call.trailing_metadata()
        limits = rate_limit_headers(await call.initial_metadata())
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and watcher.done() and not watcher.cancelled():
            seen.finish(499)
            return Response(status_code=499)  # nobody is listening any more
        raise from_rpc_error(exc) from None
    finally:
        seen.core_wait += time.perf_counter() - waiting
        watcher.cancel()
    seen.core_overhead_ms = _core_overhead_ms(trailing)
    return Response(
        orjson.dumps(completion_json(response, completion_id)),  # the hot path's one JSON document: orjson
        media_type="application/json",
        headers={
            REQUEST_ID: seen.request_id,
            OVERHEAD: f"{seen.overhead_ms():.3f}",
            DEPLOYMENT: response.deployment,
            ATTEMPTS: str(response.attempts),
            **limits,
        },
    )  # the pipeline finishes the observation once the reply is sent


def _core_overhead_ms(trailing: grpc.aio.Metadata) -> float | None:
    for key, value in trailing:
        if key == OVERHEAD and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
    return None
