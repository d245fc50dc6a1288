"""A scriptable fake AWS Bedrock Runtime (Converse and ConverseStream) on real uvicorn.

ConverseStream answers in the real AWS binary event-stream framing (botocore only ships the decoder, so the encoder
lives here); HTTP errors carry `x-amzn-ErrorType` the way the live service sends them, so botocore resolves the same
error codes it would in production. The fake checks no signature: botocore signs locally with any credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.serve import serve

DEFAULT_USAGE = {"inputTokens": 7, "outputTokens": 4, "totalTokens": 11}
ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# Padding the live service adds to event payloads so their sizes do not reveal the text (botocore drops it).
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"


def frame(name: str, payload: dict[str, Any], *, kind: str = "event") -> bytes:
    """Encode one AWS event-stream message.

    `kind` "event" and "exception" name the shape in `:event-type` / `:exception-type` and carry `payload` as JSON;
    "error" (the generic form) puts `name` in `:error-code` and `payload["message"]` in `:error-message`, no body.
    """
    if kind == "error":
        pairs = [(":error-code", name), (":error-message", str(payload.get("message", ""))), (":message-type", kind)]
        body = b""
    else:
        type_key = ":event-type" if kind == "event" else ":exception-type"
        pairs = [(type_key, name), (":content-type", "application/json"), (":message-type", kind)]
        body = json.dumps(payload).encode()
    headers = b"".join(_header(key, value) for key, value in pairs)
    prelude = struct.pack("!II", 16 + len(headers) + len(body), len(headers))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + body
    return message + struct.pack("!I", zlib.crc32(message))


def _header(name: str, value: str) -> bytes:
    """One string header (value type 7): u8 name length, name, 7, u16 value length, value."""
    n, v = name.encode(), value.encode()
    return struct.pack("!B", len(n)) + n + b"\x07" + struct.pack("!H", len(v)) + v


def use_fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy static AWS credentials and nothing else from the chain: no files, no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-key-never-logged")
    isolate_aws_config(monkeypatch, tmp_path)


def isolate_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point botocore's shared files at paths that do not exist and switch off the EC2 metadata lookup."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One Converse or ConverseStream request as the fake saw it."""

    model_id: str  # decoded from the path: "deepseek.v3.2", or an ARN with its "/" and ":"
    operation: str  # "converse" or "converse-stream"
    body: dict[str, Any]  # the JSON exactly as sent: image bytes are base64 text here
    headers: dict[str, str]  # lower-case names
    client_port: int  # the client's TCP port: equal ports mean a reused connection
    images: list[bytes] = field(default_factory=list)  # every image block's bytes, decoded, in request order


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One tool call the fake model makes: a toolUse block, or streamed, a contentBlockStart and input pieces."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    pieces: list[str] | None = None  # the streamed input JSON text; None: json.dumps(input) cut in two

    def stream_pieces(self) -> list[str]:
        if self.pieces is not None:
            return list(self.pieces)
        text = json.dumps(self.input)
        return [text[: len(text) // 2], text[len(text) // 2 :]]


def answer_events(text: list[str], tool_uses: list[ToolUse], index: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """A stream's text block (one delta per piece; left out when empty and there are tool uses), then one block per
    tool use (contentBlockStart with its id and name, one delta per input piece), from block `index` on."""
    events: list[tuple[str, dict[str, Any]]] = []
    if text or not tool_uses:
        for piece in text:
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": piece}}))
        events.append(("contentBlockStop", {"contentBlockIndex": index}))
        index += 1
    for tool in tool_uses:
        start = {"toolUse": {"toolUseId": tool.tool_use_id, "name": tool.name}}
        events.append(("contentBlockStart", {"contentBlockIndex": index, "start": start}))
        for piece in tool.stream_pieces():
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}))
        events.append(("contentBlockStop", {"contentBlockIndex": index}))
        index += 1
    return events


def _images(value: Any) -> list[bytes]:
    """The decoded bytes of every image block in a request body (in messages and tool results), in order."""
    if isinstance(value, list):
        return [image for item in value for image in _images(item)]
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("image"), dict) and "bytes" in value["image"].get("source", {}):
        return [base64.b64decode(value["image"]["source"]["bytes"], validate=True)]
    return [image for item in value.values() for image in _images(item)]


