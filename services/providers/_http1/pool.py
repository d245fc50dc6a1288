"""The pool of connections to one origin, and the response a caller reads: the client's public surface."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from urllib.parse import urlsplit

from services.providers._http1.connection import _Connection
from services.providers._http1.errors import ConnectError, ConnectionBroken, ConnectTimeout

# Seconds a connection may sit idle and still be reused (aiohttp's keep-alive default): a NAT or load balancer in
# between may drop an idle connection without a FIN, and a request sent on it would wait out the read timeout.
IDLE_SECONDS = 15.0


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
        self,
        path: str,
        body: bytes,
        *,
        read_timeout: float | None = None,
        connect_timeout: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        """Send `body` to `path`; returns once the response head is in. Close the response (`async with`) when done.

        `headers` are this request's own, after the pool's (a trace context); a name or value that could not be a
        header (CR, LF, NUL, not ASCII) raises ValueError before anything is sent."""
        head = self._heads.get(path)
        if head is None:
            if not path.startswith("/") or any(c in path for c in " \r\n\0"):
                raise ValueError(f"not a request path: {path!r}")
            head = self._heads[path] = b"POST " + path.encode("ascii") + self._prefix
        own = _fields(headers) if headers else b""
        request = b"%b%d\r\n%b\r\n%b" % (head, len(body), own, body)
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


def _fields(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header lines, refused (ValueError) if one could split the request."""
    if any(c in text for item in headers for text in item for c in "\r\n\0"):
        raise ValueError("a header name or value contains CR, LF or NUL")
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode("ascii")


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
