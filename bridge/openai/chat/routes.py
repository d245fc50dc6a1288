"""POST /v1/chat/completions: parse, translate, then stream (sse.py) or one whole completion as JSON."""

from __future__ import annotations

import uuid

import orjson
from starlette.responses import Response

from bridge.calls import complete
from bridge.openai.chat.request import parse_chat_request
from bridge.openai.chat.sse import open_stream
from bridge.openai.chat.translate import completion_json, to_params
from bridge.openai.errors import from_rpc_error
from bridge.pipeline import ATTEMPTS, DEPLOYMENT, OVERHEAD, REQUEST_ID, Exchange
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
    answer = await complete(exchange, svc.CreateCompletionRequest(params=params), from_rpc_error)
    response = answer.response
    seen.core_overhead_ms = answer.core_overhead_ms
    return Response(
        orjson.dumps(completion_json(response, completion_id)),  # the hot path's one JSON document: orjson
        media_type="application/json",
        headers={
            REQUEST_ID: seen.request_id,
            OVERHEAD: f"{seen.overhead_ms():.3f}",
            DEPLOYMENT: response.deployment,
            ATTEMPTS: str(response.attempts),
            **answer.limits,
        },
    )  # the pipeline finishes the observation once the reply is sent
