"""A small Redis client for the shared rate limiter: RESP2 over one pipelined connection, on asyncio.Protocol.

Why our own: the limiter runs on every request of a key with limits, and redis-py's asyncio client spent about
320 us of CPU per acquire + settle pair in process (its pool, command packing, StreamReader and timeouts; about
690 us on the benchmark's loaded core, where the fleet issue allows 200 us of added latency in all). This client
spends a few tens of microseconds per call: the command is one write, the reply is parsed straight from the read
that carried it. redis-py stays the tests' independent client (they read the counters with it).

What it speaks, and nothing more: commands as arrays of bulk strings; replies of every RESP2 type (simple strings,
errors, integers, bulk strings, arrays, nil). URLs: `redis://[[user]:password@]host[:port][/db]`, `rediss://` (TLS,
verified against the system's CAs) and `unix:///path[?db=N&password=...]`. It is not a general client: no RESP3, no
pub/sub, no cluster redirections (the limiter keeps each API key's counters in one slot), no reconnect-and-retry.

Calls are pipelined on one connection: Redis answers in order, so replies meet their calls in a FIFO (a fired
command, whose caller does not wait, takes its place there with a callback), and many
requests in flight share one socket (Redis runs one script at a time anyway). Every call has a deadline; a call not
answered by its deadline means the connection can no longer be trusted (a frozen server, a half-open socket), so
the connection is aborted, every call still waiting on it fails, and the next call opens a new one. A caller that is
cancelled only drops its own reply. Nothing is retried here (a retried script could count twice).

    RedisError             every failure; no OSError leaves this module
    ├── RedisUnavailable   could not connect, closed, or no answer in time
    └── ReplyError         the server answered with an error (`.code`: "NOSCRIPT", "WRONGPASS", ...)
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

Reply = int | str | None | list["Reply"]

MAX_REPLY_BYTES: Final = 1 << 20  # the limiter's replies are tens of bytes; more is a broken or foreign server


class RedisError(Exception):
    """Every failure of this client."""


class RedisUnavailable(RedisError):
    """Could not connect, the connection closed, or the server did not answer in time."""


class ReplyError(RedisError):
    """The server answered with an error reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.split(" ", 1)[0]


_MORE: Final = object()  # the parser's "the reply is not complete yet"

OnReply = Callable[[Reply | RedisError], None]


class _Fired:
    """A command sent without a caller waiting (`Redis.fire`): its callback gets the reply, or the failure."""

    __slots__ = ("callback",)

    def __init__(self, callback: OnReply) -> None:
        self.callback = callback


