"""The hardening review, replayed: every finding, as an attacker or a broken peer would send it, against a real
bridge (uvicorn with bridge/transport.py) and a real core, over sockets.

Each finding also has a focused regression test next to the code it concerns (named in the closing note of the
hardening issue); this module is the one place that runs the whole list against one gateway, so that a change to any
layer that reopens a finding fails here. One gateway per test: a good upstream (the fake OpenAI server), one that
never answers, and one raw hostile upstream per case of tests/services/test_hostile_upstream.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from starlette.applications import Starlette

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.server import CoreServer
from tests.bridge.test_transport import closed, head, read_response
from tests.conftest import API_KEY, running_bridge_app, running_core
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.services.test_hostile_upstream import ALL_CASES, raw_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]
FAST = {"header_timeout_seconds": 0.5, "body_timeout_seconds": 0.5, "keepalive_seconds": 0.5}


@dataclass
class Gateway:
    base_url: str  # ".../v1"
    port: int
    app: Starlette
    core: CoreServer
    good: OpenAIUpstream
    silent: OpenAIUpstream  # answers its headers, then never a byte

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=AUTH, timeout=30)

    async def raw(self, stack: AsyncExitStack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        stack.push_async_callback(_close, writer)
        return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


def _entry(name: str, url: str) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": "fake-model",
        "options": {"base_url": url, "timeout_seconds": 30},
        "retry": {"attempts": 1},  # one try: each hostile answer is seen once
    }


@asynccontextmanager
async def gateway(
    tmp_path: Path, core_settings: dict[str, object] | None = None, **bridge_settings: object
) -> AsyncIterator[Gateway]:
    async with AsyncExitStack() as stack:
        good = await stack.enter_async_context(serve_openai_upstream())
        silent = await stack.enter_async_context(serve_openai_upstream(hang=True))
        entries = [_entry("good", good.url), _entry("silent", silent.url)]
        for case in ALL_CASES:
            url = await stack.enter_async_context(raw_server(case))
            entries.append(_entry(f"hostile-{case.__name__}", f"{url}/v1"))
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(yaml.safe_dump({"models": entries, "remote_images": {"enabled": True}}))
        core = await stack.enter_async_context(running_core(str(catalog), **(core_settings or {})))
        base_url, app = await stack.enter_async_context(running_bridge_app(f"127.0.0.1:{core.port}", **bridge_settings))
        port = int(base_url.removesuffix("/v1").rsplit(":", 1)[1])
        yield Gateway(base_url, port, app, core, good, silent)


def chat(model: str = "good", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, **fields}


# ---- the bridge's transport ----


@pytest.mark.parametrize("size", [1024 * 1024, 40 * 1024 * 1024], ids=["1-MiB", "40-MiB"])
async def test_header_blocks_past_16_kib_are_431(tmp_path: Path, size: int) -> None:
    async with gateway(tmp_path) as gw, AsyncExitStack() as stack:
        reader, writer = await gw.raw(stack)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0

        async def pump() -> None:
            nonlocal sent
            try:
                while sent < size:
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536
            except ConnectionError:
                pass  # the bridge answered and closed long before the end

        pumping = asyncio.create_task(pump())
        status, _, body = await read_response(reader)  # while the client is still sending, as a browser would
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        assert status == 431 and json.loads(body)["error"]["code"] == "request_header_fields_too_large"
        assert sent < 16 * 1024 * 1024  # the bridge stopped reading long before the end


async def test_slow_heads_slow_bodies_and_short_bodies_end(tmp_path: Path) -> None:
    body = json.dumps(chat()).encode()
    async with gateway(tmp_path, **FAST) as gw, AsyncExitStack() as stack:
        slow_head, writer = await gw.raw(stack)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        slow_body, writer = await gw.raw(stack)
        writer.write(head("POST", "/v1/chat/completions", body=body)[:-5])
        short_body, writer = await gw.raw(stack)
        writer.write(head("POST", "/v1/chat/completions", body=body)[:-5])
        await writer.drain()
        writer.write_eof()
        silent, _ = await gw.raw(stack)
        started = time.monotonic()
        statuses = [(await read_response(reader))[0] for reader in (slow_head, slow_body, short_body)]
        assert statuses == [408, 408, 400]
        assert await closed(silent, timeout=3.0)
        assert time.monotonic() - started < 3.0
        assert gw.good.requests == []  # nothing reached the upstream


async def test_idle_and_total_connections_are_bounded(tmp_path: Path) -> None:
    async with gateway(tmp_path, max_connections=4, **FAST) as gw, AsyncExitStack() as stack:
        idle, writer = await gw.raw(stack)
        writer.write(head("GET", "/v1/models"))
        assert (await read_response(idle))[0] == 200
        assert await closed(idle, timeout=3.0)  # the keep-alive limit
        held = [await gw.raw(stack) for _ in range(4)]
        extra, _ = await gw.raw(stack)
        status, headers, _ = await read_response(extra)
        assert status == 503 and headers["retry-after"] == "1"
        assert len(held) == 4


async def test_stalled_uploads_hold_no_slot_and_bodies_held_are_capped(tmp_path: Path) -> None:
    body = json.dumps(chat()).encode()
    limit = 256 * 1024
    settings = {"max_concurrent_requests": 2, "max_body_bytes": limit, "max_buffered_bytes": 2 * limit}
    async with gateway(tmp_path, **settings) as gw, AsyncExitStack() as stack, gw.http() as http:
        for _ in range(2):  # two clients stuck mid-upload, with the limit at 2 slots
            _, writer = await gw.raw(stack)
            writer.write(head("POST", "/v1/chat/completions", body=body)[:-10])
        served = await http.post("/chat/completions", json=chat())
        assert served.status_code == 200, served.text
    async with gateway(tmp_path, **settings) as gw, AsyncExitStack() as stack:
        async with gw.http() as http:
            padded = json.dumps(chat(metadata={"pad": ""})).encode()
            padded = padded.replace(b'"pad": ""', b'"pad": "' + b"a" * (limit - len(padded)) + b'"')
            assert len(padded) == limit  # two of them fill the buffer exactly
            for _ in range(2):  # two large bodies stuck mid-upload hold the whole buffer
                _, writer = await gw.raw(stack)
                writer.write(head("POST", "/v1/chat/completions", body=padded)[:-10])
            await asyncio.sleep(0.2)
            refused = await http.post("/chat/completions", json=chat())
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"


async def test_a_stream_abandoned_before_its_first_token_frees_everything(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, gw.http() as http:
        task = asyncio.create_task(http.post("/chat/completions", json=chat("silent", stream=True)))
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        async with asyncio.timeout(1.0):
            await gw.silent.disconnected.wait()


# ---- the core's own door ----


async def test_the_core_port_refuses_a_call_without_a_key(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, grpc.aio.insecure_channel(f"127.0.0.1:{gw.core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        params = pb.CompletionParams(model="good", messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(svc.CreateCompletionRequest(params=params), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert gw.good.requests == []


# ---- remote images ----


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433"])
async def test_a_remote_image_on_an_internal_address_is_refused_unfetched(tmp_path: Path, host: str) -> None:
    connections = 0

    def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    image = {"type": "image_url", "image_url": {"url": f"http://{host}:{port}/cat.png"}}
    try:
        async with gateway(tmp_path) as gw, gw.http() as http:
            answer = await http.post("/chat/completions", json=chat(messages=[{"role": "user", "content": [image]}]))
    finally:
        server.close()
        await server.wait_closed()
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages[0].content[0]"
    assert connections == 0 and gw.good.requests == []


# ---- hostile or broken upstreams ----


async def test_hostile_upstreams_are_502s_and_others_are_served(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw, gw.http() as http:
        for case in ALL_CASES:
            started = time.monotonic()
            hostile = asyncio.create_task(http.post("/chat/completions", json=chat(f"hostile-{case.__name__}")))
            while not hostile.done():  # the core's loop keeps serving the good upstream meanwhile
                asked = time.monotonic()
                good = await http.post("/chat/completions", json=chat())
                assert good.status_code == 200 and time.monotonic() - asked < 1.0, case.__name__
            answer = await hostile
            assert answer.status_code == 502, (case.__name__, answer.text)
            assert time.monotonic() - started < 5.0, case.__name__


# ---- error paths that were 500s or tracebacks ----


async def test_error_paths_are_4xx_never_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(127):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    big = {"type": "function", "function": {"name": "g", "parameters": {"type": "integer", "maximum": 2**64}}}
    async with gateway(tmp_path) as gw, gw.http() as http, AsyncExitStack() as stack:
        odd_id = await http.post(
            "/chat/completions", json=chat(), headers={"x-request-id": "r-\xa1\xff".encode("latin-1")}
        )  # type: ignore[dict-item]
        assert odd_id.status_code == 200
        twice = await http.post(
            "/chat/completions",
            json=chat(),
            headers=[("authorization", AUTH["Authorization"]), ("authorization", "Bearer mm-other-0123456789abc")],
        )
        assert twice.status_code == 400 and twice.json()["error"]["code"] == "duplicate_header"
        for fields, param in [
            ({"model": "m" * 5_000}, "model"),
            ({"model": "m" * 100_000}, "model"),
            ({"user": "u" * 10_000}, "user"),
            ({"stop": ["s" * 10_000]}, "stop"),
        ]:
            answer = await http.post("/chat/completions", json={**chat(), **fields})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
        for tools in ([tool], [big]):
            assert (await http.post("/chat/completions", json=chat(tools=tools))).status_code == 200
        gw.good.error_status, gw.good.retry_after = 500, "inf"
        gw.good.error_body = None
        inf = await http.post("/chat/completions", json=chat())
        assert inf.status_code == 503 and "retry-after" not in inf.headers  # before: a plain-text 500
        reader, writer = await gw.raw(stack)  # a client that hangs up mid-upload
        writer.write(head("POST", "/v1/chat/completions", body=json.dumps(chat()).encode())[:-10])
        await writer.drain()
        writer.transport.abort()
        await asyncio.sleep(0.3)
        del reader
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_idle_connections_to_the_metrics_ports_take_no_threads(tmp_path: Path) -> None:
    """prometheus_client's server took one OS thread per connection: 120 idle ones were 120 threads. Now they are
    served on the event loop (beyond 64 per port, new ones are closed: tests/test_metrics_http.py)."""
    async with gateway(tmp_path, {"metrics_port": 0}, metrics_port=0) as gw, AsyncExitStack() as stack:
        ports = [gw.core.metrics_port, gw.app.state.metrics_port]
        assert None not in ports
        before = threading.active_count()
        for port in ports:
            for _ in range(60):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                stack.push_async_callback(_close, writer)
        await asyncio.sleep(0.2)
        assert threading.active_count() <= before + 2
        async with httpx.AsyncClient() as http:
            for port in ports:  # and scrapes are still answered
                assert (await http.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
