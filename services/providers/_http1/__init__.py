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

from services.providers._http1.connection import MAX_DECODED_BYTES, MAX_HEAD_BYTES, MAX_HEADERS
from services.providers._http1.errors import (
    ConnectError,
    ConnectionBroken,
    ConnectTimeout,
    HTTPError,
    ProtocolError,
    ReadTimeout,
)
from services.providers._http1.pool import IDLE_SECONDS, Pool, Response

__all__ = [
    "IDLE_SECONDS",
    "MAX_DECODED_BYTES",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionBroken",
    "HTTPError",
    "Pool",
    "ProtocolError",
    "ReadTimeout",
    "Response",
]
