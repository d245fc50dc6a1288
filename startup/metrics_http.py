"""Prometheus `/metrics` over HTTP/1.1 on the process's own event loop: no thread per connection.

prometheus_client's `start_http_server` is a `ThreadingWSGIServer`, which gives every connection an OS thread for as
long as it stays open, so N idle connections to the metrics port cost N threads (their stacks, and GIL contention
with the loop that serves requests). Here a connection is an `asyncio.Protocol` with a buffer and one timer, the
number of them is capped, and each always has a deadline.

A scrape gets what prometheus_client's own handler gives it: `choose_encoder` picks the text or the OpenMetrics
format from `Accept`, the body is gzipped when `Accept-Encoding` allows it, and `name[]` query parameters restrict
the registry. Only GET and HEAD of `/` and `/metrics` are served; the old handler answered GET of any path and
OPTIONS, and refused HEAD.

The exposition is generated (and gzipped) synchronously on the loop, which blocks it for as long as that takes:
about 15 us a series, so a millisecond or two for a hundred series and 15 ms for a thousand. Prometheus scrapes every
15-30 s, so that is accepted rather than paid for with a thread. Pipelined requests are answered one per loop turn,
a client that stops reading is dropped after `idle_timeout`, and `max_connections` bounds how many can ask at once;
nothing limits how often one connection asks.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import re
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

__all__ = ["MAX_HEAD_BYTES", "MetricsServer", "start_metrics_server"]

log = logging.getLogger(__name__)

# A scrape's request head is a few hundred bytes; a larger one than this is answered 431 and closed.
MAX_HEAD_BYTES = 8192
# Pipelined requests read ahead of their answers; past this reading pauses until they are answered.
_MAX_BUFFERED = 8 * MAX_HEAD_BYTES
_PATHS = frozenset({"/", "/metrics"})
_METHODS = ("GET", "HEAD")
_VERSION = re.compile(rb"HTTP/1\.(\d)")
_ANY_VERSION = re.compile(rb"HTTP/\d\.\d")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_Headers = list[tuple[str, str]]


class MetricsServer:
    """A listening metrics endpoint: `port` is the bound port, `close()` stops it and drops its connections."""

    def __init__(
        self, registry: CollectorRegistry, *, max_connections: int, idle_timeout: float, header_timeout: float
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: set[_Connection] = set()
        self._none_open = asyncio.Event()
        self._none_open.set()
        self._closing = False

    @property
    def port(self) -> int:
        """The bound port (the one chosen, when asked for 0); still told after `close()`."""
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections being served now; those refused beyond `max_connections` are not counted."""
        return len(self._connections)

    async def close(self) -> None:
        """Stop listening, then abort every open connection (a response being written is cut short)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        await self._none_open.wait()
        if self._server is not None:
            await self._server.wait_closed()

    def _admit(self, connection: _Connection) -> bool:
        if self._closing or len(self._connections) >= self.max_connections:
            return False
        self._connections.add(connection)
        self._none_open.clear()
        return True

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections:
            self._none_open.set()


async def start_metrics_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    max_connections: int = 64,
    idle_timeout: float = 10.0,
    header_timeout: float = 5.0,
) -> MetricsServer:
    """Serve `registry` on `host:port` from the running loop until `close()`.

    Args:
        registry: what every scrape exposes.
        host: the address to bind; a name is resolved, and its first address taken, as `start_http_server` does.
        port: the port to bind; 0 picks a free one, which `MetricsServer.port` then tells.
        max_connections: connections served at once; a connection beyond them is closed as soon as it is accepted.
        idle_timeout: how long a kept-alive connection may wait for its next request, and how long a client may take
            to read what it is sent.
        header_timeout: how long a request head may take to arrive, counted from its first byte (from the accept
            for a connection's first request). A client that is slower is disconnected.
    """
    server = MetricsServer(
        registry, max_connections=max_connections, idle_timeout=idle_timeout, header_timeout=header_timeout
    )
    loop = asyncio.get_running_loop()
    family, address = await _resolve(loop, host, port)
    # Bound here rather than by `create_server(host=...)`, which binds every address a name resolves to (two sockets,
    # with two different ports when port is 0) and makes IPv6 sockets v6-only, where "::" used to take IPv4 too.
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        server._port = sock.getsockname()[1]
        sock.setblocking(False)
        server._server = await loop.create_server(lambda: _Connection(server), sock=sock)
    except BaseException:
        sock.close()
        raise
    return server


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    # A numeric address (the usual bind address) resolves with no lookup, so without the executor thread
    # `loop.getaddrinfo` would start.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, address


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class _Request:
    __slots__ = ("method", "path", "query", "minor_version", "headers")

    def __init__(self, method: str, target: str, minor_version: int, headers: dict[str, str]) -> None:
        try:
            url = urlsplit(target)  # origin-form ("/metrics?x") or absolute-form ("http://host/metrics")
        except ValueError:
            raise _BadRequest(HTTPStatus.BAD_REQUEST) from None
        self.method = method
        self.path = url.path
        self.query = url.query
        self.minor_version = minor_version
        self.headers = headers  # lower-case names; a repeated field's values joined with ", "

    def wants_keep_alive(self) -> bool:
        tokens = {token.strip().lower() for token in self.headers.get("connection", "").split(",")}
        return "close" not in tokens if self.minor_version >= 1 else "keep-alive" in tokens

    def has_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0"


def _parse_head(head: bytes) -> _Request:
    """The request line and header fields (RFC 9112); anything malformed is a 400, another major version a 505."""
    request_line, *fields = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    method, target, version_text = parts
    version = _VERSION.fullmatch(version_text)
    if version is None:
        good = _ANY_VERSION.fullmatch(version_text)
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED if good else HTTPStatus.BAD_REQUEST)
    headers: dict[str, str] = {}
    for field in fields:
        name, colon, value = field.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # this also refuses obsolete line folding (a leading space)
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("host", "content-length"):
                raise _BadRequest(HTTPStatus.BAD_REQUEST)
            text = f"{headers[key]}, {text}"
        headers[key] = text
    request = _Request(method.decode("ascii"), target.decode("latin-1"), int(version[1]), headers)
    if request.minor_version >= 1 and "host" not in headers:
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    if not headers.get("content-length", "0").isdigit():
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    return request


def _answer(registry: CollectorRegistry, request: _Request) -> tuple[HTTPStatus, _Headers, bytes]:
    if request.path not in _PATHS:
        return _plain(HTTPStatus.NOT_FOUND)
    if request.method not in _METHODS:
        status, headers, body = _plain(HTTPStatus.METHOD_NOT_ALLOWED)
        return status, [*headers, ("Allow", ", ".join(_METHODS))], body
    # What prometheus_client's `_bake_output` does for its own handlers.
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    names = parse_qs(request.query).get("name[]")
    collector: Collector = registry.restricted_registry(names) if names else registry
    body = encoder(collector)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(request.headers.get("accept-encoding", "")):
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return HTTPStatus.OK, headers, body


def _plain(status: HTTPStatus) -> tuple[HTTPStatus, _Headers, bytes]:
    return status, [("Content-Type", "text/plain; charset=utf-8")], f"{status.value} {status.phrase}\n".encode()


def _response(
    status: HTTPStatus,
    headers: _Headers,
    body: bytes,
    *,
    keep_alive: bool,
    send_body: bool = True,
    http10: bool = False,
) -> bytes:
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Date: {email.utils.formatdate(usegmt=True)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")  # also for HEAD: the length GET would have sent
    if not keep_alive:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")


class _Connection(asyncio.Protocol):
    """One client. Requests are answered in order as their heads complete, and one deadline runs at any time:
    `header_timeout` while a head arrives, `idle_timeout` between kept-alive requests and while the client is not
    reading what it was sent. When the deadline passes, the connection is aborted."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._between_requests = False  # kept alive after a response, and no byte of the next request yet
        self._writing_paused = False
        self._reading = True
        self._eof = False
        self._done = False  # closing or closed: nothing more is read or answered
        self._scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCPTransport (the core's loop) is no asyncio.Transport subclass.
        self._transport = transport = cast(asyncio.Transport, transport)
        if not self._server._admit(self):
            log.debug("metrics: refused a connection beyond max_connections=%d", self._server.max_connections)
            self._done = True
            transport.abort()
            return
        self._arm(self._server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._between_requests:
            self._between_requests = False
            self._arm(self._server.header_timeout)
        self._buffer += data
        self._guarded(self._serve)
        self._update_reading()

    def eof_received(self) -> bool:
        # A half-closed client still gets answers to the requests it sent; the connection closes after them.
        self._eof = True
        self._guarded(self._serve)
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        if not self._done:
            self._update_reading()
            self._arm(self._server.idle_timeout)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if not self._done:
            self._arm(self._server.header_timeout if self._buffer else self._server.idle_timeout)
            self._guarded(self._serve)
            self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._forget(self)

    def abort(self) -> None:
        self._done = True
        if self._transport is not None:
            self._transport.abort()

    def _serve(self) -> None:
        """Answer the request at the front of the buffer if its head is complete; a pipelined next one waits a turn."""
        self._scheduled = False
        if self._done or self._writing_paused:
            return
        while self._buffer.startswith(b"\r\n"):  # RFC 9112 2.2: empty lines before a request line are ignored
            del self._buffer[:2]
        end = self._buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._finish(_response(*_plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), keep_alive=False))
            elif self._eof:
                self._finish(b"")
            return
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        self._update_reading()
        try:
            request = _parse_head(head)
        except _BadRequest as exc:
            self._finish(_response(*_plain(exc.status), keep_alive=False))
            return
        try:
            status, headers, body = _answer(self._server.registry, request)
        except Exception:
            log.exception("metrics: the registry failed to collect")
            self._finish(_response(*_plain(HTTPStatus.INTERNAL_SERVER_ERROR), keep_alive=False))
            return
        # A body is never read, so what follows it cannot be taken for the next request: answer, then close.
        keep_alive = request.wants_keep_alive() and not request.has_body()
        send_body = request.method != "HEAD"
        data = _response(
            status, headers, body, keep_alive=keep_alive, send_body=send_body, http10=request.minor_version == 0
        )
        if not keep_alive:
            self._finish(data)
            return
        assert self._transport is not None
        self._transport.write(data)
        if self._writing_paused:
            return  # pause_writing() set the deadline; resume_writing() carries on
        if self._buffer:
            self._arm(self._server.header_timeout)
            self._schedule()  # one exposition per loop turn, so a burst of pipelined requests cannot hold the loop
        elif self._eof:
            self._finish(b"")
        else:
            self._between_requests = True
            self._arm(self._server.idle_timeout)

    def _update_reading(self) -> None:
        """Read only while what was sent is being taken and what was read ahead stays small."""
        reading = not self._writing_paused and len(self._buffer) <= _MAX_BUFFERED
        if self._done or reading == self._reading or self._transport is None:
            return
        self._reading = reading
        if reading:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def _finish(self, data: bytes) -> None:
        """Send the last bytes and close; a client that does not take them within `idle_timeout` is aborted."""
        self._done = True
        assert self._transport is not None
        if data:
            self._transport.write(data)
        self._transport.close()
        self._arm(self._server.idle_timeout)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        log.debug("metrics: aborting a connection past its deadline")
        self._timer = None
        self.abort()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._guarded, self._serve)

    def _guarded(self, step: Callable[[], None]) -> None:
        # Uncaught, asyncio would log this at ERROR as a fatal protocol error; a misbehaving client is not worth it.
        try:
            step()
        except Exception:
            log.debug("metrics: dropping a connection after an error", exc_info=True)
            self.abort()
