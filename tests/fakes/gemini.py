"""A scriptable fake of the Gemini API's generateContent, streamGenerateContent and countTokens, on real uvicorn.

Speaks the wire format google-genai expects (camelCase JSON; `?alt=sse` streams of `data: {json}` events with no
terminator; errors as `{"error": {"code", "message", "status", "details"}}`), and records every request. countTokens
answers `{"totalTokens": N}` with N from `count_tokens` (below), so a test can predict it.
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


@dataclass
class Candidate:
    """The script of one candidate (see GeminiUpstream)."""

    texts: list[str] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)
    function_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = "STOP"
    calls_in_one_chunk: bool = False

    def groups(self) -> list[list[dict[str, Any]]]:
        """The candidate's parts, grouped by the stream chunk that carries them."""
        groups = [[{"text": t, "thought": True}] for t in self.thoughts] + [[{"text": t}] for t in self.texts]
        if self.calls_in_one_chunk and self.function_calls:
            return [*groups, list(self.function_calls)]
        return groups + [[part] for part in self.function_calls]


def count_tokens(body: dict[str, Any]) -> int:
    """The fake's token count of a countTokens body: one token per whitespace-separated word of every string in it
    (a generateContentRequest's contents, systemInstruction and tools, or bare `contents`), the model name aside."""
    request = body.get("generateContentRequest", body)
    counted = {key: value for key, value in request.items() if key != "model"}
    return _words(counted)


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return sum(_words(item) for item in value.values())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    return 0


