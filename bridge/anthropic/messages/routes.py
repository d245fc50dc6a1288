"""POST /v1/messages and /v1/messages/count_tokens: check the version header, parse, then stream (sse.py), answer
one whole Message, or count the prompt's tokens.

`anthropic-version` is required, as Anthropic requires it. `anthropic-beta` names (a comma-separated list; Claude
Code sends half a dozen) are accepted whatever they are: none of ModelMax's providers takes Anthropic beta names,
so there is nothing to forward them to, and refusing names we do not know would break every new client release.
Query strings (Claude Code's `?beta=true`) are ignored.
"""

from __future__ import annotations

import re
import uuid

import grpc
import orjson
from starlette.responses import Response

from bridge.anthropic.errors import AnthropicError, anthropic_limits, from_rpc_error
from bridge.anthropic.messages.request import Parsed, parse_messages_request
from bridge.anthropic.messages.sse import BlockEncoder, relay
from bridge.anthropic.messages.translate import message_json
from bridge.calls import complete, open_stream
from bridge.pipeline import ATTEMPTS, DEPLOYMENT, OVERHEAD, REQUEST_ID, Exchange
from bridge.streaming import SSE_HEADERS, StreamResponse
from modelmax.v1 import completion_service_pb2 as svc

# A version is a date (Claude Code sends 2023-06-01, the Python SDK 2.15 sends 2026-10-21). The Messages shape this
# dialect speaks is the same under every published version, so any date is accepted and anything else refused.
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


async def messages(exchange: Exchange) -> Response:
    seen = exchange.seen
    parsed = _parse(exchange)
    seen.model, seen.stream = parsed.params.model, parsed.stream
    message_id = "msg_" + uuid.uuid4().hex  # the dialect's id, minted here: the core mints none

    def to_error(exc: grpc.aio.AioRpcError) -> AnthropicError:
        return from_rpc_error(exc, parsed.field_names)

    if parsed.stream:
        request = svc.StreamCompletionRequest(params=parsed.params, accept_batches=True)
        started = await open_stream(exchange, request, to_error, _malformed)
        encoder = BlockEncoder(message_id, started.start, parsed.show_thinking)
        headers = {
            **SSE_HEADERS,
            REQUEST_ID: seen.request_id,
            "request-id": seen.request_id,  # where Anthropic's SDKs read a request's id
            DEPLOYMENT: started.start.deployment,
            ATTEMPTS: str(started.start.attempts),
            **anthropic_limits(started.limits),
        }
        return StreamResponse(
            started.call,
            relay(started.call, encoder, seen, exchange.gateway.ping_seconds),
            seen,
            headers,
            started.watcher,
        )
    answer = await complete(exchange, svc.CreateCompletionRequest(params=parsed.params), to_error)
    response = answer.response
    seen.core_overhead_ms = answer.core_overhead_ms
    return Response(
        orjson.dumps(message_json(response, message_id, parsed.show_thinking)),
        media_type="application/json",
        headers={
            REQUEST_ID: seen.request_id,
            "request-id": seen.request_id,
            OVERHEAD: f"{seen.overhead_ms():.3f}",
            DEPLOYMENT: response.deployment,
            ATTEMPTS: str(response.attempts),
            **anthropic_limits(answer.limits),
        },
    )


async def count_tokens(exchange: Exchange) -> Response:
    """The prompt's input tokens as the serving provider counts them (or the core's documented estimate)."""
    parsed = _parse(exchange, count=True)
    exchange.seen.model = parsed.params.model
    gateway = exchange.gateway
    try:
        counted = await gateway.stub.CountTokens(
            svc.CountTokensRequest(params=parsed.params), timeout=gateway.timeout, metadata=exchange.metadata
        )
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, parsed.field_names) from None
    return Response(
        orjson.dumps({"input_tokens": counted.input_tokens}),
        media_type="application/json",
        headers={REQUEST_ID: exchange.seen.request_id, "request-id": exchange.seen.request_id,
                 "x-modelmax-token-count": "estimated" if counted.estimated else "provider"},
    )  # fmt: skip


def _parse(exchange: Exchange, *, count: bool = False) -> Parsed:
    version = exchange.request.headers.get("anthropic-version")
    if version is None:
        raise AnthropicError(400, "anthropic-version: header is required")
    if not _VERSION.fullmatch(version):
        raise AnthropicError(400, f"anthropic-version: '{version}' is not a valid version (such as 2023-06-01)")
    return parse_messages_request(exchange.body, count=count)


def _malformed() -> AnthropicError:
    return AnthropicError(502, "The gateway core sent a malformed stream.", "api_error")
