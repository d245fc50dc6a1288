"""The asyncio metrics endpoint: real scrapes with httpx, and raw sockets for what a client library hides (framing,
idle and half-finished connections, the connection cap, timeouts).

The regression it exists for: prometheus_client's `start_http_server` holds one OS thread per open connection, so
idle connections to the metrics port used to cost a thread each. `test_idle_connections_cost_no_threads` guards it;
the test after it shows the old server doing it, which also proves that a thread count can see it.
"""

from __future__ import annotations

import asyncio
import gzip
import resource
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import httpx
import pytest
import uvloop
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from startup import raise_fd_limit
from startup.metrics_http import MAX_HEAD_BYTES, MetricsServer, start_metrics_server

HOST = "127.0.0.1"
IDLE_CONNECTIONS = 2000
Response = tuple[int, dict[str, str], bytes]
Start = Callable[..., Awaitable[MetricsServer]]


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("modelmax_test_scrapes", "Scrapes a test made.", registry=registry).inc(3)
    return registry


@pytest.fixture
async def start(registry: CollectorRegistry) -> AsyncIterator[Start]:
    """Starts metrics servers on 127.0.0.1 and ephemeral ports (keyword arguments as for start_metrics_server)."""
    servers: list[MetricsServer] = []

    async def _start(**options: Any) -> MetricsServer:
        server = await start_metrics_server(options.pop("registry", registry), HOST, 0, **options)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


@pytest.fixture
async def server(start: Start) -> MetricsServer:
    return await start()


async def connect(server: MetricsServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, server.port)


