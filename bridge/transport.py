"""The bridge's HTTP/1.1 transport: uvicorn's httptools protocol with the limits it lacks.

uvicorn with httptools (the fastest server we measured for this app: BENCHMARKS.md) parses as much head as a client
sends, waits for a head or a body for as long as the client likes, and accepts every connection. A client could
hold memory with a 40 MiB header block, or connections with a head or a body that never ends (slowloris). This
protocol keeps httptools' parser and uvicorn's ASGI cycle, and adds, per connection:

- a request head (request line and headers) of at most `max_header_bytes` and `max_headers` fields: beyond, a 431;
- a head complete within `header_seconds` of the connection opening or of the head's first byte: else a 408;
- a body complete within `body_seconds` of the head: else a 408 (a client that half-closes with its body still
  short of its Content-Length gets a 400 at once);
- at most `max_connections` open connections in the process: beyond, a 503 `overloaded` and the connection closed.
  Idle keep-alive connections are closed by uvicorn after `timeout_keep_alive` seconds.

Every refusal is written in the fallback dialect's error shape (OpenAI's), closes the connection, and is counted in
`modelmax_bridge_transport_refusals_total{reason}`. The request path pays nothing for this when the head and the
body arrive in one read, the usual case: no timer is armed, and the head's size is summed once.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import httptools
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bridge.dialect import Dialect, Refusal, Refused


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """What one connection may cost; documented in the README's configuration table."""

    max_header_bytes: int = 16 * 1024  # the request line and every header line
    max_headers: int = 100
    header_seconds: float = 10.0
    body_seconds: float = 60.0
    max_connections: int = 4096


# What each refusal is, for the metric's `reason` label and the response.
_HEAD_TOO_LARGE = "header_too_large"
_HEAD_TIMEOUT = "header_timeout"
_BODY_TIMEOUT = "body_timeout"
_BODY_SHORT = "body_incomplete"
_CONNECTIONS = "too_many_connections"
REASONS = (_HEAD_TOO_LARGE, _HEAD_TIMEOUT, _BODY_TIMEOUT, _BODY_SHORT, _CONNECTIONS)
# After a refusal, input is read and dropped for at most this long or this much, then the connection is closed.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


def protocol_class(limits: TransportLimits, dialect: Dialect, refusals: Counter) -> type[HttpToolsProtocol]:
    """The protocol uvicorn should create for each connection (its `http=` setting), bound to these limits."""
    responses = {
        _HEAD_TOO_LARGE: _raw_error(
            dialect, Refused(Refusal.HEADERS_TOO_LARGE, {"limit": str(limits.max_header_bytes)})
        ),
        _HEAD_TIMEOUT: _raw_error(dialect, Refused(Refusal.REQUEST_TIMEOUT, {"part": "headers"})),
        _BODY_TIMEOUT: _raw_error(dialect, Refused(Refusal.REQUEST_TIMEOUT, {"part": "body"})),
        _BODY_SHORT: _raw_error(dialect, Refused(Refusal.BODY_INCOMPLETE)),
        _CONNECTIONS: _raw_error(dialect, Refused(Refusal.OVERLOADED), b"retry-after: 1\r\n"),
    }
    counters = {reason: refusals.labels(reason) for reason in REASONS}
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"limits": limits, "responses": responses, "counters": counters},
    )


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with the limits above; made by `protocol_class`, which sets the class fields."""

    limits: TransportLimits
    responses: dict[str, bytes]
    counters: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for or reading a head: from the opening, or the previous message's end
        self._head_started = False  # ... and the head's first byte has arrived
        self._in_body = False  # between a head and its message's end
        self._head_bytes = 0  # bytes received while in a head: bounds what httptools buffers
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered with a refusal: what still arrives is dropped until the close
        self._lingered = 0  # bytes dropped since

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(_CONNECTIONS)
        else:
            self._arm(self.limits.header_seconds, _HEAD_TIMEOUT)  # a connection that never sends is a slow head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, plus the head's size and the head's and body's deadlines, checked once per read."""
        if self._refused:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._refused:  # a callback of ours refused: the response is written already
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self.send_400_response("Unsupported upgrade request.")  # the bridge serves no websockets
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(_HEAD_TOO_LARGE)
            elif self._head_started and self._timer is None:
                self._arm(self.limits.header_seconds, _HEAD_TIMEOUT)
        elif self._in_body and self._timer is None:
            self._arm(self.limits.body_seconds, _BODY_TIMEOUT)

    def eof_received(self) -> None:
        if self._in_body and not self._refused and not self.cycle.response_started:
            self._refuse(_BODY_SHORT)  # the client finished sending, short of its Content-Length
        # returning None: the transport closes itself, and the ASGI app sees http.disconnect

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True

    def on_headers_complete(self) -> None:
        self._in_head = self._head_started = False
        self._disarm()
        headers = self.headers
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.limits.max_header_bytes or len(headers) > self.limits.max_headers:
            self._refuse(_HEAD_TOO_LARGE)
            raise _Stop  # httptools stops parsing this read
        self._head_bytes = 0
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._in_head = True  # the next message's head, whenever it comes
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._disarm()  # a response sent before its body was in (a 401, a 413): no body deadline
        super().on_response_complete()

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, reason: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if reason == _HEAD_TIMEOUT and not self._head_started:
            self.counters[reason].inc()  # opened and never sent a byte: closed without a response
            self._refused = True
            self.transport.close()
            return
        self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        """Answer with the refusal (unless a response has started: then only close) and close the connection.

        A lingering close, as nginx's: the answer and a FIN go out at once, and what the client is still sending is
        read and dropped for up to LINGER_SECONDS or LINGER_BYTES, so that it can read the answer. Closing a socket
        with unread input makes the kernel send a reset instead, which can destroy the answer in flight.
        """
        self.counters[reason].inc()
        self._refused = True
        self._disarm()
        cycle, in_body = self.cycle, self._in_body
        self._in_head = self._in_body = False
        if not (cycle is None or cycle.response_complete or (in_body and not cycle.response_started)):
            self.transport.close()  # a response is on its way: it cannot be answered twice
            return
        self.transport.write(self.responses[reason])
        if in_body:  # the app is waiting for the rest of the body: it learns at once that none will come
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._lingered = 0
            self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a read that was refused."""


@functools.cache
def _status_line(status: int) -> bytes:
    from http import HTTPStatus

    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()


def _raw_error(dialect: Dialect, refused: Refused, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response with the dialect's error body, closing the connection."""
    response = dialect.error_for(refused).response({})
    body = bytes(response.body)
    return b"".join(
        [
            _status_line(response.status_code),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            extra,
            b"\r\n",
            body,
        ]
    )
