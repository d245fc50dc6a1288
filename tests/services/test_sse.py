"""services/providers/_sse.py: server-sent events as the data of each event, block by block as a body arrives."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from services.providers._http1 import ProtocolError
from services.providers._sse import MAX_EVENT_BYTES, EventStream, EventTooLarge, read_events


def parsed(blocks: Iterable[bytes], **options: str | None) -> tuple[list[list[str]], bool]:
    """What each block completed (the end of the body last), and whether the done marker came."""
    stream = EventStream(**options)
    out = [stream.feed(block) for block in blocks]
    out.append(stream.end())
    return out, stream.done


def test_the_events_a_block_completes_come_together() -> None:
    out, done = parsed([b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: {"c"', b":3}\n\n"])
    assert out == [['{"a":1}', '{"b":2}'], ['{"c":3}'], []]
    assert not done


def test_lines_split_anywhere_even_byte_by_byte() -> None:
    body = "data: héllo\r\n\r\ndata: wörld\n\n".encode()
    out, _ = parsed(body[i : i + 1] for i in range(len(body)))
    assert [event for events in out for event in events] == ["héllo", "wörld"]


def test_data_lines_join_and_other_fields_and_comments_are_skipped() -> None:
    body = b": keep-alive\n\nevent: message\nid: 7\nretry: 100\ndata: one\ndata:two\ndata:  three\n\n\n\n"
    out, _ = parsed([body])
    assert out == [["one\ntwo\n three"], []]  # one optional space after the colon; blank lines end no event


def test_done_ends_the_stream_and_what_follows_is_ignored() -> None:
    out, done = parsed([b"data: last\n\ndata: [DONE]\n\ndata: after\n\n", b"data: later\n\n"])
    assert out == [["last"], [], []]
    assert done


def test_another_done_marker_or_none() -> None:
    assert parsed([b"data: [DONE]\n\ndata: x\n\n"], done_marker=None) == ([["[DONE]", "x"], []], False)
    assert parsed([b"data: [DONE]\n\ndata: END\n\ndata: x\n\n"], done_marker="END") == ([["[DONE]"], []], True)


@pytest.mark.parametrize(
    ("tail", "expected", "done"),
    [
        (b"data: cut", ["cut"], False),  # the body ended in the middle of its last line
        (b"data: cut\n", ["cut"], False),  # ... or without the event's blank line
        (b"data: [DONE]", [], True),
        (b"data:\n", [], False),  # an event with nothing in it
        (b"", [], False),
    ],
    ids=["no-line-end", "no-blank-line", "done", "empty", "nothing"],
)
def test_the_end_of_the_body_completes_the_last_event(tail: bytes, expected: list[str], done: bool) -> None:
    out, was_done = parsed([b"data: first\n\n" + tail])
    assert out == [["first"], expected]
    assert was_done == done


def test_undecodable_bytes_are_replaced() -> None:
    out, _ = parsed([b"data: \xff\n\n"])
    assert out == [["\ufffd"], []]


def test_a_line_without_end_fails_at_the_bound_and_fast() -> None:
    # Before: no bound, and each block re-split the whole line so far; 32 MiB in 64 KiB blocks took 9.4 s.
    stream = EventStream()
    block = b"a" * 65536
    started = time.monotonic()
    with pytest.raises(EventTooLarge) as raised:
        stream.feed(b"data: ")
        for _ in range(32 * 1024 * 1024 // len(block)):
            stream.feed(block)
    assert time.monotonic() - started < 1
    assert isinstance(raised.value, ProtocolError)  # which the openai provider answers as UPSTREAM_PROTOCOL


def test_a_long_line_in_small_blocks_is_split_in_linear_time() -> None:
    # Just under the bound, 64 bytes a block: 16 384 blocks. Before, each copied the line so far (5 s here).
    line = b"data: " + b"x" * (MAX_EVENT_BYTES - 6)
    body = line + b"\n\n"
    stream = EventStream()
    started = time.monotonic()
    out = [event for start in range(0, len(body), 64) for event in stream.feed(body[start : start + 64])]
    assert time.monotonic() - started < 1
    assert out == [line[6:].decode()]


@pytest.mark.parametrize(
    "blocks",
    [
        [b"data: " + b"a" * MAX_EVENT_BYTES + b"\n\n"],  # a whole line in one block
        [b"data: " + b"a" * (MAX_EVENT_BYTES // 2), b"b" * (MAX_EVENT_BYTES // 2) + b"\n\n"],  # ended by a later one
        [b"data: a\n" * (MAX_EVENT_BYTES // 7 + 1)],  # short data lines, but no blank line to end the event
        [b"data: a\n" * (MAX_EVENT_BYTES // 14)] * 3,
        [b": " + b"a" * MAX_EVENT_BYTES + b"\n"],  # a comment
    ],
    ids=["line", "line-across-blocks", "event", "event-across-blocks", "comment"],
)
def test_a_line_or_an_event_over_the_bound_fails(blocks: list[bytes]) -> None:
    stream = EventStream()
    with pytest.raises(EventTooLarge):
        for block in blocks:
            stream.feed(block)
        stream.end()


def test_a_line_and_an_event_at_the_bound_pass() -> None:
    at_bound = b"data: " + b"a" * (MAX_EVENT_BYTES - 6)
    halves = b"data: " + b"b" * (MAX_EVENT_BYTES // 2 - 7) + b"\r\n"  # two lines: the bound, "\r" and all
    out, _ = parsed([at_bound + b"\n\n" + halves, halves + b"\n", at_bound])
    assert out == [[at_bound[6:].decode()], ["\n".join([halves[6:-2].decode()] * 2)], [], [at_bound[6:].decode()]]


class Body:
    """A body that hands out these blocks, then b"" forever; counts the reads."""

    def __init__(self, *blocks: bytes) -> None:
        self._blocks = list(blocks)
        self.reads = 0

    async def next_block(self) -> bytes:
        self.reads += 1
        return self._blocks.pop(0) if self._blocks else b""


async def test_read_events_yields_per_block_and_never_an_empty_list() -> None:
    body = Body(b"data: a\n\ndata: b\n\n", b": ping\n\n", b"data: c\n\ndata: d", b"")
    assert [events async for events in read_events(body)] == [["a", "b"], ["c"], ["d"]]


async def test_read_events_stops_reading_at_done() -> None:
    body = Body(b"data: a\n\ndata: [DONE]\n\n", b"data: never read\n\n")
    stream = EventStream()
    assert [events async for events in read_events(body, stream)] == [["a"]]
    assert stream.done and body.reads == 1  # the rest of the body is the caller's to drain (or drop)
