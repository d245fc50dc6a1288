"""The OpenAI chat stream: one StreamCompletion call relayed as `chat.completion.chunk` SSE events.

Errors before the first byte are HTTP statuses; later ones are an error event, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from bridge import calls
from bridge.metrics import Observation
from bridge.openai.chat.translate import FINISH_REASON, usage_json
from bridge.openai.errors import OpenAIError, from_rpc_error
from bridge.pipeline import ATTEMPTS, DEPLOYMENT, REQUEST_ID, Exchange
from bridge.streaming import SSE_HEADERS, StreamResponse
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


async def open_stream(exchange: Exchange, request: svc.StreamCompletionRequest, completion_id: str) -> StreamResponse:
    """Start the call and wait for its first event, so a failure to start is a real HTTP status, not a 200."""
    started = await calls.open_stream(exchange, request, from_rpc_error, _malformed)
    start, seen = started.start, exchange.seen
    params = request.params
    encoder = ChunkEncoder(completion_id, start, params.include_usage, params.choice_count)  # 0 (unset): 1
    headers = {
        **SSE_HEADERS,
        REQUEST_ID: seen.request_id,
        DEPLOYMENT: start.deployment,
        ATTEMPTS: str(start.attempts),
        **started.limits,
    }
    return StreamResponse(started.call, _events(started.call, encoder, seen), seen, headers, started.watcher)


def _malformed() -> OpenAIError:
    return OpenAIError(502, "The gateway core sent a malformed stream.", "api_error", None, "internal_error")


async def _events(call: calls.Events, encoder: ChunkEncoder, seen: Observation) -> AsyncGenerator[bytes, None]:
    """Role chunk(s), content, reasoning and tool-call chunks, the finish chunk(s), the usage chunk when asked, [DONE].

    With several choices, every delta carries its choice's index; each choice has its own role and finish chunk.
    A `batch` event from the core becomes the same chunks its events would have, written with one ASGI send.
    If the client disconnects, StreamResponse cancels the gRPC call (reads then raise CancelledError) and the core
    cancels the provider. A failure mid-stream ends with an error event, never with an invented finish_reason.
    """
    finished = False
    try:
        yield encoder.role()
        while True:
            waiting = time.perf_counter()
            event = await call.read()
            seen.core_wait += time.perf_counter() - waiting
            if event is calls.EOF:
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
    if kind == "reasoning":  # a signature or redacted block alone has no text for OpenAI's reasoning_content
        reasoning = event.reasoning
        return encoder.reasoning(reasoning.text, reasoning.choice_index) if reasoning.text else b""
    return b""


class ChunkEncoder:
    """Encodes one stream's `chat.completion.chunk` events as SSE bytes.

    The bytes shared by every chunk of a choice (id, created, model, the choice's index) are serialised once per
    stream, so each token costs one JSON-encoded string and a few concatenations. With several choices (`n`), each
    choice has its own role chunk first and its own finish chunk last, as OpenAI streams them.
    """

    def __init__(self, completion_id: str, start: svc.CompletionStart, include_usage: bool, choices: int = 1) -> None:
        """`completion_id` is on every chunk; `choices` is the request's choice_count, 0 (unset) meaning one."""
        head = _dumps({"id": completion_id, "object": "chat.completion.chunk", "created": start.created,
                       "model": start.model, "system_fingerprint": None})  # fmt: skip
        self._head = head[:-1]  # without the closing brace
        self._usage_null = ',"usage":null' if include_usage else ""
        self._tail = self._ending("null")
        self._opening = [self._open(index) for index in range(max(1, choices))]

    def _open(self, index: int) -> str:
        return f'data: {self._head},"choices":[{{"index":{index},"delta":'

    def _ending(self, finish_reason: str) -> str:
        return f',"logprobs":null,"finish_reason":{finish_reason}}}]{self._usage_null}}}\n\n'

    def _delta(self, choice: int, delta: str) -> bytes:
        opening = self._opening[choice] if 0 <= choice < len(self._opening) else self._open(choice)
        return (opening + delta + self._tail).encode()

    def role(self) -> bytes:
        """The first chunk of every choice."""
        return b"".join(self._delta(index, '{"role":"assistant","content":""}') for index in range(len(self._opening)))

    def content(self, text: str, choice: int = 0) -> bytes:
        return self._delta(choice, '{"content":' + _dumps(text) + "}")

    def reasoning(self, text: str, choice: int = 0) -> bytes:
        return self._delta(choice, '{"reasoning_content":' + _dumps(text) + "}")

    def tool_call(self, delta: svc.ToolCallDelta) -> bytes:
        """A piece of a tool call: the first names the call (id, type, name), later ones only add arguments."""
        if delta.id or delta.name:
            call = (f'{{"index":{delta.index},"id":{_dumps(delta.id)},"type":"function","function":'
                    f'{{"name":{_dumps(delta.name)},"arguments":{_dumps(delta.arguments)}}}}}')  # fmt: skip
        else:
            call = f'{{"index":{delta.index},"function":{{"arguments":{_dumps(delta.arguments)}}}}}'
        return self._delta(delta.choice_index, '{"tool_calls":[' + call + "]}")

    def finish(self, finish: svc.CompletionFinish) -> bytes:
        """The last chunk of every choice, in the core's order (0, 1, ...)."""
        choices = finish.choices
        if len(choices) == 1:  # the usual case
            return self._finish(choices[0].index, choices[0].finish_reason)
        return b"".join(self._finish(choice.index, choice.finish_reason) for choice in choices)

    def _finish(self, choice: int, reason: int) -> bytes:
        opening = self._opening[choice] if 0 <= choice < len(self._opening) else self._open(choice)
        return (opening + "{}" + self._ending(f'"{FINISH_REASON[reason]}"')).encode()

    def usage(self, usage: pb.Usage) -> bytes:
        return f'data: {self._head},"choices":[],"usage":{_dumps(usage_json(usage))}}}\n\n'.encode()


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode() + b"\n\n"
