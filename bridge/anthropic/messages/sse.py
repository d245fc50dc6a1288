"""The Messages stream: one StreamCompletion call relayed as Anthropic's SSE events.

`message_start` (the message with no content yet) and a `ping`, then for each content block `content_block_start`,
its deltas (`text_delta`, `thinking_delta`, `signature_delta`, `input_json_delta`) and `content_block_stop`, then
`message_delta` (stop reason, cumulative usage) and `message_stop`. Every event has an `event:` line: Anthropic's
SDKs skip data without one. While the core is silent for MODELMAX_BRIDGE_PING_SECONDS (a model thinking before it
answers), a `ping` keeps proxies from closing the connection.

Usage is known only when the core's stream finishes, so `message_start` carries zeros and `message_delta` the real
counts, input included (Anthropic's SDKs take every count of `message_delta` as the cumulative total). A failure
after the start is an `event: error`, and the stream ends there: never a made-up `end_turn`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from bridge import calls
from bridge.anthropic.errors import AnthropicError, from_rpc_error
from bridge.anthropic.messages.translate import redacted_data, stop_of, usage_json
from bridge.metrics import Observation
from modelmax.v1 import completion_service_pb2 as svc

log = logging.getLogger(__name__)

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {_dumps(payload)}\n\n".encode()


def error_event(error: AnthropicError) -> bytes:
    return event("error", error.body())


class BlockEncoder:
    """Turns the core's events into content-block events, opening and closing blocks as the kind changes."""

    def __init__(self, message_id: str, start: svc.CompletionStart, show_thinking: bool) -> None:
        self.message_id, self.start, self.show_thinking = message_id, start, show_thinking
        self.index = -1  # the open block's index
        self.open: str | None = None  # its type: "text", "thinking" or "tool_use"
        self.tool_blocks: dict[int, int] = {}  # the core's tool-call index -> its block index

    def message_start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.message_id, "type": "message", "role": "assistant", "model": self.start.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": None,
                      "cache_read_input_tokens": None},
        }  # fmt: skip
        return event("message_start", {"type": "message_start", "message": message}) + PING

    def _begin(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                   "content_block": block})  # fmt: skip

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def text(self, text: str) -> bytes:
        out = b"" if self.open == "text" else self._begin("text", {"type": "text", "text": ""})
        return out + self._delta(self.index, {"type": "text_delta", "text": text})

    def reasoning(self, reasoning: svc.ReasoningDelta) -> bytes:
        if reasoning.redacted:
            out = self._begin("redacted_thinking", {"type": "redacted_thinking",
                                                    "data": redacted_data(reasoning.redacted)})  # fmt: skip
            return out + self._close()
        out = b""
        if self.open != "thinking":
            out = self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if reasoning.text and self.show_thinking:
            out += self._delta(self.index, {"type": "thinking_delta", "thinking": reasoning.text})
        if reasoning.signature:  # the signature ends its block
            out += self._delta(self.index, {"type": "signature_delta", "signature": reasoning.signature})
            out += self._close()
        return out

    def tool_call(self, call: svc.ToolCallDelta) -> bytes:
        out = b""
        index = self.tool_blocks.get(call.index)
        if index is None:
            out = self._begin("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
            index = self.tool_blocks[call.index] = self.index
        if call.arguments:
            out += self._delta(index, {"type": "input_json_delta", "partial_json": call.arguments})
        return out

    def finish(self, finish: svc.CompletionFinish) -> bytes:
        if not finish.choices:
            raise AnthropicError(502, "The model's answer ended without a stop reason.", "api_error")
        choice = finish.choices[0]
        stop_reason, stop_sequence = stop_of(choice.finish_reason, choice.stop_sequence)
        usage = usage_json(finish.usage)
        return (
            self._close()
            + event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                      "usage": usage})
            + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )  # fmt: skip

    def encode(self, event: svc.StreamCompletionResponse, kind: str | None) -> bytes:
        if kind == "delta":
            return self.text(event.delta.text) if event.delta.text else b""
        if kind == "reasoning":
            return self.reasoning(event.reasoning)
        if kind == "tool_call":
            return self.tool_call(event.tool_call)
        return b""


async def relay(
    call: calls.Events, encoder: BlockEncoder, seen: Observation, ping_seconds: float
) -> AsyncGenerator[bytes, None]:
    """The stream's events as SSE bytes; see the module docstring. A client that leaves cancels the call
    (StreamResponse), and the core cancels the provider."""
    finished = False
    pending: asyncio.Future[svc.StreamCompletionResponse] | None = None
    try:
        yield encoder.message_start()
        while True:
            waiting = time.perf_counter()
            pending = pending or asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait((pending,), timeout=ping_seconds)
            seen.core_wait += time.perf_counter() - waiting
            if not done:
                yield PING  # the read stays pending: the next turn waits on it again
                continue
            message, pending = pending.result(), None
            if message is calls.EOF:
                break
            kind = message.WhichOneof("event")
            if kind == "finish":  # then read on to the end: the core's call completes (and meters) on its own
                finished = True
                yield encoder.finish(message.finish)
                continue
            if kind == "batch":  # events the core had ready together: their blocks in order, in one send
                yield b"".join(encoder.encode(inner, inner.WhichOneof("event")) for inner in message.batch.events)
            else:
                chunk = encoder.encode(message, kind)
                if chunk:
                    yield chunk
        if not finished:
            log.error("core stream ended without a finish event")
            seen.stream_status = 502
            yield error_event(AnthropicError(502, "The stream ended unexpectedly.", "api_error"))
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        seen.stream_status = error.status  # the status this error would have had before the first byte
        yield error_event(error)
    except AnthropicError as error:  # an answer this dialect cannot express (a finish without a reason)
        seen.stream_status = error.status
        yield error_event(error)
    finally:
        if pending is not None:
            pending.cancel()
        call.cancel()  # no-op once the call is done; otherwise carries a client disconnect into the core