def _finish(candidate: dict[str, Any], reason: str | None) -> None:
    if reason is not None:
        candidate["finishReason"] = reason


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake saw it."""

    version: str  # "v1beta"
    model: str  # "gemini-3-flash-preview"
    action: str  # "generateContent", "streamGenerateContent" or "countTokens"
    query: str  # "alt=sse" for streams
    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names
    client_port: int  # the client's TCP port: equal ports mean a reused connection


@dataclass
class GeminiUpstream:
    """The script (set its fields in a test, before the request) and what the fake observed.

    A stream sends one chunk per item of `thoughts` (parts with `thought: true`), then one per item of `texts`, then
    one per part of `function_calls` (or all of them in one chunk, `calls_in_one_chunk`); the last of them carries
    `finishReason` and the final `usage`, earlier ones a running usage. Non-streaming answers carry the same parts in
    one candidate. `extra_candidates` script candidates 1, 2, ...: their chunks go alongside candidate 0's (chunk k
    holds the k-th part of every candidate that has one), each candidate's finishReason on its own last chunk.
    """

    url: str = ""  # "http://127.0.0.1:PORT", the SDK's base_url; set once serving
    api_key: str | None = None  # when set, requests without this x-goog-api-key get 400 API_KEY_INVALID
    texts: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    thoughts: list[str] = field(default_factory=list)
    # Whole parts after the texts, such as {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln"}.
    function_calls: list[dict[str, Any]] = field(default_factory=list)
    calls_in_one_chunk: bool = False  # stream every part of `function_calls` in a single chunk (parallel calls)
    finish_reason: str | None = "STOP"  # None: no chunk ever carries a finishReason
    extra_candidates: list[Candidate] = field(default_factory=list)
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
    # As Gemini 3 does (for models named gemini-3*): 400 for a request whose current turn has a model step with an
    # unsigned first functionCall part. The current turn starts at the last user turn that is not only tool results.
    check_thought_signatures: bool = True
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
        if self.check_thought_signatures and model.startswith("gemini-3"):
            unsigned = _unsigned_call(body.get("contents", []))
            if unsigned is not None:
                return JSONResponse(google_error(400, unsigned), status_code=400)
        if self.error_status is not None:
            error = self.error_body or google_error(self.error_status, f"fake upstream error {self.error_status}")
            return JSONResponse(error, status_code=self.error_status)
        if action == "streamGenerateContent":
            return StreamingResponse(self._stream(model), media_type="text/event-stream")
        if action == "countTokens":
            return JSONResponse({"totalTokens": count_tokens(body)})
        if action != "generateContent":
            return JSONResponse(google_error(404, f"unknown action {action!r}"), status_code=404)
        await asyncio.sleep(self.chunk_delay)
        answer = self._answer(model)
        if self.abort_after is not None:
            return StreamingResponse(_cut_json(answer), media_type="application/json")
        return JSONResponse(answer)

    def _candidates(self) -> list[Candidate]:
        main = Candidate(self.texts, self.thoughts, self.function_calls, self.finish_reason, self.calls_in_one_chunk)
        return [main, *self.extra_candidates]

    def _answer(self, model: str) -> dict[str, Any]:
        """The whole non-streaming answer."""
        if self.block_reason is not None:
            return self._blocked(model)
        candidates = []
        for index, script in enumerate(self._candidates()):
            parts = [part for group in script.groups() for part in group]
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": index}
            if script.finish_reason is not None:
                candidate["finishReason"] = script.finish_reason
            candidates.append(candidate)
        return self._response(model, candidates, self.usage)

    def _blocked(self, model: str) -> dict[str, Any]:
        usage = {"promptTokenCount": (self.usage or DEFAULT_USAGE)["promptTokenCount"]}
        usage["totalTokenCount"] = usage["promptTokenCount"]
        feedback = {"blockReason": self.block_reason, "safetyRatings": []}
        return {"promptFeedback": feedback, "usageMetadata": usage, "modelVersion": model, "responseId": "fake-id"}

    def _chunks(self, model: str) -> list[dict[str, Any]]:
        """Every chunk of the stream, in order."""
        if self.block_reason is not None:
            return [self._blocked(model)]
        scripts = self._candidates()
        groups = [script.groups() for script in scripts]
        chunks = []
        prompt = self.usage.get("promptTokenCount", 0) if self.usage is not None else 0
        for index in range(max(len(g) for g in groups)):
            running = {"promptTokenCount": prompt, "candidatesTokenCount": index, "totalTokenCount": prompt + index}
            candidates = []
            for choice, script in enumerate(scripts):
                if index < len(groups[choice]):
                    candidate = {"content": {"parts": groups[choice][index], "role": "model"}, "index": choice}
                    if index == len(groups[choice]) - 1 and not self.final_chunk_without_parts:
                        _finish(candidate, script.finish_reason)
                    candidates.append(candidate)
            chunks.append(self._response(model, candidates, running if self.usage is not None else None))
        for choice, script in enumerate(scripts):
            if chunks and not groups[choice] and not self.final_chunk_without_parts:  # a candidate without parts
                ended = {"content": {"role": "model"}, "index": choice}
                _finish(ended, script.finish_reason)
                chunks[-1]["candidates"].append(ended)
        if self.final_chunk_without_parts or not chunks:
            last = [{"content": {"role": "model"}, "index": choice} for choice in range(len(scripts))]
            for candidate, script in zip(last, scripts, strict=True):
                _finish(candidate, script.finish_reason)
            chunks.append(self._response(model, last, None))
        if self.usage is not None:
            chunks[-1]["usageMetadata"] = self.usage
        else:
            chunks[-1].pop("usageMetadata", None)
        return chunks

    def _response(self, model: str, candidates: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        response: dict[str, Any] = {"candidates": candidates, "modelVersion": model, "responseId": "fake-id"}
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
                    for candidate in chunk.get("candidates", []):
                        candidate.pop("finishReason", None)
                yield self._event(chunk)
            ended = True
        finally:
            # Starlette cancels this generator when uvicorn reports http.disconnect mid-stream.
            if not ended:
                self.disconnected.set()

    def _event(self, payload: dict[str, Any]) -> str:
        return "data: " + json.dumps(payload, separators=(",", ":")) + self.separator


def _unsigned_call(contents: list[dict[str, Any]]) -> str | None:
    """Gemini 3's complaint about the current turn's first unsigned step, or None when every step is signed."""
    starts = [i for i, c in enumerate(contents) if c.get("role") == "user" and _not_only_tool_results(c)]
    for position in range(starts[-1] + 1 if starts else 0, len(contents)):
        content = contents[position]
        calls = [part for part in content.get("parts", []) if "functionCall" in part]
        if content.get("role") == "model" and calls and "thoughtSignature" not in calls[0]:
            return (
                "Function call is missing a thought_signature in functionCall parts. This is required for tools to "
                "work correctly, and missing thought_signature may lead to degraded model performance. Additional "
                f"data, function call `{calls[0]['functionCall'].get('name')}` , position {position + 1}."
            )
    return None


def _not_only_tool_results(content: dict[str, Any]) -> bool:
    return any("functionResponse" not in part for part in content.get("parts", []))


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
