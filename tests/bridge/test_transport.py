"""The bridge's transport limits (bridge/transport.py) and the pipeline's use of slots and body memory, over raw
sockets against the real bridge under uvicorn, in front of the recording fake core of test_pipeline.

Each test is named for the hardening issue's finding it proves fixed: without the bounded protocol, a 40 MiB head
is parsed whole, a slow head or body holds its connection forever, every connection is accepted, two stalled
uploads take both slots, and any number of large bodies are held at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette

from tests.bridge.test_pipeline import AUTH, CHAT, RecordingCore
from tests.bridge.test_pipeline import core as core  # noqa: F401  (the fixture, under its own name)
from tests.conftest import running_bridge_app

Core = tuple[RecordingCore, str]
FAST = {"header_timeout_seconds": 0.5, "body_timeout_seconds": 0.5, "keepalive_seconds": 0.5}


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Bridge:
    """A running bridge: its app, and raw connections to it, all closed at the end."""

    def __init__(self, port: int, app: Starlette) -> None:
        self.port, self.app = port, app
        self._writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass


@asynccontextmanager
async def bridge_at(core: Core, **settings: object) -> AsyncIterator[Bridge]:
    async with running_bridge_app(core[1], **settings) as (base_url, app):
        bridge = Bridge(int(base_url.removesuffix("/v1").rsplit(":", 1)[1]), app)
        try:
            yield bridge
        finally:
            await bridge.close()


def head(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: {AUTH['Authorization']}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed), or (0, {}, b"") if the connection closed first."""
    async with asyncio.timeout(timeout):
        status_line = await reader.readline()
        if not status_line:
            return 0, {}, b""
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the server has closed the connection (EOF, or a reset); TimeoutError if it stays open."""
    try:
        async with asyncio.timeout(timeout):
            await reader.read()  # whatever is left, up to EOF
    except ConnectionResetError:
        pass
    return True


def error_code(body: bytes) -> Any:
    return json.loads(body)["error"]["code"]


def refusals(app: Starlette, reason: str) -> float:
    value = app.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "modelmax_bridge_transport_refusals_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_header_block_over_16_kib_is_a_431(core: Core) -> None:  # noqa: F811
    async with bridge_at(core) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("GET", "/v1/models", "X-Big: " + "a" * 17_000))
        status, headers, body = await read_response(reader)
        assert status == 431 and error_code(body) == "request_header_fields_too_large"
        assert headers["connection"] == "close" and await closed(reader)
        assert refusals(bridge.app, "header_too_large") == 1
        # Just under the limit is served.
        reader, writer = await bridge.connect()
        writer.write(head("GET", "/v1/models", "X-Big: " + "a" * 15_000))
        status, _, _ = await read_response(reader)
        assert status == 200
        writer.close()


async def test_a_40_mib_header_is_refused_before_it_is_read(core: Core) -> None:  # noqa: F811
    """The head is refused once it passes the limit: the server stops reading long before 40 MiB arrive."""
    async with bridge_at(core) as bridge:
        reader, writer = await bridge.connect()
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(10):
                while sent < 40 * 1024 * 1024:
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536
        assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of one head"


async def test_more_than_100_headers_is_a_431(core: Core) -> None:  # noqa: F811
    async with bridge_at(core) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("GET", "/v1/models", *(f"X-H{i}: v" for i in range(101))))
        status, _, body = await read_response(reader)
        assert status == 431 and error_code(body) == "request_header_fields_too_large"


async def test_a_slow_head_is_a_408(core: Core) -> None:  # noqa: F811
    async with bridge_at(core, **FAST) as bridge:
        reader, writer = await bridge.connect()
        started = time.monotonic()
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, _, body = await read_response(reader)
        assert (
            status == 408
            and error_code(body) == "request_timeout"
            and "headers" in json.loads(body)["error"]["message"]
        )
        assert 0.4 < time.monotonic() - started < 2.0
        assert await closed(reader) and refusals(bridge.app, "header_timeout") == 1


async def test_a_connection_that_never_sends_is_closed(core: Core) -> None:  # noqa: F811
    async with bridge_at(core, **FAST) as bridge:
        reader, _ = await bridge.connect()
        started = time.monotonic()
        assert await closed(reader, timeout=3.0)
        assert time.monotonic() - started < 2.0


async def test_a_slow_body_is_a_408_and_holds_no_slot(core: Core) -> None:  # noqa: F811
    body = json.dumps(CHAT).encode()
    async with bridge_at(core, **FAST) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("POST", "/v1/chat/completions", body=body)[: -len(body) + 5])  # 5 bytes of the body
        await asyncio.sleep(0.1)
        assert bridge.app.gateway.active == 0  # type: ignore[attr-defined]  # still uploading: no slot
        status, _, answer = await read_response(reader)
        assert (
            status == 408
            and error_code(answer) == "request_timeout"
            and "body" in json.loads(answer)["error"]["message"]
        )
        assert await closed(reader) and refusals(bridge.app, "body_timeout") == 1
        assert bridge.app.gateway.buffered == 0  # type: ignore[attr-defined]


async def test_a_body_cut_short_by_the_client_is_a_400(core: Core) -> None:  # noqa: F811
    body = json.dumps(CHAT).encode()
    async with bridge_at(core) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("POST", "/v1/chat/completions", body=body)[:-5])
        await writer.drain()
        writer.write_eof()  # the client is done sending, 5 bytes short of its Content-Length
        status, _, answer = await read_response(reader)
        assert status == 400 and error_code(answer) == "incomplete_body"
        assert refusals(bridge.app, "body_incomplete") == 1


async def test_an_idle_keep_alive_connection_is_closed(core: Core) -> None:  # noqa: F811
    async with bridge_at(core, **FAST) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("GET", "/v1/models"))
        status, _, _ = await read_response(reader)
        assert status == 200
        started = time.monotonic()
        assert await closed(reader, timeout=3.0)
        assert time.monotonic() - started < 2.0


async def test_connections_beyond_the_cap_get_a_503(core: Core) -> None:  # noqa: F811
    async with bridge_at(core, max_connections=3) as bridge:
        held = [await bridge.connect() for _ in range(3)]
        reader, _ = await bridge.connect()
        status, headers, body = await read_response(reader)
        assert status == 503 and error_code(body) == "overloaded" and headers["retry-after"] == "1"
        assert await closed(reader) and refusals(bridge.app, "too_many_connections") == 1
        for held_reader, held_writer in held:  # the connections already open are served as ever
            held_writer.write(head("GET", "/v1/models"))
            status, _, _ = await read_response(held_reader)
            assert status == 200


async def test_two_stalled_uploads_take_no_slots(core: Core) -> None:  # noqa: F811
    """With two slots, two clients stuck mid-upload used to turn everyone else away with 503."""
    body = json.dumps(CHAT).encode()
    async with bridge_at(core, max_concurrent_requests=2) as bridge:
        stalled = []
        for _ in range(2):
            reader, writer = await bridge.connect()
            writer.write(head("POST", "/v1/chat/completions", body=body)[:-10])
            stalled.append(writer)
        await asyncio.sleep(0.2)
        reader, writer = await bridge.connect()
        writer.write(head("POST", "/v1/chat/completions", body=body))
        status, _, answer = await read_response(reader)
        assert status == 200, answer


async def test_bodies_held_at_once_are_capped(core: Core) -> None:  # noqa: F811
    """A process holds at most max_buffered_bytes of request bodies: a body past the cap is a fast 503."""
    limit = 256 * 1024
    async with bridge_at(core, max_body_bytes=limit, max_buffered_bytes=limit) as bridge:
        reader, writer = await bridge.connect()
        large = b'{"model": "m", "messages": [], "pad": "' + b"a" * (limit - 100) + b'"}'
        writer.write(head("POST", "/v1/chat/completions", body=large)[:-1000])  # holds the whole cap
        await asyncio.sleep(0.2)
        assert bridge.app.gateway.buffered == len(large)  # type: ignore[attr-defined]
        other_reader, other_writer = await bridge.connect()
        other_writer.write(head("POST", "/v1/chat/completions", body=json.dumps(CHAT).encode()))
        status, headers, answer = await read_response(other_reader)
        assert status == 503 and error_code(answer) == "overloaded" and headers["retry-after"] == "1"
        other_writer.write(head("GET", "/v1/models"))  # a request without a body is served as ever
        status, _, _ = await read_response(other_reader)
        assert status == 200
        writer.close()
        await asyncio.sleep(0.2)
        assert bridge.app.gateway.buffered == 0  # type: ignore[attr-defined]  # released when the client left


async def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_500(
    core: Core,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps(CHAT).encode()
    async with bridge_at(core) as bridge:
        reader, writer = await bridge.connect()
        writer.write(head("POST", "/v1/chat/completions", body=body)[:-10])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # a reset, mid-body
        await asyncio.sleep(0.3)
        registry = bridge.app.metrics.registry  # type: ignore[attr-defined]
        counted = {
            sample.labels["status"]: sample.value
            for metric in registry.collect()
            if metric.name == "modelmax_bridge_requests"
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        assert counted == {"499": 1.0}
        assert bridge.app.gateway.active == 0 and bridge.app.gateway.buffered == 0  # type: ignore[attr-defined]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