def _parse(data: bytes | bytearray, pos: int) -> tuple[object, int]:
    """One reply from `data` at `pos`, and where the next starts; (_MORE, pos) when it has not all arrived."""
    end = data.find(b"\r\n", pos)
    if end < 0:
        return _MORE, pos
    kind = data[pos]
    if kind == 58:  # ':' integer
        return int(data[pos + 1 : end]), end + 2
    if kind == 36:  # '$' bulk string
        size = int(data[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        if len(data) < start + size + 2:
            return _MORE, pos
        return bytes(data[start : start + size]).decode(), start + size + 2
    if kind == 42:  # '*' array
        count = int(data[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[object] = []
        at = end + 2
        for _ in range(count):
            item, at = _parse(data, at)
            if item is _MORE:
                return _MORE, pos
            items.append(item)
        return items, at
    if kind == 43:  # '+' simple string
        return bytes(data[pos + 1 : end]).decode(), end + 2
    if kind == 45:  # '-' error
        return ReplyError(bytes(data[pos + 1 : end]).decode(errors="replace")), end + 2
    raise ValueError(f"not a RESP2 reply type: {bytes(data[pos : pos + 1])!r}")


def encode(args: tuple[str | int, ...]) -> bytes:
    """A command as RESP2: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One socket to the server; replies are matched to calls in order."""

    __slots__ = ("_buffer", "_failure", "_pending", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[Reply] | _Fired] = deque()
        self._buffer = bytearray()
        self._failure: RedisUnavailable | None = None  # set once the connection is unusable

    @property
    def usable(self) -> bool:
        return self._failure is None and self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport: create_connection's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        if self._failure is not None or self._transport is None:
            raise self._failure or RedisUnavailable("rate limits: the Redis connection is not open")
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        self._transport.write(command)
        return future

    def fire(self, command: bytes, callback: OnReply) -> None:
        if self._failure is not None or self._transport is None:
            raise self._failure or RedisUnavailable("rate limits: the Redis connection is not open")
        self._pending.append(_Fired(callback))
        self._transport.write(command)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        pos, size, pending = 0, len(view), self._pending
        try:
            while pos < size:
                reply, pos_after = _parse(view, pos)
                if reply is _MORE:
                    break
                pos = pos_after
                if not pending:
                    raise ValueError("a reply nobody asked for")
                future = pending.popleft()
                if isinstance(future, _Fired):
                    future.callback(reply)  # type: ignore[arg-type]  # a Reply or a ReplyError, from _parse
                    continue
                if future.done():  # its caller was cancelled: the reply is dropped, the order kept
                    continue
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)  # type: ignore[arg-type]  # what _parse returns is a Reply
        except ValueError as exc:
            self.fail(RedisUnavailable(f"rate limits: Redis sent what is not RESP2 ({exc})"))
            return
        if pos == size:
            if buffer:
                buffer.clear()
        elif buffer:
            del buffer[:pos]
        else:
            buffer += view[pos:]
        if len(self._buffer) > MAX_REPLY_BYTES:
            self.fail(RedisUnavailable("rate limits: a Redis reply beyond 1 MiB"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisUnavailable(f"rate limits: the Redis connection closed ({exc or 'by the server'})"))

    def fail(self, failure: RedisUnavailable) -> None:
        """Make the connection unusable: abort it and fail every call still waiting on it."""
        if self._failure is None:
            self._failure = failure
        if self._transport is not None:
            self._transport.abort()
        while self._pending:
            future = self._pending.popleft()
            if isinstance(future, _Fired):
                future.callback(self._failure)
            elif not future.done():
                future.set_exception(self._failure)


class Redis:
    """One server, one pipelined connection opened on first use and again after a failure."""

    __slots__ = ("_closed", "_connection", "_opening", "_target", "_timeout")

    def __init__(self, url: str, *, timeout: float) -> None:
        """Args:
        url: as in the module docstring.
        timeout: seconds for each call to be answered, and for a connection to open (its handshake included).
        """
        self._target = _Target.parse(url)
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def call(self, *args: str | int) -> Reply:
        """Send one command and wait for its reply, at most `timeout` seconds (the connection's opening included)."""
        connection = self._connection
        if connection is None or not connection.usable:
            connection = await self._connect()
        future = connection.send(encode(args))
        timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, connection, future)
        try:
            return await future
        finally:
            timer.cancel()

    def fire(self, callback: OnReply, *args: str | int) -> bool:
        """Send one command without waiting for its reply: `callback` gets it (or the error reply, or the
        connection's failure) when it comes. False, and nothing sent, when no connection is open: `call` opens one.

        Commands on one connection run in order, so a call made after a fire sees what the fired command did. A
        fired command has no deadline of its own: a connection that stops answering is aborted by the next call's
        deadline, which fails the fired commands before it too."""
        connection = self._connection
        if connection is None or not connection.usable:
            return False
        connection.fire(encode(args), callback)
        return True

    def _expire(self, connection: _Connection, future: asyncio.Future[Reply]) -> None:
        if not future.done():
            connection.fail(RedisUnavailable(f"rate limits: Redis did not answer within {self._timeout}s"))

    async def _connect(self) -> _Connection:
        if self._closed:
            raise RedisUnavailable("rate limits: the Redis client is closed")
        if self._opening is None:  # one opening at a time: concurrent callers wait for the same one
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)  # a cancelled caller does not cancel the others' opening

    def _opened(self, opening: asyncio.Future[_Connection]) -> None:
        self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._connection = opening.result()

    async def _open(self) -> _Connection:
        loop, target = asyncio.get_running_loop(), self._target
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout):
                if target.path is not None:
                    _, connection = await loop.create_unix_connection(_Connection, target.path)
                else:
                    _, connection = await loop.create_connection(
                        _Connection, target.host, target.port, ssl=target.tls,
                        server_hostname=target.host if target.tls else None,
                    )  # fmt: skip
                replies = [connection.send(encode(command)) for command in target.handshake()]
                for reply in replies:
                    await reply
        except TimeoutError:
            if connection is not None:
                connection.fail(RedisUnavailable("rate limits: the Redis handshake timed out"))
            raise RedisUnavailable(f"rate limits: no Redis connection within {self._timeout}s") from None
        except OSError as exc:
            raise RedisUnavailable(f"rate limits: cannot connect to Redis: {exc}") from exc
        except RedisError as exc:
            if connection is not None:
                connection.fail(RedisUnavailable(str(exc)))
            raise RedisUnavailable(f"rate limits: the Redis handshake failed: {exc}") from exc
        if self._closed:
            connection.fail(RedisUnavailable("rate limits: the Redis client is closed"))
            raise RedisUnavailable("rate limits: the Redis client is closed")
        return connection

    async def aclose(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.fail(RedisUnavailable("rate limits: the Redis client is closed"))
            self._connection = None


class _Target:
    """Where and how to connect, from a URL."""

    __slots__ = ("db", "host", "password", "path", "port", "tls", "username")

    def __init__(self) -> None:
        self.host, self.port = "127.0.0.1", 6379
        self.path: str | None = None  # a Unix socket's
        self.tls: ssl.SSLContext | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.db = 0

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts, target = urlsplit(url), cls()
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, got {url.split(':', 1)[0]!r}")
        if parts.scheme == "unix":
            target.path = unquote(parts.path)
            db = query.get("db", "0")
        else:
            target.host = parts.hostname or target.host
            target.port = parts.port or target.port
            db = parts.path.lstrip("/") or query.get("db", "0")
            if parts.scheme == "rediss":
                target.tls = ssl.create_default_context()
        target.username = unquote(parts.username) if parts.username else None
        password = parts.password if parts.password is not None else query.get("password")
        target.password = unquote(password) if password else None
        try:
            target.db = int(db)
        except ValueError:
            raise ValueError(f"the Redis database in the URL must be a number, got {db!r}") from None
        return target

    def handshake(self) -> list[tuple[str | int, ...]]:
        """The commands a new connection sends before any call: AUTH when there is a password, SELECT for a db."""
        commands: list[tuple[str | int, ...]] = []
        if self.password is not None:
            commands.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands
