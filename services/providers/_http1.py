"""A lean pooled HTTP/1.1 client on asyncio.Protocol and httptools: what the HTTP providers (`openai`) speak upstream.

Owns the connections to one origin (scheme, host, port): opening them (TLS for https), the bound on how many are
open, keep-alive reuse, request framing (Content-Length), response parsing (httptools), the body as it arrives (with
backpressure), read timeouts per wait, and the one exception tree below for every failure. It knows nothing of
OpenAI or of the gateway. Why our own: a streamed call costs ~10 us of CPU here against ~66 us with aiohttp, which
also holds ~8 KiB of Python objects per open stream, and this is the core's hot path.

    HTTPError                 every failure; no OSError or httptools error leaves this module
    ├── ConnectError          could not connect: refused, unreachable, DNS, TLS
    ├── ConnectTimeout        no connection (or no free one in a full pool) within connect_timeout; a TimeoutError
    ├── ReadTimeout           no byte within read_timeout, for the head or any gap in the body; a TimeoutError
    ├── ConnectionBroken      closed or reset before the response ended
    └── ProtocolError         a response that cannot be parsed or decoded, or that crosses a bound below

A hostile or broken upstream costs one request, never the event loop the core shares: each bound below fails the
response with ProtocolError (the `openai` provider answers UPSTREAM_PROTOCOL, a 502) and a warning naming the bound and
the upstream. Each also keeps the work per network read (at most 256 KiB) small and linear in it.

- MAX_HEAD_BYTES (64 KiB): the bytes before the final response head ends, interim (1xx) heads included. httptools
  grows a header by concatenation, one read at a time, so a 64 MiB header used to take seconds of the loop.
- MAX_HEADERS (100, as http.client): header lines of the head, repeats included; repeats are joined once, at the end.
- MAX_DECODED_BYTES (64 MiB): what a compressed body may decode to, in all. It is decoded in steps of 256 KiB, one per
  take by the reader (which first lets the loop run), so one read of a zip bomb is never expanded at once.

Interim 1xx responses (100 Continue, 103 Early Hints) are skipped; a 101 (no upgrade is asked for) and any transfer
coding but `chunked` (none other may be sent to a client that sends no TE header) are refused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # bytes before the final head ends (see the module docstring for the bounds)
MAX_HEADERS = 100  # header lines of one head, repeats included
MAX_DECODED_BYTES = 64 * 1024 * 1024  # bytes one compressed body may decode to
_HIGH_WATER = 256 * 1024  # body bytes buffered unread before the socket stops being read
_DECODE_STEP = _HIGH_WATER  # decoded bytes at most per decompress call: the loop's work per step is bounded
# Seconds a connection may sit idle and still be reused (aiohttp's keep-alive default): a NAT or load balancer in
# between may drop an idle connection without a FIN, and a request sent on it would wait out the read timeout.
IDLE_SECONDS = 15.0


class HTTPError(Exception):
    """Every failure of this client; the subclasses below are drawn as a tree in the module docstring."""


class ConnectError(HTTPError): ...


class ConnectTimeout(HTTPError, TimeoutError): ...


class ReadTimeout(HTTPError, TimeoutError): ...


class ConnectionBroken(HTTPError): ...


class ProtocolError(HTTPError): ...


class Pool:
    """Connections to one origin, at most `max_connections` open; beyond that, callers wait for a free one.

    Create it inside the running event loop it will serve. Timeouts are per request (`post`), defaulting to these.
    """

    __slots__ = (
        "_loop", "_host", "_port", "_ssl", "_prefix", "_heads", "_max", "_connect_timeout", "_read_timeout",
        "_idle_seconds", "_conns", "_idle", "_waiters", "_closed",
    )  # fmt: skip

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._loop = asyncio.get_running_loop()
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        fields = {"host": parts.netloc.rpartition("@")[2], "user-agent": "modelmax"}
        fields.update((name.lower(), value) for name, value in (headers or {}).items())
        if any(c in text for item in fields.items() for text in item for c in "\r\n\0"):
            raise ValueError("a header name or value contains CR, LF or NUL")
        # Everything after the path but the length, encoded once: a request is then one %-format and one write.
        block = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        self._prefix = f" HTTP/1.1\r\n{block}content-length: ".encode("ascii")
        self._heads: dict[str, bytes] = {}
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_seconds = idle_seconds
        self._conns: set[_Connection] = set()  # every open (or opening) connection: the count the bound limits
        self._idle: dict[_Connection, float] = {}  # -> when it went idle; popitem() reuses the most recently used
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def post(
        self, path: str, body: bytes, *, read_timeout: float | None = None, connect_timeout: float | None = None
    ) -> Response:
        """Send `body` to `path`; returns once the response head is in. Close the response (`async with`) when done."""
        head = self._heads.get(path)
        if head is None:
            if not path.startswith("/") or any(c in path for c in " \r\n\0"):
                raise ValueError(f"not a request path: {path!r}")
            head = self._heads[path] = b"POST " + path.encode("ascii") + self._prefix
        request = b"%b%d\r\n\r\n%b" % (head, len(body), body)
        wait = self._read_timeout if read_timeout is None else read_timeout
        fresh = False
        while True:
            conn, reused = await self._acquire(
                self._connect_timeout if connect_timeout is None else connect_timeout, fresh
            )
            try:
                conn.send(request, wait)
                await conn.head()
            except ConnectionBroken:
                # A reused socket that fails before any response byte was one the server had closed while idle: the
                # request was never processed, so it is sent once more on a new connection. Never after a byte.
                if reused and not conn.seen:
                    fresh = True
                    continue
                raise
            except BaseException:  # a timeout, a protocol error, a cancelled caller: the connection is not reusable
                conn.close()
                raise
            return Response(conn)

    async def aclose(self) -> None:
        """Close every connection, idle or in use; later requests fail with ConnectError."""
        self._closed = True
        for conn in list(self._conns):
            conn.close()
        while self._waiters:  # each wakes to find the pool closed
            self._wake()

    async def _acquire(self, timeout: float, fresh: bool) -> tuple[_Connection, bool]:
        """(a connection, whether it was reused): an idle one unless `fresh`, else a new one once the bound allows."""
        if not fresh and (idle := self._reuse()) is not None:
            return idle, True
        host, port, tls = self._host, self._port, self._ssl
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(timeout):  # like aiohttp's `connect`: waiting for a free slot, then connecting
                while len(self._conns) >= self._max and not self._closed:
                    await self._slot()
                    if not fresh and (idle := self._reuse()) is not None:
                        return idle, True
                if self._closed:
                    raise ConnectError("the pool is closed")
                conn = _Connection(self)
                self._conns.add(conn)
                await self._loop.create_connection(
                    lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None
                )
                return conn, False
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from None
            if isinstance(exc, OSError):
                raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
            raise

    def _reuse(self) -> _Connection | None:
        """The most recently idle connection, unless idle too long (then it and all older ones are closed).

        Idle ones are all alive as far as we know: connection_lost takes one the server closed out of the pool."""
        now = self._loop.time()
        while self._idle:
            conn, since = self._idle.popitem()
            if now - since < self._idle_seconds:
                return conn
            conn.close()
        return None

    async def _slot(self) -> None:
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled: the free slot goes to the next in line
            raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection) -> None:
        """A response read to its end: its connection is pooled when it can carry another request, else closed."""
        conn.active = False
        if conn.keep and not conn.closed and not self._closed and not conn.transport.is_closing():
            if conn.paused:  # read again, so that a close by the server while idle is seen
                conn.paused = False
                conn.transport.resume_reading()
            self._idle[conn] = self._loop.time()
            self._wake()
        else:
            conn.close()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self._idle.pop(conn, None)
            self._wake()


class Response:
    """A response whose head is in: `status`, `headers` (lower-case names), and the body as it arrives."""

    __slots__ = ("status", "headers", "_conn")

    def __init__(self, conn: _Connection) -> None:
        self.status: int = conn.status
        self.headers: dict[str, str] = conn.headers
        self._conn: _Connection | None = conn

    async def reads(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each item is everything that came in since the previous one, joined."""
        while block := await self.next_block():
            yield block

    @property
    def ended(self) -> bool:
        """The whole body has arrived (what is left of it is buffered), or the response is closed."""
        return self._conn is None or self._conn.complete

    async def read(self, limit: int) -> bytes:
        """At most `limit` bytes of the body (the rest is dropped with the connection)."""
        data = b""
        while len(data) < limit and (block := await self.next_block()):
            data += block
        return data[:limit]

    def close(self) -> None:
        """Done with the response: a complete one releases its connection, any other closes it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.complete:
                conn.pool._release(conn)
            else:
                conn.close()  # which is also what stops the upstream's work on this request

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()

    async def next_block(self) -> bytes:
        """Everything that came in since the previous call, joined (waiting for some if none has); b"" at the end.

        The hot path's way to read: `reads()` without an async generator per response."""
        conn = self._conn
        if conn is None:
            return b""
        block = await conn.take()
        if not block:
            self._conn = None
            conn.pool._release(conn)
        return block


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
