"""A fast OpenAI-compatible upstream for benchmarks: raw asyncio HTTP/1.1 with canned answers, no framework.

The model name scripts the answer: `chunks-N` streams N content chunks (or answers them as one JSON completion when
the request is not streamed); `hold` sends one chunk and then keeps the stream open until the client leaves.
Run: `python -m bench.upstream PORT`.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_LENGTH = re.compile(rb"content-length:\s*(\d+)")
_USAGE = {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _delta(model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class _Cache:
    """Encoded answers per (model, streamed), built once: the upstream must cost next to nothing per request."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, bool], bytes] = {}

    def answer(self, model: str, streamed: bool) -> bytes:
        key = (model, streamed)
        if key not in self._answers:
            self._answers[key] = self._build(model, streamed)
        return self._answers[key]

    @staticmethod
    def _build(model: str, streamed: bool) -> bytes:
        count = int(model.removeprefix("chunks-")) if model.startswith("chunks-") else 1
        if not streamed:
            body = json.dumps(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "tok " * count},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _USAGE,
                },
                separators=(",", ":"),
            ).encode()
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
            return head + body
        parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
        parts.append(_event(_delta(model, {"role": "assistant", "content": ""})))
        parts.extend(_event(_delta(model, {"content": "tok "})) for _ in range(count))
        parts.append(_event(_delta(model, {}, "stop")))
        parts.append(_event({**_delta(model, {}), "choices": [], "usage": _USAGE}))
        parts.append(_chunk(b"data: [DONE]\n\n"))
        parts.append(b"0\r\n\r\n")
        return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self, cache: _Cache) -> None:
        self._cache = cache
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._held: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  (uvloop's transports are not asyncio's classes)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._held is not None and not self._held.done():
            self._held.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].lower()
            found = _LENGTH.search(head)
            length = int(found.group(1)) if found else 0
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            self._respond(head, body)

    def _respond(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        if head.startswith(b"get /v1/models"):
            payload = b'{"object":"list","data":[{"id":"chunks-20","object":"model","owned_by":"bench"}]}'
            self._transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
            return
        match = _MODEL.search(body)
        model = match.group(1).decode() if match else "chunks-1"
        streamed = _STREAM.search(body) is not None
        if model == "hold" and streamed:
            self._transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + _event(_delta(model, {"role": "assistant", "content": ""}))
                + _event(_delta(model, {"content": "held "}))
            )
            self._held = asyncio.get_running_loop().create_future()
            return  # nothing more until the client goes away
        self._transport.write(self._cache.answer(model, streamed))


async def serve(port: int) -> None:
    cache = _Cache()
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(cache), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
