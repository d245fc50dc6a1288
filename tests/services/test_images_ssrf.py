"""Remote images and SSRF: the address classifier over every refused form (pure, no network), then the fetcher end to
end against real servers on loopback, which the gateway must refuse before connecting unless the catalog opens it.

No test here may reach beyond loopback. Refused non-loopback forms are checked with the classifier only; end to end,
names come from `names` (a table of loopback answers in front of the loop's getaddrinfo, which is otherwise only
asked for numeric hosts, so no DNS query leaves the machine), and every server counts the connections it accepts.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import IPNetwork, RemoteImages
from services.errors import GatewayError
from services.images import ImageFetcher, refused_address, remote_images
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.services.test_images import PNG, UNFETCHABLE, core, remote_catalog, with_images

# --- The classifier ---------------------------------------------------------------------------------------------

REFUSED = [
    "127.0.0.1", "127.255.255.254",  # loopback
    "10.0.0.1", "172.16.0.1", "172.31.255.254", "192.168.1.1",  # private
    "169.254.169.254",  # link-local: the cloud metadata service
    "100.64.0.1", "100.127.255.254",  # shared address space (CGNAT)
    "0.0.0.0", "0.1.2.3",  # unspecified, "this network"
    "224.0.0.1", "239.255.255.250",  # multicast
    "255.255.255.255",  # broadcast
    "240.0.0.1",  # reserved
    "192.0.2.1", "198.18.0.1",  # documentation, benchmarking
    "::1", "::",  # loopback, unspecified
    "fe80::1", "fe80::1%eth0",  # link-local, with and without a zone
    "fc00::1", "fd12:3456::1",  # unique-local
    "fec0::1",  # site-local (deprecated, still routed by some stacks)
    "ff02::1", "ff0e::1",  # multicast
    "2001:db8::1",  # documentation
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1", "::10.0.0.1",  # IPv4-compatible (deprecated)
    "2002:7f00:1::", "2002:a9fe:a9fe::1",  # 6to4 of 127.0.0.1 and 169.254.169.254
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1",  # NAT64 of 169.254.169.254 and 127.0.0.1
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
]  # fmt: skip
PUBLIC = [
    "93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1", "2a00:1450:4001:82b::200e",
    "::ffff:93.184.216.34", "2002:5db8:d822::1", "64:ff9b::5db8:d822",  # embedding a public IPv4 address
]  # fmt: skip


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refused_address(ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not refused_address(ip_address(address))


@pytest.mark.parametrize(
    ("address", "networks", "refused"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], False),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], False),  # the same host as 127.0.0.1
        ("10.20.30.40", ["10.20.0.0/16"], False),
        ("10.21.0.1", ["10.20.0.0/16"], True),  # just outside
        ("fd00::5", ["fd00::/8"], False),
        ("::1", ["::1/128"], False),
        ("::1", ["127.0.0.0/8"], True),  # opening IPv4 loopback does not open IPv6 loopback
        ("169.254.169.254", ["127.0.0.0/8", "10.0.0.0/8"], True),  # nor anything else
        ("::127.0.0.1", ["127.0.0.0/8"], True),  # IPv4-compatible: only when named as IPv6
    ],
)
def test_the_operator_allow_list_opens_only_its_networks(address: str, networks: list[str], refused: bool) -> None:
    assert refused_address(ip_address(address), [ip_network(n) for n in networks]) is refused


# --- End to end, on loopback --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "image/png"})
    body: bytes = PNG


@dataclass
class Listener:
    """A bare HTTP/1.1 server on one loopback address: one request per connection, every connection counted."""

    host: str
    replies: dict[str, Reply] = field(default_factory=dict)  # by path; anything else is a 404
    connections: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, lower-case headers)
    port: int = 0

    @property
    def root(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            path = line.split(" ")[1]
            headers = (field.partition(":") for field in fields if field)
            self.requests.append((path, {name.strip().lower(): value.strip() for name, _, value in headers}))
            reply = self.replies.get(path, Reply(404, {"content-type": "text/plain"}, b"not found"))
            headers = {**reply.headers, "content-length": str(len(reply.body)), "connection": "close"}
            writer.write(
                f"HTTP/1.1 {reply.status} Whatever\r\n".encode()
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
                + b"\r\n"
                + reply.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def listening(host: str, **replies: Reply) -> AsyncIterator[Listener]:
    listener = Listener(host, {f"/{name.replace('_', '.')}": reply for name, reply in replies.items()})
    server = await asyncio.start_server(listener._serve, host, 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await server.wait_closed()


def bindable(family: socket.AddressFamily, host: str) -> bool:
    try:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


needs_second_loopback = pytest.mark.skipif(
    not bindable(socket.AF_INET, "127.0.0.2"), reason="127.0.0.2 is not a local address here"
)


@dataclass
class Names:
    """Host names answered from a table of loopback addresses; each lookup takes the next answer (the last repeats)."""

    table: dict[str, list[list[str]]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    def answer(self, name: str, *answers: list[str]) -> None:
        assert all(ip_address(a).is_loopback for a in sum(answers, [])), "loopback only"
        self.table[name] = list(answers)


@pytest.fixture
async def names(monkeypatch: pytest.MonkeyPatch) -> Names:
    """The running loop's getaddrinfo, which aiohttp's ThreadedResolver calls: table names, else numeric hosts only."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    names = Names()
    names.answer("localhost", ["127.0.0.1"])

    async def getaddrinfo(
        host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        name = host.rstrip(".").lower() if isinstance(host, str) else host
        if name not in names.table:
            # Numeric hosts only (0x7f000001 and 127.1 included): never a DNS query.
            return await real(host, port, family=family, type=type, proto=proto, flags=flags | socket.AI_NUMERICHOST)
        names.lookups.append(name)
        answers = names.table[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        infos = []
        for address in addresses:
            kind = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (0, kind):
                sockaddr = (address, int(port), 0, 0) if kind == socket.AF_INET6 else (address, int(port))
                infos.append((kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return infos

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return names


@asynccontextmanager
async def fetcher(*ports: int, networks: tuple[str, ...] = (), **policy: Any) -> AsyncIterator[ImageFetcher]:
    allowed: tuple[IPNetwork, ...] = tuple(ip_network(n) for n in networks)
    settings: dict[str, Any] = {"enabled": True, "timeout_seconds": 2.0, "allowed_networks": allowed, **policy}
    if ports:
        settings["allowed_ports"] = frozenset(ports)
    fetch = ImageFetcher(RemoteImages(**settings))
    try:
        yield fetch
    finally:
        await fetch.aclose()


async def refused(fetch: ImageFetcher, params: pb.CompletionParams, field: str = "messages[1].parts[1]") -> str:
    with pytest.raises(GatewayError) as raised:
        await fetch.resolve(remote_images(params))
    assert raised.value.reason == pb.ErrorReason.ERROR_REASON_INVALID_REQUEST
    assert raised.value.field == field
    return raised.value.message


async def fetched(fetch: ImageFetcher, url: str) -> bytes:
    params = with_images(url)
    await fetch.resolve(remote_images(params))
    return params.messages[1].parts[1].image.data


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "LocalHost.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0x7f000001", "2130706433",
     "127.1", "0177.0.0.1", "127.0.0.1."],
)  # fmt: skip
async def test_loopback_in_every_form_is_refused_before_connecting(names: Names, host: str) -> None:
    async with listening("127.0.0.1", cat_png=Reply()) as server, fetcher(server.port) as fetch:
        message = await refused(fetch, with_images(f"http://{host}:{server.port}/cat.png"))
    assert "is not allowed for remote images on this gateway" in message
    assert "127.0.0.1" not in message or host.startswith("127.0.0.1")  # never the address a name resolved to
    assert server.connections == 0


@pytest.mark.skipif(not bindable(socket.AF_INET6, "::1"), reason="no IPv6 loopback here")
async def test_ipv6_loopback_is_refused_before_connecting(names: Names) -> None:
    names.answer("six.test", ["::1"])
    async with listening("::1", cat_png=Reply()) as server, fetcher(server.port) as fetch:
        for url in (f"{server.root}/cat.png", f"http://six.test:{server.port}/cat.png"):
            assert "is not allowed" in await refused(fetch, with_images(url))
    assert server.connections == 0 and names.lookups == ["six.test"]


async def test_the_allow_list_opens_loopback(names: Names) -> None:
    async with listening("127.0.0.1", cat_png=Reply()) as server:
        async with fetcher(server.port, networks=("127.0.0.0/8",)) as fetch:
            assert await fetched(fetch, f"{server.root}/cat.png") == PNG
            assert await fetched(fetch, f"http://localhost:{server.port}/cat.png") == PNG
            assert await fetched(fetch, f"http://[::ffff:127.0.0.1]:{server.port}/cat.png") == PNG
    assert server.connections == 3


@needs_second_loopback
async def test_every_redirect_hop_is_checked(names: Names) -> None:
    """An allowed host (127.0.0.1/32) redirecting to a refused one (127.0.0.2): the second is never contacted."""
    names.answer("inside.test", ["127.0.0.2"])
    async with listening("127.0.0.2", cat_png=Reply()) as inside, listening("127.0.0.1", cat_png=Reply()) as other:
        hops = {
            "/to-literal": f"{inside.root}/cat.png",
            "/to-name": f"http://inside.test:{inside.port}/cat.png",
            "/to-mapped": f"http://[::ffff:127.0.0.2]:{inside.port}/cat.png",
            "/to-port": f"{other.root}/cat.png",  # an allowed address on a port that is not
        }
        async with listening("127.0.0.1", cat_png=Reply()) as outside:
            outside.replies |= {path: Reply(302, {"location": target}, b"") for path, target in hops.items()}
            async with fetcher(outside.port, inside.port, networks=("127.0.0.1/32",)) as fetch:
                assert await fetched(fetch, f"{outside.root}/cat.png") == PNG  # the first hop itself is allowed
                for path in hops:  # the caller learns that it was refused, not where the redirect led
                    message = await refused(fetch, with_images(f"{outside.root}{path}"))
                    assert message.endswith("redirects to a URL that is not allowed for remote images on this gateway.")
    assert inside.connections == 0 and other.connections == 0
    assert [path for path, _ in outside.requests] == ["/cat.png", *hops]


@needs_second_loopback
async def test_a_name_with_any_refused_address_is_refused_whole(names: Names) -> None:
    """One allowed and one refused address: not a mix to pick from, a rebinding trick; nothing is contacted."""
    names.answer("mixed.test", ["127.0.0.1", "127.0.0.2"])
    async with listening("127.0.0.1", cat_png=Reply()) as server:
        async with fetcher(server.port, networks=("127.0.0.1/32",)) as fetch:
            message = await refused(fetch, with_images(f"http://mixed.test:{server.port}/cat.png"))
    assert "host 'mixed.test' is not allowed" in message and "127.0.0" not in message
    assert server.connections == 0


@needs_second_loopback
async def test_the_address_checked_is_the_address_connected_to(names: Names) -> None:
    """A name that answers an allowed address, then a refused one: each connection resolves once, is checked once,
    and goes to what was checked; the next connection's new answer is checked again (no cache, no second lookup)."""
    names.answer("rebind.test", ["127.0.0.1"], ["127.0.0.2"])
    async with listening("127.0.0.2", cat_png=Reply()) as inside, listening("127.0.0.1", cat_png=Reply()) as outside:
        async with fetcher(outside.port, inside.port, networks=("127.0.0.1/32",)) as fetch:
            url = f"http://rebind.test:{outside.port}/cat.png"
            assert await fetched(fetch, url) == PNG
            assert names.lookups == ["rebind.test"]
            assert "host 'rebind.test' is not allowed" in await refused(fetch, with_images(url))
    assert names.lookups == ["rebind.test", "rebind.test"]
    assert outside.connections == 1 and inside.connections == 0


async def test_only_the_web_ports_unless_the_catalog_names_others(names: Names) -> None:
    async with listening("127.0.0.1", cat_png=Reply()) as server, listening("127.0.0.1", cat_png=Reply()) as other:
        async with fetcher(networks=("127.0.0.0/8",)) as fetch:  # the default: 80 and 443
            message = await refused(fetch, with_images(f"{server.root}/cat.png"))
            assert f"the port {server.port} is not allowed for remote images" in message
        async with fetcher(server.port, networks=("127.0.0.0/8",)) as fetch:
            assert await fetched(fetch, f"{server.root}/cat.png") == PNG
            assert f"port {other.port} is not allowed" in await refused(fetch, with_images(f"{other.root}/cat.png"))
    assert server.connections == 1 and other.connections == 0


async def test_image_urls_per_request_are_capped_before_any_fetch(names: Names) -> None:
    async with listening("127.0.0.1", cat_png=Reply()) as server:
        url = f"{server.root}/cat.png"
        async with fetcher(server.port, networks=("127.0.0.0/8",)) as fetch:  # the default cap: 8
            message = await refused(fetch, with_images(*[url] * 9), field="messages[1].parts[9]")
            assert "at most 8 image URLs" in message
        assert server.connections == 0
        async with fetcher(server.port, networks=("127.0.0.0/8",), max_images=2) as fetch:
            await refused(fetch, with_images(url, url, url), field="messages[1].parts[3]")
            assert server.connections == 0
            params = with_images(url, url)
            inline = pb.ContentPart(image=pb.Image(data=PNG, media_type="image/png"))
            params.messages[1].parts.extend([inline, inline])  # inline images are not counted: nothing to fetch
            await fetch.resolve(remote_images(params))
    assert server.connections == 2


async def test_no_cookie_is_kept_between_fetches(names: Names) -> None:
    cookie = Reply(headers={"content-type": "image/png", "set-cookie": "session=s3cret; Path=/"})
    async with listening("127.0.0.1", cat_png=cookie) as server:
        async with fetcher(server.port, networks=("127.0.0.0/8",)) as fetch:
            for _ in range(2):
                assert await fetched(fetch, f"http://localhost:{server.port}/cat.png") == PNG
    assert len(server.requests) == 2
    assert all("cookie" not in headers for _, headers in server.requests)


@pytest.mark.parametrize(
    ("reply", "hidden"),
    [
        (Reply(418, {"content-type": "application/x-internal-teapot"}, b"steam"), ["418", "teapot", "x-internal"]),
        (Reply(200, {"content-type": "text/html"}, b"<h1>admin</h1>"), ["200", "text/html", "html", "admin"]),
        (Reply(500, {"content-type": "image/png"}, PNG), ["500"]),
        (Reply(200, {"content-type": "image/png", "content-encoding": "br"}, PNG), ["br", "compressed"]),
        (Reply(200, {"content-type": "image/png"}, b""), ["empty"]),
    ],
    ids=["teapot", "html", "server error", "compressed", "empty"],
)
async def test_errors_do_not_say_what_the_address_answered(names: Names, reply: Reply, hidden: list[str]) -> None:
    async with listening("127.0.0.1", secret=reply) as server:
        async with fetcher(server.port, networks=("127.0.0.0/8",)) as fetch:
            message = await refused(fetch, with_images(f"{server.root}/secret"))
    assert message == f"Invalid 'messages[1].parts[1]': {UNFETCHABLE}"
    assert not [word for word in hidden if word in message.replace("image/png", "")]
    assert server.connections == 1


# --- Through the core -------------------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


async def test_the_core_refuses_loopback_unless_the_catalog_opens_it(
    tmp_path: Path, names: Names, upstream: OpenAIUpstream
) -> None:
    async with listening("127.0.0.1", cat_png=Reply()) as server:
        url = f"{server.root}/cat.png"
        section = {"enabled": True, "allowed_ports": [server.port]}
        async with core(remote_catalog(tmp_path, upstream, section)) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateCompletion(svc.CreateCompletionRequest(params=with_images(url)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "host '127.0.0.1' is not allowed" in (raised.value.details() or "")
        assert server.connections == 0 and upstream.requests == []
        section |= {"allowed_networks": ["127.0.0.1/32"], "max_images": 1}
        async with core(remote_catalog(tmp_path, upstream, section)) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateCompletion(svc.CreateCompletionRequest(params=with_images(url, url)))
            assert "at most 1 image URLs" in (raised.value.details() or "") and server.connections == 0
            reply = await stub.CreateCompletion(svc.CreateCompletionRequest(params=with_images(url)))
    assert reply.choices[0].content == "Hello, world!"
    assert server.connections == 1 and len(upstream.requests) == 1
