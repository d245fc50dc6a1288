"""Server-sent events (`text/event-stream`) as the `data` of each event: shared by the providers that read a streamed
answer over HTTP themselves.

`EventStream` is the parser, without I/O: fed the body block by block as it arrives, it gives the data of the events
each block completed, in order. `read_events` drives it over a body that hands out its blocks as they arrive. The
rules are the ones the upstreams rely on: lines end in `\\n` or `\\r\\n`; `data:` lines (one optional space after the
colon) are joined by `\\n`; a blank line ends the event; other fields (`event:`, `id:`, `retry:`) and `:` keep-alive
comments carry nothing a provider uses and are skipped. An event whose data is the `done` marker (OpenAI's
`[DONE]`) ends the stream: `done` turns true and anything after it is ignored.

A line, and the data lines of one event together, may be at most MAX_EVENT_BYTES (1 MiB) long, each `\\n` not
counted: beyond, the stream fails with EventTooLarge, a `_http1.ProtocolError` (so the `openai` provider answers
UPSTREAM_PROTOCOL, a 502), and a warning. Splitting is linear in the body: each block is scanned once, and a line
that spans blocks is kept as its pieces, joined once when its end arrives.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Protocol

from services.providers._http1 import ProtocolError

log = logging.getLogger(__name__)

DONE = "[DONE]"  # OpenAI's last event: the answer is complete, whatever the body does next
MAX_EVENT_BYTES = 1024 * 1024  # the longest line, and the most data lines one event may gather (bytes)


class EventTooLarge(ProtocolError):
    """A line, or the data lines of one event together, over MAX_EVENT_BYTES."""


class Body(Protocol):
    """A response body read as it arrives (as `_http1.Response` reads it)."""

    async def next_block(self) -> bytes:
        """Everything that came in since the previous call (waiting for some if none has); b"" at the end."""
        ...


class EventStream:
    """The events of one body, as its blocks arrive; see the module docstring for the rules."""

    __slots__ = ("_pending", "_pending_size", "_data", "_data_size", "_done_marker", "done")

    def __init__(self, done_marker: str | None = DONE) -> None:
        self._pending: list[bytes] = []  # the pieces of a line whose end has not arrived yet
        self._pending_size = 0  # their length, when there are any
        self._data: list[str] = []  # the data lines of the event being read
        self._data_size = 0  # their length as they came (bytes, each `\n` not counted)
        self._done_marker = done_marker  # None: the stream ends only with the body (Gemini's has no marker)
        self.done = False  # the done marker arrived

    def feed(self, block: bytes) -> list[str]:
        """The data of each event this block completed, in order (often none)."""
        if self.done:
            return []
        lines = block.split(b"\n")
        tail = lines.pop()  # the start of a line still to end; b"" when the block ends one
        if len(block) > MAX_EVENT_BYTES and (
            len(tail) > MAX_EVENT_BYTES or max(map(len, lines), default=0) > MAX_EVENT_BYTES
        ):
            raise _too_large("a line")
        pending = self._pending
        if pending:  # the line that earlier blocks began
            size = self._pending_size + len(lines[0] if lines else tail)
            if size > MAX_EVENT_BYTES:
                raise _too_large("a line")
            if not lines:
                pending.append(tail)
                self._pending_size = size
                return []
            pending.append(lines[0])
            lines[0] = b"".join(pending)
            pending.clear()
        if tail:
            pending.append(tail)
            self._pending_size = len(tail)
        return self._events(lines) if lines else []

    def end(self) -> list[str]:
        """Once the body ended: the event it ended without its blank line (and its last line without a line end)."""
        if self.done:
            return []
        pending = self._pending
        events = self._events([b"".join(pending)]) if pending else []
        pending.clear()
        last, self._data = "\n".join(self._data), []
        if last and not self.done:
            if last == self._done_marker:
                self.done = True
            else:
                events.append(last)
        return events

    def _events(self, lines: list[bytes]) -> list[str]:
        ready: list[str] = []
        data, size = self._data, self._data_size
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if line.startswith("data:"):
                size += len(raw)
                if size > MAX_EVENT_BYTES:
                    raise _too_large("an event")
                data.append(line[6:] if line.startswith("data: ") else line[5:])
                continue
            if line or not data:  # another field, a comment, or a blank line that ends no event
                continue
            event = "\n".join(data)
            data.clear()
            size = 0
            if event == self._done_marker:
                self.done = True
                self._pending.clear()
                break
            ready.append(event)
        self._data_size = size
        return ready


def _too_large(what: str) -> EventTooLarge:
    log.warning("refused an event stream: %s over %d bytes", what, MAX_EVENT_BYTES)
    return EventTooLarge(f"{what} of the event stream over {MAX_EVENT_BYTES} bytes")


async def read_events(body: Body, events: EventStream | None = None) -> AsyncGenerator[list[str], None]:
    """The data of each event of `body`, until the done marker or the end of the body.

    The events that one block (one network read) completed come together, in order, as one list, never empty: a
    provider can pass them on together. One async generator per body: the lines are split by `events`, a plain
    object, not by a generator of their own (this is the hot path of a streamed answer).
    """
    events = events or EventStream()
    while block := await body.next_block():
        ready = events.feed(block)
        if ready:
            yield ready
        if events.done:
            return
    last = events.end()
    if last:
        yield last
