"""A scriptable fake OpenAI-compatible server (chat completions, streamed, and the model list) on real uvicorn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.serve import serve

DEFAULT_USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
# What OpenAI sends in the middle of a stream when it fails there.
SERVER_ERROR = {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One chat completion request as the fake saw it."""

    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names
    client_port: int  # the client's TCP port: equal ports mean a reused connection


@dataclass(frozen=True, slots=True)
class FakeToolCall:
    """A tool call the fake streams: a first delta with id, name and `arguments[0]`, then one delta per later piece."""

    id: str
    name: str
    arguments: tuple[str, ...] = ("",)  # the arguments' JSON text in the pieces it is streamed in


@dataclass
class OpenAIUpstream:
    """The script (set its fields in a test, before the request) and what the fake observed.

    A stream is: a role chunk, one chunk per item of `reasoning_chunks` (`delta.reasoning_content`), one chunk per
    item of `chunks`, the `tool_calls` (each call's pieces in order, calls one after another, as OpenAI streams
    parallel calls), a chunk carrying `finish_reason`, a usage chunk with `choices: []` when the request asked for
    `stream_options.include_usage` (or usage inside the finish chunk when `usage_in_finish_chunk`), then
    `data: [DONE]`. With `choice_chunks`, the content of choices 1, 2, ... follows choice 0's, chunk by chunk
    interleaved, and each choice gets its own finish chunk (`choice_finish_reasons`, else `finish_reason`).
    """

    url: str = ""  # "http://127.0.0.1:PORT/v1", set once serving
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    finish_reason: str | None = "stop"  # None: the finish chunk is left out, [DONE] still sent
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))  # None: never sent
    usage_in_finish_chunk: bool = False  # as Ollama and llama.cpp do; OpenAI and vLLM send it separately
    error_status: int | None = None  # answer this HTTP status with `error_body` instead of a stream
    error_body: dict[str, Any] | None = None  # None: an OpenAI-shaped body for error_status
    error_times: int | None = None  # answer error_status to only this many requests, then serve normally
    retry_after: str | None = None  # the Retry-After header sent with error_status
    hang: bool = False  # accept the request, send the response headers, then never send a byte of the body
    stream_error_after: int | None = None  # send `stream_error` (then [DONE]) after this many content chunks
    stream_error: dict[str, Any] = field(default_factory=lambda: dict(SERVER_ERROR))
    cut_after: int | None = None  # end the body cleanly after this many content chunks: no finish, no [DONE]
    abort_after: int | None = None  # drop the connection mid-body after this many content chunks
    chunk_delay: float = 0.0  # seconds before each content chunk (and before the first one)
    burst: bool = False  # send the whole stream in one write, so that the client reads its events together
    reasoning_chunks: list[str] = field(default_factory=list)  # sent as delta.reasoning_content before the content
    tool_calls: list[FakeToolCall] = field(default_factory=list)  # streamed after the content of choice 0
    tool_call_indexes: list[int] | None = None  # the `index` sent for each call; None: 0, 1, 2...
    choice_chunks: list[list[str]] | None = None  # content of choices 1, 2, ...: at most len(chunks) each
    choice_finish_reasons: list[str] | None = None  # finish reasons of choices 0, 1, ...; None: `finish_reason`
    api_key: str | None = None  # when set, requests without "Authorization: Bearer <api_key>" get a 401
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    requests: list[ReceivedRequest] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # the client left before the stream ended

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "fake"} for name in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def _chat_completions(self, request: Request) -> Response:
        body = await request.json()
        port = request.client.port if request.client else 0
        self.requests.append(ReceivedRequest(body, dict(request.headers), port))
        presented = request.headers.get("authorization", "")
        if self.api_key is not None and presented != f"Bearer {self.api_key}":
            # OpenAI echoes (part of) the presented key back; the gateway must not pass that on.
            message = f"Incorrect API key provided: {presented.removeprefix('Bearer ')}."
            error = {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        if self.error_status is not None and (self.error_times is None or len(self.requests) <= self.error_times):
            error_body = self.error_body or {
                "error": {"message": f"fake upstream error {self.error_status}", "type": "api_error", "code": None}
            }
            headers = {"retry-after": self.retry_after} if self.retry_after is not None else None
            return JSONResponse(error_body, status_code=self.error_status, headers=headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = self._stream(body.get("model", ""), include_usage)
        return StreamingResponse(_joined(stream) if self.burst else stream, media_type="text/event-stream")

    async def _stream(self, model: str, include_usage: bool) -> AsyncIterator[str]:
        ended = False
        try:
            if self.hang:
                await asyncio.Event().wait()  # until the client goes away
            yield _chunk(model, include_usage, {"role": "assistant", "content": ""})
            for thought in self.reasoning_chunks:
                yield _chunk(model, include_usage, {"reasoning_content": thought})
            for sent in range(len(self.chunks) + 1):
                if self.stream_error_after == sent:
                    yield _data(self.stream_error)
                    yield _data("[DONE]")
                    ended = True
                    return
                if self.cut_after == sent:
                    ended = True
                    return
                if self.abort_after == sent:
                    ended = True
                    # uvicorn closes the connection when the app fails after the response started; the body is
                    # left without its last chunk, as when a server process dies mid-answer.
                    raise _Abort("scripted mid-stream abort")
                if sent == len(self.chunks):
                    break
                await asyncio.sleep(self.chunk_delay)
                yield _chunk(model, include_usage, {"content": self.chunks[sent]})
                for index, pieces in enumerate(self.choice_chunks or (), 1):
                    if sent < len(pieces):
                        yield _chunk(model, include_usage, {"content": pieces[sent]}, index=index)
            for position, call in enumerate(self.tool_calls):
                index = position if self.tool_call_indexes is None else self.tool_call_indexes[position]
                first = {"index": index, "id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments[0]}}  # fmt: skip
                yield _chunk(model, include_usage, {"tool_calls": [first]})
                for piece in call.arguments[1:]:
                    yield _chunk(
                        model, include_usage, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                    )
            send_usage = include_usage and self.usage is not None
            if self.finish_reason is not None:
                usage = self.usage if send_usage and self.usage_in_finish_chunk else None
                reasons = self.choice_finish_reasons or [self.finish_reason] * (1 + len(self.choice_chunks or ()))
                for index, reason in enumerate(reasons[1:], 1):
                    yield _chunk(model, include_usage, {}, finish_reason=reason, index=index)
                yield _chunk(model, include_usage, {}, finish_reason=reasons[0], usage=usage)
            if send_usage and not self.usage_in_finish_chunk:
                yield _data({**_envelope(model), "choices": [], "usage": self.usage})
            yield _data("[DONE]")
            ended = True
        finally:
            # Starlette cancels this generator when uvicorn reports http.disconnect mid-stream.
            if not ended:
                self.disconnected.set()


def _chunk(
    model: str,
    include_usage: bool,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    index: int = 0,
) -> str:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    chunk: dict[str, Any] = {**_envelope(model), "choices": [choice]}
    if usage is not None or include_usage:
        chunk["usage"] = usage  # OpenAI sends an explicit null on every chunk but the one carrying usage
    return _data(chunk)


async def _joined(parts: AsyncIterator[str]) -> AsyncIterator[str]:
    """The whole stream as one piece: one body chunk, one socket write."""
    yield "".join([part async for part in parts])


class _Abort(Exception):
    """Raised inside the fake's stream to drop the connection."""


def _envelope(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model}


def _data(payload: object) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


@asynccontextmanager
async def serve_openai_upstream(**script: Any) -> AsyncIterator[OpenAIUpstream]:
    """A fake upstream scripted by `script` (fields of OpenAIUpstream, also settable later), served until exit."""
    upstream = OpenAIUpstream(**script)
    async with serve(upstream.app()) as root:
        upstream.url = f"{root}/v1"
        yield upstream