@dataclass
class BedrockUpstream:
    """The script (set its fields in a test, before the request) and what the fake observed.

    A stream is: messageStart; when `reasoning` is set, a reasoning content block (one reasoningContent delta per
    piece, then a `reasoning_signature` delta when set) and its contentBlockStop; when `reasoning_redacted` is set, a
    block of one redactedContent delta (base64 on the wire, as for any blob) and its contentBlockStop; a text block
    (one text delta per item of `text`) and its contentBlockStop, left out when `text` is empty and there are
    `tool_uses`; per tool use, a block of its own: contentBlockStart (id and name), one toolUse delta per input
    piece, contentBlockStop; messageStop with `stop_reason`; metadata with `usage`. Converse answers the same script
    as one message.
    `events`, when set, replaces the generated event list entirely.
    """

    url: str = ""  # "http://127.0.0.1:PORT", set once serving
    text: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    reasoning: list[str] = field(default_factory=list)
    reasoning_signature: str | None = None  # a final reasoningContent delta carrying only a signature
    reasoning_redacted: bytes | None = None  # a redacted reasoning block, after the reasoning text's block
    tool_uses: list[ToolUse] = field(default_factory=list)  # tool calls, after the text (stop_reason: set it too)
    stop_reason: str = "end_turn"
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))  # None: no usage / metadata
    send_message_stop: bool = True  # False: the stream ends without messageStop (metadata still follows)
    padding: bool = True  # the live service's random "p" field on every event payload
    events: list[tuple[str, dict[str, Any]]] | None = None  # (event type, payload): replaces the script above
    # Failures before the stream: `error_status` with `x-amzn-ErrorType: <error_type>:...` and {"message": ...}.
    error_status: int | None = None
    error_type: str = "ThrottlingException"  # "": no x-amzn-ErrorType header (a proxy's error, say)
    error_message: str = "Too many requests, please wait before trying again."
    error_headers: dict[str, str] = field(default_factory=dict)  # extra headers, such as Retry-After
    error_count: int | None = None  # how many requests get the error before the script resumes; None: all
    response_delay: float = 0.0  # seconds before the response starts (status and headers)
    # Failures inside a stream, after this many content deltas (reasoning and text together):
    stream_error_after: int | None = None  # an exception frame, `stream_error_type` (lower-camel on the wire)
    stream_error_type: str = "throttlingException"
    stream_error_kind: str = "exception"  # or "error": the generic frame with `:error-code` (see `frame`)
    stream_error_message: str = "Too many tokens, please wait before trying again."
    cut_after: int | None = None  # end the body cleanly: no messageStop, no metadata
    abort_after: int | None = None  # drop the connection mid-body
    chunk_delay: float = 0.0  # seconds before each content delta
    write_size: int | None = None  # split the body into writes of this many bytes (frames across TCP reads)
    request_id: str = "11111111-2222-3333-4444-555555555555"
    requests: list[ReceivedRequest] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # the client left before the stream ended
    open_streams: int = 0  # stream bodies being sent right now
    peak_open_streams: int = 0  # the most at once, since the fake started

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/model/{model_id:path}/converse", self._converse, methods=["POST"]),
                Route("/model/{model_id:path}/converse-stream", self._converse_stream, methods=["POST"]),
            ]
        )

    async def _record(self, request: Request, operation: str) -> Response | None:
        """Record the request; the scripted HTTP error to answer instead, if any."""
        port = request.client.port if request.client else 0
        body = await request.json()
        self.requests.append(
            ReceivedRequest(
                request.path_params["model_id"], operation, body, dict(request.headers), port, _images(body)
            )
        )
        await asyncio.sleep(self.response_delay)
        if self.error_status is None or self.error_count == 0:
            return None
        if self.error_count is not None:
            self.error_count -= 1
        headers = {"x-amzn-RequestId": self.request_id, **self.error_headers}
        if self.error_type:
            headers["x-amzn-ErrorType"] = f"{self.error_type}:{ERROR_NAMESPACE}"
        return JSONResponse({"message": self.error_message}, status_code=self.error_status, headers=headers)

    async def _converse(self, request: Request) -> Response:
        error = await self._record(request, "converse")
        if error is not None:
            return error
        content: list[dict[str, Any]] = []
        if self.reasoning:
            reasoning_text: dict[str, Any] = {"text": "".join(self.reasoning)}
            if self.reasoning_signature is not None:
                reasoning_text["signature"] = self.reasoning_signature
            content.append({"reasoningContent": {"reasoningText": reasoning_text}})
        if self.reasoning_redacted is not None:
            content.append({"reasoningContent": {"redactedContent": _blob(self.reasoning_redacted)}})
        if self.text:
            content.append({"text": "".join(self.text)})
        for tool in self.tool_uses:
            content.append({"toolUse": {"toolUseId": tool.tool_use_id, "name": tool.name, "input": tool.input}})
        answer: dict[str, Any] = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": self.stop_reason,
            "metrics": {"latencyMs": 42},
        }
        if self.usage is not None:
            answer["usage"] = self.usage
        return JSONResponse(answer, headers={"x-amzn-RequestId": self.request_id})

    async def _converse_stream(self, request: Request) -> Response:
        error = await self._record(request, "converse-stream")
        if error is not None:
            return error
        headers = {"x-amzn-RequestId": self.request_id}
        return StreamingResponse(self._body(), media_type=EVENT_STREAM, headers=headers)

    def script(self) -> list[tuple[str, dict[str, Any]]]:
        """The events of one stream, in order, before faults are applied."""
        if self.events is not None:
            return list(self.events)
        events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
        index = 0
        if self.reasoning:
            for piece in self.reasoning:
                delta = {"reasoningContent": {"text": piece}}
                events.append(("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}))
            if self.reasoning_signature is not None:
                delta = {"reasoningContent": {"signature": self.reasoning_signature}}
                events.append(("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}))
            events.append(("contentBlockStop", {"contentBlockIndex": 0}))
            index = 1
        if self.reasoning_redacted is not None:
            delta = {"reasoningContent": {"redactedContent": _blob(self.reasoning_redacted)}}
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
            events.append(("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        events += answer_events(self.text, self.tool_uses, index)
        if self.send_message_stop:
            events.append(("messageStop", {"stopReason": self.stop_reason}))
        if self.usage is not None:
            events.append(("metadata", {"usage": self.usage, "metrics": {"latencyMs": 42}}))
        return events

    async def _body(self) -> AsyncIterator[bytes]:
        events = self.script()
        faults = (("error", self.stream_error_after), ("cut", self.cut_after), ("abort", self.abort_after))
        at = {_position_after(events, after): kind for kind, after in faults if after is not None}
        ended = False
        self.open_streams += 1
        self.peak_open_streams = max(self.peak_open_streams, self.open_streams)
        try:
            deltas = 0
            for position, (name, payload) in enumerate([*events, ("", {})]):
                fault = at.get(position)
                if fault == "error":
                    message = {"message": self.stream_error_message}
                    yield frame(self.stream_error_type, message, kind=self.stream_error_kind)
                if fault in ("error", "cut"):
                    ended = True
                    return
                if fault == "abort":
                    ended = True
                    # uvicorn closes the connection when the app fails after the response started: the chunked
                    # body is left without its last chunk, as when a server dies mid-answer.
                    raise _Abort("scripted mid-stream abort")
                if not name:  # the end marker
                    break
                if name == "contentBlockDelta":
                    await asyncio.sleep(self.chunk_delay)
                    deltas += 1
                if self.padding:
                    payload = {**payload, "p": PADDING[: 1 + deltas % len(PADDING)]}
                data = frame(name, payload)
                size = self.write_size or len(data)
                for start in range(0, len(data), size):
                    yield data[start : start + size]
            ended = True
        finally:
            self.open_streams -= 1
            # Starlette cancels this generator when uvicorn reports http.disconnect mid-stream.
            if not ended:
                self.disconnected.set()


def _blob(data: bytes) -> str:
    """A blob as AWS JSON carries it (botocore decodes it back to bytes)."""
    return base64.b64encode(data).decode("ascii")


def _position_after(events: list[tuple[str, dict[str, Any]]], deltas: int) -> int:
    """Where a fault "after `deltas` content deltas" goes: before the next delta, else right after the last one."""
    seen, last = 0, -1
    for position, (name, _) in enumerate(events):
        if name == "contentBlockDelta":
            if seen == deltas:
                return position
            seen, last = seen + 1, position
    return last + 1 if last >= 0 else min(1, len(events))


class _Abort(Exception):
    """Raised inside the fake's stream to drop the connection."""


@asynccontextmanager
async def serve_bedrock(**script: Any) -> AsyncIterator[BedrockUpstream]:
    """A fake Bedrock Runtime scripted by `script` (fields of BedrockUpstream, also settable later), until exit."""
    upstream = BedrockUpstream(**script)
    async with serve(upstream.app()) as root:
        upstream.url = root
        yield upstream