def request(method: str = "GET", path: str = "/metrics", *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: metrics", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> Response:
    """One response, framed by its Content-Length (no body after a HEAD's head)."""
    async with asyncio.timeout(2):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split(" ")[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    """Whether the server ends the connection (EOF or reset) within `within` seconds, reading nothing more."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def samples(body: bytes) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(body.decode()) for s in family.samples}


async def test_a_scrape_returns_the_registrys_series(server: MetricsServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}") as client:
        response = await client.get("/metrics")
        root = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4  # what the old server said to "*/*"
    assert "modelmax_test_scrapes_total 3.0\n" in response.text
    assert samples(response.content)["modelmax_test_scrapes_total"] == 3.0  # and it parses
    assert root.status_code == 200 and "modelmax_test_scrapes_total 3.0\n" in root.text


@pytest.mark.parametrize(
    ("accept", "accept_encoding"),
    [
        ("", ""),
        ("*/*", "gzip"),
        ("text/plain; version=1.0.0; escaping=underscores", ""),
        ("application/openmetrics-text; version=1.0.0", "gzip, deflate"),
        ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "identity"),
    ],
)
async def test_negotiation_matches_prometheus_clients_own_handler(
    server: MetricsServer, registry: CollectorRegistry, accept: str, accept_encoding: str
) -> None:
    headers = {"Accept": accept, "Accept-Encoding": accept_encoding}
    async with httpx.AsyncClient() as client:
        ours = await client.get(
            f"http://{HOST}:{server.port}/metrics?name[]=modelmax_test_scrapes_total", headers=headers
        )
    theirs = _wsgi_get(registry, accept, accept_encoding, "name[]=modelmax_test_scrapes_total")
    assert ours.status_code == 200
    assert ours.headers["content-type"] == theirs["content-type"]
    assert ours.headers.get("content-encoding") == theirs.get("content-encoding")
    assert ours.content == theirs["body"].encode()  # httpx has already gunzipped ours


async def test_openmetrics_and_gzip_when_asked(server: MetricsServer) -> None:
    reader, writer = await connect(server)
    writer.write(request("GET", "/metrics", "Accept: application/openmetrics-text", "Accept-Encoding: gzip"))
    status, headers, body = await read_response(reader)
    writer.close()
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")


async def test_name_query_restricts_the_registry(server: MetricsServer, registry: CollectorRegistry) -> None:
    Counter("modelmax_test_other", "Another series.", registry=registry).inc()
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://{HOST}:{server.port}/metrics", params={"name[]": "modelmax_test_other_total"}
        )
    assert "modelmax_test_other_total" in samples(response.content)
    assert "modelmax_test_scrapes_total" not in samples(response.content)


async def test_two_requests_share_one_kept_alive_connection(server: MetricsServer, registry: CollectorRegistry) -> None:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}") as client:
        first = await client.get("/metrics")
        Counter("modelmax_test_late", "Registered between the scrapes.", registry=registry).inc()
        second = await client.get("/metrics")
        assert server.open_connections == 1
    assert "connection" not in first.headers  # HTTP/1.1: kept alive unless said otherwise
    assert samples(second.content)["modelmax_test_late_total"] == 1.0  # generated afresh, not cached


async def test_head_is_a_get_without_its_body(server: MetricsServer) -> None:
    reader, writer = await connect(server)
    writer.write(request("GET") + request("HEAD") + request("HEAD", "/nowhere") + request("GET"))  # pipelined
    _, get_headers, get_body = await read_response(reader)
    status, headers, _ = await read_response(reader, head_only=True)
    missing, _, _ = await read_response(reader, head_only=True)
    after, _, after_body = await read_response(reader)  # parses only if the HEADs sent no body bytes
    writer.close()
    assert (status, missing, after) == (200, 404, 200)
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert headers["content-type"] == get_headers["content-type"]
    assert after_body == get_body


async def test_other_paths_are_404_and_other_methods_405(server: MetricsServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}") as client:
        missing = await client.get("/favicon.ico")
        post = await client.post("/metrics", content=b"x=1")
        options = await client.options("/metrics")
    assert missing.status_code == 404
    assert post.status_code == options.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert post.headers["connection"] == "close"  # its body is never read, so the connection cannot go on
    assert "connection" not in options.headers


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n folded: value\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
    ],
)
async def test_a_bad_head_is_answered_and_closed(server: MetricsServer, head: bytes, status: int) -> None:
    reader, writer = await connect(server)
    writer.write(head)
    answered, headers, _ = await read_response(reader)
    assert (answered, headers["connection"]) == (status, "close")
    assert await closed_by_server(reader)
    writer.close()


async def test_http_1_0_closes_unless_asked_to_keep_alive(server: MetricsServer) -> None:
    reader, writer = await connect(server)
    writer.write(request("GET", "/metrics", "Connection: keep-alive", version="HTTP/1.0"))
    _, kept, _ = await read_response(reader)
    writer.write(request("GET", "/metrics", version="HTTP/1.0"))
    _, closing, _ = await read_response(reader)
    assert (kept["connection"], closing["connection"]) == ("keep-alive", "close")
    assert await closed_by_server(reader)
    writer.close()


async def test_a_half_closed_client_gets_its_answers(server: MetricsServer) -> None:
    reader, writer = await connect(server)
    writer.write(request() + request())
    writer.write_eof()
    assert [(await read_response(reader))[0] for _ in range(2)] == [200, 200]
    assert await closed_by_server(reader)
    writer.close()


async def test_a_long_pipeline_is_answered_in_order(server: MetricsServer) -> None:
    """Far more requests than the server reads ahead of its answers (400 KB of them, more than one read takes in):
    it pauses reading, and resumes as it answers."""
    reader, writer = await connect(server)
    paths = ["/metrics" if i % 100 == 0 else "/nowhere" for i in range(10_000)]
    writer.write(b"".join(request("HEAD", path) for path in paths))
    statuses = [(await read_response(reader, head_only=True))[0] for _ in paths]
    assert statuses == [200 if path == "/metrics" else 404 for path in paths]
    writer.close()


async def test_a_client_that_stops_reading_is_dropped_after_idle_timeout(start: Start) -> None:
    class Large:
        """One series with a 1 MiB label: cheap to render, and a few answers fill the socket buffers."""

        def collect(self) -> Iterable[Metric]:
            metric = Metric("modelmax_test_large", "A large series.", "gauge")
            metric.add_sample("modelmax_test_large", {"pad": "a" * 2**20}, 1.0)
            yield metric

    registry = CollectorRegistry()
    registry.register(Large())
    server = await start(registry=registry, idle_timeout=0.2)
    reader, writer = await connect(server)
    writer.write(request() * 50)  # and never read a byte of the answers
    started = time.monotonic()
    async with asyncio.timeout(5):
        while server.open_connections:
            await asyncio.sleep(0.01)
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_failing_collector_is_a_500(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("collector broke")

    registry = CollectorRegistry()
    registry.register(Broken())
    server = await start(registry=registry)
    reader, writer = await connect(server)
    writer.write(request())
    status, _, _ = await read_response(reader)
    assert status == 500
    assert await closed_by_server(reader)
    writer.close()
    assert "the registry failed to collect" in caplog.text


async def test_idle_connections_cost_no_threads(start: Start) -> None:
    """The regression: with start_http_server each of these would hold an OS thread (threads would grow by 2,000)."""
    raise_fd_limit()
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * IDLE_CONNECTIONS + 200:
        pytest.skip("the open-file limit is too low for both ends of the idle connections")
    # Idle means not even a request head: a header_timeout long enough that none is dropped while they are counted.
    server = await start(max_connections=IDLE_CONNECTIONS + 1, header_timeout=30.0)
    threads = threading.active_count()
    idle: list[socket.socket] = []
    try:
        async with asyncio.timeout(5):
            while len(idle) < IDLE_CONNECTIONS:
                idle += [_connecting(server.port) for _ in range(50)]  # a burst within the listen backlog of 100
                while server.open_connections < len(idle):
                    await asyncio.sleep(0)
        assert threading.active_count() <= threads  # not one more (a thread of an earlier test may end meanwhile)
        reader, writer = await connect(server)  # and a scrape still gets through among them
        writer.write(request())
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        for sock in idle:
            sock.close()


def test_start_http_server_holds_a_thread_per_idle_connection(registry: CollectorRegistry) -> None:
    """The old server, for contrast: what the test above guards against, and proof its thread count can see it."""
    baseline = threading.active_count()
    http, thread = start_http_server(0, addr=HOST, registry=registry)
    serving = threading.active_count()  # its accept loop
    idle: list[socket.socket] = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection((HOST, http.server_port)))
            deadline = time.monotonic() + 2  # one at a time: its listen backlog is 5
            while threading.active_count() < serving + len(idle) and time.monotonic() < deadline:
                time.sleep(0.001)
        assert threading.active_count() == serving + len(idle)
    finally:
        for sock in idle:
            sock.close()
        http.shutdown()  # waits out serve_forever's poll interval of 0.5 s
        http.server_close()
        thread.join(5)
        deadline = time.monotonic() + 5  # the handler threads end once their clients are gone
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.01)


async def test_connections_beyond_the_cap_are_closed_while_admitted_ones_are_served(start: Start) -> None:
    server = await start(max_connections=3)
    admitted = [await connect(server) for _ in range(3)]
    async with asyncio.timeout(2):
        while server.open_connections < 3:
            await asyncio.sleep(0.01)
    refused_reader, refused_writer = await connect(server)
    assert await closed_by_server(refused_reader)
    refused_writer.close()
    for reader, writer in admitted:
        writer.write(request())
        assert (await read_response(reader))[0] == 200
    admitted.pop()[1].close()  # a freed place is given to the next connection
    async with asyncio.timeout(2):
        while server.open_connections > 2:
            await asyncio.sleep(0.01)
    reader, writer = await connect(server)
    writer.write(request())
    assert (await read_response(reader))[0] == 200
    for _, other in [*admitted, (reader, writer)]:
        other.close()


async def test_a_head_that_never_finishes_is_closed_after_header_timeout(start: Start) -> None:
    server = await start(header_timeout=0.2)
    reader, writer = await connect(server)
    started = time.monotonic()
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n")  # and never the empty line
    assert await closed_by_server(reader)
    assert 0.15 < time.monotonic() - started < 1.5
    writer.close()


async def test_a_trickled_head_does_not_reset_header_timeout(start: Start) -> None:
    server = await start(header_timeout=0.3, idle_timeout=5.0)
    reader, writer = await connect(server)
    writer.write(request())
    await read_response(reader)
    started = time.monotonic()
    # 3 s of bytes, one every 20 ms: were the deadline reset by each, the server would wait for all of them.
    for byte in b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nX-Slow: " + b"a" * 120:
        writer.write(bytes([byte]))
        await asyncio.sleep(0.02)
        if reader.at_eof():
            break
    assert await closed_by_server(reader)
    assert time.monotonic() - started < 1.0
    writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_idle_timeout(start: Start) -> None:
    server = await start(idle_timeout=0.2, header_timeout=5.0)
    reader, writer = await connect(server)
    writer.write(request())
    assert (await read_response(reader))[0] == 200
    started = time.monotonic()
    assert await closed_by_server(reader)
    assert 0.15 < time.monotonic() - started < 1.5
    assert server.open_connections == 0
    writer.close()


async def test_close_drops_every_connection_and_stops_listening(server: MetricsServer) -> None:
    kept_reader, kept_writer = await connect(server)
    kept_writer.write(request())
    await read_response(kept_reader)
    fresh_reader, fresh_writer = await connect(server)
    async with asyncio.timeout(2):
        while server.open_connections < 2:
            await asyncio.sleep(0.01)
    port = server.port
    await server.close()
    assert server.open_connections == 0
    assert await closed_by_server(kept_reader, within=0.5)
    assert await closed_by_server(fresh_reader, within=0.5)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    kept_writer.close()
    fresh_writer.close()


def test_the_same_on_uvloop(registry: CollectorRegistry) -> None:
    """The core runs uvloop, whose transports are not asyncio's classes and whose timers differ: the basics there."""

    async def scenario() -> None:
        server = await start_metrics_server(registry, HOST, 0, max_connections=2, idle_timeout=0.2, header_timeout=0.2)
        try:
            reader, writer = await connect(server)
            writer.write(request("GET") + request("HEAD") + request("GET", "/nowhere"))
            assert [(await read_response(reader, head_only=i == 1))[0] for i in range(3)] == [200, 200, 404]
            slow_reader, slow_writer = await connect(server)
            slow_writer.write(b"GET /metrics HTTP/1.1\r\n")
            refused_reader, refused_writer = await connect(server)
            assert await closed_by_server(refused_reader)
            assert await closed_by_server(slow_reader)  # header_timeout
            assert await closed_by_server(reader)  # idle_timeout
            for other in (writer, slow_writer, refused_writer):
                other.close()
            kept_reader, kept_writer = await connect(server)
            kept_writer.write(request())
            await read_response(kept_reader)
        finally:
            await server.close()
        assert server.open_connections == 0
        assert await closed_by_server(kept_reader, within=0.5)
        kept_writer.close()

    # Recorded, not raised: raised inside uvloop's loop.close() (filterwarnings = error), a ResourceWarning hangs it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        uvloop.run(scenario())
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def _connecting(port: int) -> socket.socket:
    """A client socket whose connect is under way: cheaper than an asyncio connection, and it stays idle."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((HOST, port))
    return sock


def _wsgi_get(registry: CollectorRegistry, accept: str, accept_encoding: str, query: str) -> dict[str, str]:
    """prometheus_client's own WSGI handler, called in-process: the behaviour the old server had."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query}
    if accept:
        environ["HTTP_ACCEPT"] = accept
    if accept_encoding:
        environ["HTTP_ACCEPT_ENCODING"] = accept_encoding
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.update({name.lower(): value for name, value in headers})

    body = b"".join(make_wsgi_app(registry)(environ, start_response))
    if seen.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    seen["body"] = body.decode()
    return seen
