"""A scriptable fake of the Gemini API's generateContent and streamGenerateContent, on real uvicorn.

Speaks the wire format google-genai expects (camelCase JSON; `?alt=sse` streams of `data: {json}` events with no
terminator; errors as `{"error": {"code", "message", "status", "details"}}`), and records every request.
"""

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

DEFAULT_USAGE = {"promptTokenCount": 7, "candidatesTokenCount": 4, "totalTokenCount": 11}
# Google's canonical status name for each HTTP status the Gemini API answers with.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def google_error(code: int, message: str, status: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """An error body in Google's shape; `reason` adds the google.rpc.ErrorInfo detail the live API sends."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status or STATUS_NAMES.get(code, "UNKNOWN")}
    if reason is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com"}
        ]
    return {"error": error}


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake saw it."""

    version: str  # "v1beta"
    model: str  # "gemini-3-flash-preview"
    action: str  # "generateContent" or "streamGenerateContent"
    query: str  # "alt=sse" for streams
    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names
    client_port: int  # the client's TCP port: equal ports mean a reused connection


@dataclass
class GeminiUpstream:
    """The script (set its fields in a test, before the request) and what the fake observed.

    A stream sends one chunk per item of `thoughts` (parts with `thought: true`), then one per item of `texts`; the
    last of them carries `finishReason` and the final `usage`, earlier ones a running usage. Non-streaming answers
    carry the same parts in one candidate.
    """

    url: str = ""  # "http://127.0.0.1:PORT", the SDK's base_url; set once serving
    api_key: str | None = None  # when set, requests without this x-goog-api-key get 400 API_KEY_INVALID
    texts: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    thoughts: list[str] = field(default_factory=list)
    function_call: dict[str, Any] | None = None  # a functionCall part appended to the answer
    finish_reason: str | None = "STOP"  # None: no chunk ever carries a finishReason
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))  # None: never sent
    final_chunk_without_parts: bool = False  # finishReason and usage in one more chunk: {"role": "model"}, no parts
    block_reason: str | None = None  # answer with promptFeedback.blockReason and no candidates
    error_status: int | None = None  # answer this HTTP status with `error_body` instead
    error_body: dict[str, Any] | None = None  # None: google_error(error_status, ...)
    stream_error_after: int | None = None  # in a stream, send `data: {error}` after this many chunks, then end
    stream_error: dict[str, Any] = field(default_factory=lambda: google_error(500, "An internal error has occurred."))
    cut_after: int | None = None  # end the body cleanly after this many chunks: no finishReason
    abort_after: int | None = None  # drop the connection after this many chunks (or mid-body, non-streaming)
    chunk_delay: float = 0.0  # seconds before each chunk (before the whole answer, non-streaming)
    separator: str = "\r\n\r\n"  # what ends each SSE event; the live API uses CRLF
    requests: list[ReceivedRequest] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # the client left before the stream ended

    def app(self) -> Starlette:
        # One route for both actions: the model and the action share a path segment ("models/m:generateContent").
        return Starlette(routes=[Route("/{version}/models/{rest:path}", self._models, methods=["POST"])])

    async def _models(self, request: Request) -> Response:
        model, _, action = request.path_params["rest"].rpartition(":")
        body = await request.json()
        version, port = request.path_params["version"], request.client.port if request.client else 0
        self.requests.append(
            ReceivedRequest(version, model, action, request.url.query, body, dict(request.headers), port)
        )
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            error = google_error(400, "API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID")
            return JSONResponse(error, status_code=400)
        if self.error_status is not None:
            error = self.error_body or google_error(self.error_status, f"fake upstream error {self.error_status}")
            return JSONResponse(error, status_code=self.error_status)
        if action == "streamGenerateContent":
            return StreamingResponse(self._stream(model), media_type="text/event-stream")
        if action != "generateContent":
            return JSONResponse(google_error(404, f"unknown action {action!r}"), status_code=404)
        await asyncio.sleep(self.chunk_delay)
        answer = self._answer(model)
        if self.abort_after is not None:
            return StreamingResponse(_cut_json(answer), media_type="application/json")
        return JSONResponse(answer)

    def _answer(self, model: str) -> dict[str, Any]:
        """The whole non-streaming answer."""
        if self.block_reason is not None:
            return self._blocked(model)
        parts = [{"text": t, "thought": True} for t in self.thoughts] + [{"text": t} for t in self.texts]
        if self.function_call is not None:
            parts.append({"functionCall": self.function_call})
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if self.finish_reason is not None:
            candidate["finishReason"] = self.finish_reason
        return self._response(model, candidate, self.usage)

    def _blocked(self, model: str) -> dict[str, Any]:
        usage = {"promptTokenCount": (self.usage or DEFAULT_USAGE)["promptTokenCount"]}
        usage["totalTokenCount"] = usage["promptTokenCount"]
        feedback = {"blockReason": self.block_reason, "safetyRatings": []}
        return {"promptFeedback": feedback, "usageMetadata": usage, "modelVersion": model, "responseId": "fake-id"}

    def _chunks(self, model: str) -> list[dict[str, Any]]:
        """Every chunk of the stream, in order."""
        if self.block_reason is not None:
            return [self._blocked(model)]
        parts = [{"text": t, "thought": True} for t in self.thoughts] + [{"text": t} for t in self.texts]
        if self.function_call is not None:
            parts.append({"functionCall": self.function_call})
        chunks = []
        prompt = self.usage.get("promptTokenCount", 0) if self.usage is not None else 0
        for index, part in enumerate(parts):
            running = {"promptTokenCount": prompt, "candidatesTokenCount": index, "totalTokenCount": prompt + index}
            candidate = {"content": {"parts": [part], "role": "model"}, "index": 0}
            chunks.append(self._response(model, candidate, running if self.usage is not None else None))
        last: dict[str, Any] = {"content": {"role": "model"}, "index": 0}
        if self.final_chunk_without_parts or not chunks:
            chunks.append(self._response(model, last, None))
        last = chunks[-1]["candidates"][0]
        if self.finish_reason is not None:
            last["finishReason"] = self.finish_reason
        if self.usage is not None:
            chunks[-1]["usageMetadata"] = self.usage
        else:
            chunks[-1].pop("usageMetadata", None)
        return chunks

    def _response(self, model: str, candidate: dict[str, Any], usage: dict[str, int] | None) -> dict[str, Any]:
        response: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": "fake-id"}
        if usage is not None:
            response["usageMetadata"] = usage
        return response

    async def _stream(self, model: str) -> AsyncIterator[str]:
        ended = False
        try:
            chunks = self._chunks(model)
            for sent in range(len(chunks) + 1):
                if self.stream_error_after == sent:
                    yield self._event(self.stream_error)
                    ended = True
                    return
                if self.cut_after == sent:
                    ended = True
                    return
                if self.abort_after == sent:
                    ended = True
                    # uvicorn closes the connection when the app fails after the response started: the chunked
                    # body is left without its end, as when a server dies mid-answer.
                    raise _Abort("scripted mid-stream abort")
                if sent == len(chunks):
                    break
                await asyncio.sleep(self.chunk_delay)
                chunk = chunks[sent]
                if self.cut_after is not None or self.abort_after is not None:
                    chunk.get("candidates", [{}])[0].pop("finishReason", None)
                yield self._event(chunk)
            ended = True
        finally:
            # Starlette cancels this generator when uvicorn reports http.disconnect mid-stream.
            if not ended:
                self.disconnected.set()

    def _event(self, payload: dict[str, Any]) -> str:
        return "data: " + json.dumps(payload, separators=(",", ":")) + self.separator


async def _cut_json(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    text = json.dumps(answer).encode()
    yield text[: len(text) // 2]
    raise _Abort("scripted mid-body abort")


class _Abort(Exception):
    """Raised inside the fake's response body to drop the connection."""


@asynccontextmanager
async def serve_gemini(**script: Any) -> AsyncIterator[GeminiUpstream]:
    """A fake Gemini API scripted by `script` (fields of GeminiUpstream, also settable later), served until exit."""
    upstream = GeminiUpstream(**script)
    async with serve(upstream.app()) as root:
        upstream.url = root
        yield upstream
