"""One socket and its response parser (httptools): the bounds a hostile upstream meets, and the body as it comes."""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, cast

import httptools

from services.providers._http1.errors import ConnectionBroken, HTTPError, ProtocolError, ReadTimeout

if TYPE_CHECKING:
    from services.providers._http1.pool import Pool

log = logging.getLogger("services.providers._http1")

MAX_HEAD_BYTES = 64 * 1024  # bytes before the final head ends (see the module docstring for the bounds)
MAX_HEADERS = 100  # header lines of one head, repeats included
MAX_DECODED_BYTES = 64 * 1024 * 1024  # bytes one compressed body may decode to
_HIGH_WATER = 256 * 1024  # body bytes buffered unread before the socket stops being read
_DECODE_STEP = _HIGH_WATER  # decoded bytes at most per decompress call: the loop's work per step is bounded


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _Connection(asyncio.Protocol):
    """One socket, one request at a time: the parser's callbacks fill the response state, `take` hands it out."""

    __slots__ = (
        "pool", "transport", "_parser", "closed", "active", "seen", "paused", "keep", "complete", "status", "headers",
        "_head", "_began", "_framed", "_buffer", "_size", "_error", "_waiter", "_timeout", "_decoder", "_head_size",
        "_repeats", "_encoded", "_decoded",
    )  # fmt: skip

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport = cast(asyncio.Transport, None)  # connection_made sets it before any use
        self._parser = httptools.HttpResponseParser(self)
        self.closed = self.paused = False
        self._waiter: asyncio.Future[bool] | None = None
        self._reset(False, 0.0)

    def _reset(self, active: bool, timeout: float) -> None:
        """The state of one request: its response is read into it."""
        self.active, self.seen, self.keep, self.complete, self.status = active, False, False, False, 0
        self.headers: dict[str, str] = {}
        self._head = self._began = self._framed = False
        self._buffer: list[bytes] = []
        self._size = 0
        self._error: HTTPError | None = None
        self._decoder: zlib._Decompress | None = None
        self._timeout = timeout
        self._head_size = 0  # bytes received before the final head ended
        self._repeats: list[tuple[str, str]] | None = None  # repeated headers, joined once the head is in
        self._encoded: list[bytes] | None = None  # compressed body bytes not decoded yet (b"": the decoder has more)
        self._decoded = 0  # bytes the body has decoded to so far

    def send(self, request: bytes, timeout: float) -> None:
        self._reset(True, timeout)  # first: `seen` must be this request's when the send fails
        if self.closed or self.transport.is_closing():
            raise ConnectionBroken("the connection closed before the request was sent")
        self.transport.write(request)

    async def head(self) -> None:
        while not self._head:
            if self._error is not None:
                self.close()
                raise self._error
            await self._wait()

    async def take(self) -> bytes:
        """Everything buffered since the last call, joined; b"" at the body's end."""
        while not self._buffer:
            if self._encoded:
                await self._decode_step()
                continue
            if self.complete:
                return b""
            if self._error is not None:
                self.close()
                raise self._error
            await self._wait()
        buffer = self._buffer
        block = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        self._buffer, self._size = [], 0
        if self.paused and not self._encoded:
            self.paused = False
            self.transport.resume_reading()
        return block

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool._forget(self)

    async def _wait(self) -> None:
        # One future per wait; read_timeout bounds this wait only, so a long body is fine while bytes keep coming.
        loop = self.pool._loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout, _expire, waiter)
        try:
            arrived = await waiter
        except BaseException:  # cancelled mid-response: the connection is in an unknown state, never reused
            self.close()
            raise
        finally:
            timer.cancel()
            self._waiter = None
        if not arrived:
            self.close()
            raise ReadTimeout(f"no response byte within {self._timeout:g} s")

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _refuse(self, what: str) -> ProtocolError:
        """The response cannot be used: the error kept for its reader, and the one warning that says why."""
        log.warning("refused a response from %s:%d: %s", self.pool._host, self.pool._port, what)
        error = self._error = ProtocolError(what)
        return error

    def _decode(self, data: bytes) -> bytes:
        """At most _DECODE_STEP bytes decoded from `data`; what it holds beyond waits in `_encoded`, in front."""
        decoder = cast("zlib._Decompress", self._decoder)
        try:
            decoded = decoder.decompress(data, _DECODE_STEP)
        except zlib.error as exc:
            raise self._refuse(f"undecodable body: {exc}") from None
        self._decoded += len(decoded)
        if self._decoded > MAX_DECODED_BYTES:
            raise self._refuse(f"a compressed body that decodes to over {MAX_DECODED_BYTES} bytes")
        if len(decoded) == _DECODE_STEP:  # the step is full: input is left, or output the decoder still holds
            encoded = self._encoded
            if encoded is None:
                encoded = self._encoded = []
            encoded.insert(0, decoder.unconsumed_tail)
            if not self.paused:  # the reader's takes decode the rest, and only then is the socket read again
                self.paused = True
                self.transport.pause_reading()
        return decoded

    async def _decode_step(self) -> None:
        """Decode the next step of the body into the buffer (and check the body's end once all of it is decoded).

        The loop runs first: the steps of a body that decodes to much come one loop iteration apart, as reads do."""
        encoded = cast(list[bytes], self._encoded)
        try:
            await asyncio.sleep(0)
            if decoded := self._decode(encoded.pop(0)):
                self._buffer.append(decoded)
                self._size += len(decoded)
            if not encoded and self.complete:
                self._end_decoding()
        except BaseException:  # a body refused, a cancelled reader: the connection is not reusable
            self.close()
            raise

    def _end_decoding(self) -> None:
        """The body's end arrived and all of it is decoded: what the decoder still holds, and whether it ended."""
        decoder = cast("zlib._Decompress", self._decoder)
        if tail := decoder.flush():  # small: the last decompress call left neither input nor output behind
            self._buffer.append(tail)
            self._size += len(tail)
        if not decoder.eof:
            raise self._refuse("the compressed body ended early")

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: a server out of step, never to be trusted with a request
            self.close()
            return
        self.seen = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.keep = False
            if not self.complete:
                if self._error is None:
                    self._refuse(f"unparseable response: {exc}")
                self.transport.close()
        if not self._head and self._error is None:  # checked after the read: it may have ended the head
            self._head_size += len(data)
            if self._head_size > MAX_HEAD_BYTES:
                self.keep = False
                self._refuse(f"no response head within {MAX_HEAD_BYTES} bytes")
                self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.active and not self.complete and self._error is None:
            if self._head and not self._framed:  # a body delimited by the end of the connection: it ended
                try:
                    self.on_message_complete()
                except ProtocolError:
                    pass  # kept in self._error, raised to the reader
            elif exc is None:
                self._error = ConnectionBroken("the connection closed before the response ended")
            else:
                self._error = ConnectionBroken(f"the connection broke before the response ended: {exc}")
        self._wake()

    # httptools callbacks; an exception raised here comes out of feed_data as an HttpParserError

    def on_message_begin(self) -> None:
        if self._began:  # a second response to one request
            raise ProtocolError("bytes after the response")
        self._began = True

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers = self.headers
        if key not in headers:
            headers[key] = text
            return
        repeats = self._repeats  # a repeat: kept aside, so that joining them all costs their length once
        if repeats is None:
            repeats = self._repeats = []
        repeats.append((key, text))
        if len(headers) + len(repeats) > MAX_HEADERS:
            raise self._refuse(f"over {MAX_HEADERS} header lines")

    def on_headers_complete(self) -> None:
        headers, repeats = self.headers, self._repeats
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise self._refuse("a switch of protocols (101), which no request asks for")
            self.headers, self._repeats = {}, None  # an interim response: the final one is still to come
            return
        if repeats is not None:
            if len(headers) + len(repeats) > MAX_HEADERS:
                raise self._refuse(f"over {MAX_HEADERS} header lines")
            joined: dict[str, list[str]] = {}
            for key, text in repeats:
                joined.setdefault(key, [headers[key]]).append(text)
            for key, texts in joined.items():
                headers[key] = ", ".join(texts)
        elif len(headers) > MAX_HEADERS:
            raise self._refuse(f"over {MAX_HEADERS} header lines")
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, from the stream's own header
        elif encoding not in ("", "identity"):
            raise self._refuse(f"unsupported content-encoding {encoding!r}")
        coding = headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise self._refuse(f"unsupported transfer-encoding {coding!r}")
        self._framed = coding is not None or "content-length" in headers
        self.status = status
        self._head = True

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            encoded = self._encoded
            if encoded or self._size > _HIGH_WATER:  # enough decoded for now: the reader's takes decode the rest
                if encoded is None:
                    encoded = self._encoded = []
                encoded.append(body)
                if not self.paused:
                    self.paused = True
                    self.transport.pause_reading()
                return
            body = self._decode(body)
            if not body:
                return
        self._buffer.append(body)
        self._size += len(body)
        if self._size > _HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if not self._head:  # the end of an interim (1xx) response: the final one begins next
            self._began = False
            return
        if self._decoder is not None and not self._encoded:  # else the reader's last decode step checks the end
            self._end_decoding()
        parser = self._parser
        self.keep = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        self.complete = True
