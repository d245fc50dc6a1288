"""Hostile or broken upstreams: each bound of the HTTP/1.1 client (`_http1`) and of the SSE parser (`_sse`) fails the
one request that crossed it, fast, with the error the `openai` provider answers as UPSTREAM_PROTOCOL (a 502), and a log
line; requests to a well-behaved upstream are served all the while (the core's one event loop never stalls).

Raw asyncio servers on 127.0.0.1 write the hostile bytes, paced by `drain` as a real peer's socket would pace them.
Before the bounds, some of these took seconds of the loop (10 s for the largest header), or were not refused at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import cache

import pytest

from modelmax.v1 import completion_pb2 as pb
from services.catalog import CatalogEntry
from services.errors import GatewayError
from services.providers import Provider
from services.providers._http1 import MAX_DECODED_BYTES, MAX_HEAD_BYTES, MAX_HEADERS, Pool, ProtocolError
from services.providers._sse import MAX_EVENT_BYTES
from services.providers.openai import create_backend
from services.providers.openai.errors import RETRY_AFTER_LIMIT, retry_after
from tests.services.test_http1 import no_loop_errors as no_loop_errors  # noqa: F401 (autouse, shared)

R = pb.ErrorReason
PATH = "/v1/chat/completions"
OK_HELLO = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
PIECE = 64 * 1024  # bytes per write of the hostile servers
# A complete, valid answer: what each hostile upstream sends around its one fault, so that only the fault is wrong.
EVENTS = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
ANSWER_TAIL = b"content-length: %d\r\n\r\n%s" % (len(EVENTS), EVENTS)

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def paced(writer: asyncio.StreamWriter, unit: bytes, size: int) -> None:
    """`unit` repeated to about `size` bytes, a write of about PIECE bytes at a time, each once the one before has left
    (a peer at the client's reading speed); never held whole, so the server costs the loop little."""
    piece = unit * max(1, PIECE // len(unit))
    for _ in range(max(1, size // len(piece))):
        writer.write(piece)
        await writer.drain()


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[str]:
    """A server on 127.0.0.1:0 that, for each request on a connection, runs `script`; yields its URL."""
    tasks: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    (int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
                )
                await reader.readexactly(length)
                await script(writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client gave up on the connection (as it should, on a hostile one)
        finally:
            writer.close()

    listener = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await listener.wait_closed()


@asynccontextmanager
async def others_served() -> AsyncIterator[list[float]]:
    """Requests to a well-behaved upstream on a pool of their own, one after another while the block runs; yields
    how long each took (the last one's too, if still running at the end): a stalled loop shows as a long one."""
    latencies: list[float] = []

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(OK_HELLO)

    async with raw_server(answer) as url:
        pool = Pool(url)
        started = 0.0

        async def keep_asking() -> None:
            nonlocal started
            while True:
                started = time.monotonic()
                async with await pool.post(PATH, b"{}") as response:
                    assert await response.read(100) == b"hello"
                latencies.append(time.monotonic() - started)
                started = 0.0
                await asyncio.sleep(0.005)

        task = asyncio.create_task(keep_asking())
        try:
            while not latencies:  # one served before the hostile request starts
                await asyncio.sleep(0.005)
            yield latencies
            done = len(latencies)
            while len(latencies) == done:  # and one more once it is over (so, at least one meanwhile)
                await asyncio.sleep(0.005)
        finally:
            if started:
                latencies.append(time.monotonic() - started)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await pool.aclose()


@asynccontextmanager
async def openai_provider(url: str) -> AsyncIterator[Provider]:
    """The `openai` provider for a catalog entry whose upstream is at `url`."""
    backend = create_backend({})
    try:
        yield await backend.provider_for(
            CatalogEntry("gpt-test", "openai", "m", "acme", {"base_url": f"{url}/v1"}, where="test")
        )
    finally:
        await backend.aclose()


async def fails(provider: Provider) -> GatewayError:
    """The GatewayError a completion through `provider` fails with."""
    params = pb.CompletionParams(model="gpt-test", messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
    with pytest.raises(GatewayError) as raised:
        async with asyncio.timeout(GIVE_UP_SECONDS):
            async for _ in provider.stream(params):
                pass
    return raised.value


# The hostile upstreams. Each writes its response to any request, then keeps the connection as it is.


async def huge_header(writer: asyncio.StreamWriter) -> None:
    """One header of 64 MiB: before, 10.5 s (httptools grows a header by concatenation, one read at a time)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-huge: ")
    await paced(writer, b"a", 64 * 1024 * 1024)
    writer.write(b"\r\n" + ANSWER_TAIL)


async def many_headers(writer: asyncio.StreamWriter) -> None:
    """Twice as many headers as allowed, in a small head."""
    lines = b"".join(b"x-h%d: v\r\n" % n for n in range(2 * MAX_HEADERS))
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + lines + ANSWER_TAIL)


async def repeated_header(writer: asyncio.StreamWriter) -> None:
    """One header 100 000 times (2.4 MB): before, each repeat copied the value joined so far (quadratic: 4.3 s)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
    await paced(writer, b"x-dup: 0123456789abcdef\r\n", 100_000 * 24)
    writer.write(ANSWER_TAIL)


async def endless_interim(writer: asyncio.StreamWriter) -> None:
    """64 MiB of 1xx interim responses before the final one: before, the first was taken for the answer."""
    await paced(writer, b"HTTP/1.1 100 Continue\r\n\r\n", 64 * 1024 * 1024)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + ANSWER_TAIL)


@cache
def gzip_bomb() -> bytes:
    """The start of a gzip stream of 256 MiB of zeros, 265 KB: every MiB after the first is the same 1037 bytes,
    since a full flush makes each block forget the ones before it."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1024 * 1024)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    return first + again * 255


async def gzip_bomb_body(writer: asyncio.StreamWriter) -> None:
    """A 265 KB gzip body that decodes to 256 MiB: before, each read was expanded at once (2.1 s in all, requests
    to others waited up to 1.5 s, 256 MiB held)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n")
    writer.write(b"transfer-encoding: chunked\r\n\r\n")
    bomb = gzip_bomb()
    for start in range(0, len(bomb), PIECE):
        writer.write(chunk(bomb[start : start + PIECE]))
        await writer.drain()
    writer.write(b"0\r\n\r\n")


async def endless_line(writer: asyncio.StreamWriter) -> None:
    """An event stream whose first line runs 32 MiB without a line end: before, each block re-split the line so far
    (2 s here, as reads come; 16 s in blocks of 64 KiB)."""
    writer.write(STREAM_HEAD + chunk(b"data: "))
    await paced(writer, chunk(b"a" * (PIECE - 16)), 32 * 1024 * 1024)
    writer.write(b"0\r\n\r\n")


HTTP_CASES = [huge_header, many_headers, repeated_header, endless_interim, gzip_bomb_body]
ALL_CASES = [*HTTP_CASES, endless_line]
# Wall time to fail one hostile request, generous for a loaded 2-core machine; and the longest a request to the
# well-behaved upstream may take meanwhile (it takes about a millisecond).
WITHIN_SECONDS = 1.0
OTHERS_WITHIN_SECONDS = 0.5
GIVE_UP_SECONDS = 30.0  # what the test waits at most, so that an unbounded client fails it rather than hangs


def _bound_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("services.providers._") and r.levelno == logging.WARNING]


@pytest.mark.parametrize("script", HTTP_CASES, ids=lambda script: script.__name__)
async def test_the_client_refuses_it_fast_and_others_are_served(
    script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with raw_server(script) as url, others_served() as latencies:
        pool = Pool(url)
        started = time.monotonic()
        try:
            with pytest.raises(ProtocolError):
                async with asyncio.timeout(GIVE_UP_SECONDS):
                    async with await pool.post(PATH, b"{}") as response:
                        while await response.next_block():
                            pass
            elapsed = time.monotonic() - started
        finally:
            await pool.aclose()
    assert elapsed < WITHIN_SECONDS
    assert max(latencies) < OTHERS_WITHIN_SECONDS, f"the loop stalled: {max(latencies):.3f} s"
    assert len(_bound_logged(caplog)) == 1  # which bound, and which upstream, for the operator


@pytest.mark.parametrize("script", ALL_CASES, ids=lambda script: script.__name__)
async def test_the_openai_provider_answers_it_as_upstream_protocol(
    script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with raw_server(script) as url, others_served() as latencies, openai_provider(url) as provider:
        started = time.monotonic()
        error = await fails(provider)
        elapsed = time.monotonic() - started
    assert error.reason == R.ERROR_REASON_UPSTREAM_PROTOCOL  # a 502 at the HTTP edge
    assert elapsed < WITHIN_SECONDS
    assert max(latencies) < OTHERS_WITHIN_SECONDS, f"the loop stalled: {max(latencies):.3f} s"
    assert len(_bound_logged(caplog)) == 1


def test_the_bounds_are_the_documented_ones() -> None:
    assert (MAX_HEAD_BYTES, MAX_HEADERS, MAX_DECODED_BYTES) == (64 * 1024, 100, 64 * 1024 * 1024)
    assert MAX_EVENT_BYTES == 1024 * 1024


# Retry-After: an upstream's number reaches the dispatcher's sleep and the caller's own Retry-After header.


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("inf", None),  # float() reads these; none is a delay
        ("-inf", None),
        ("nan", None),
        ("1e999", None),
        ("99999999999", RETRY_AFTER_LIMIT),  # finite but absurd: capped
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_LIMIT),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_is_a_finite_delay_within_the_limit_or_none(value: str, seconds: float | None) -> None:
    assert retry_after(value) == seconds


async def test_a_plain_text_500_with_retry_after_inf() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        body = b"Internal Server Error"
        writer.write(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\nretry-after: inf\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

    async with raw_server(script) as url, openai_provider(url) as provider:
        error = await fails(provider)
    # Before: retry_after was inf, sent on as "inf" in ErrorInfo; the bridge's math.ceil of it raised OverflowError.
    assert (error.reason, error.retry_after) == (R.ERROR_REASON_UPSTREAM_UNAVAILABLE, None)
