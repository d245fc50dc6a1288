"""Remote images: the core fetches each http(s) image URL of a request once, before routing, so providers only ever
see image bytes (`Image.data` + `media_type`) and a retry or fallback never downloads the image again.

Fetching a URL the caller chose is a server-side request on the caller's behalf (SSRF), so it is off unless the
catalog's `remote_images:` section enables it, and then bounded: http(s) only, ports 80 and 443 only (`allowed_ports`),
optionally only `allowed_hosts`, public addresses only (`allowed_networks` opens others), all checked on every redirect
hop; at most `max_images` URLs per request; one time limit for the whole fetch; a size limit enforced while the body
streams in (never buffering past it); no compressed bodies; one of the four image media types; no cookies kept and no
proxy taken from the environment. Every failure is the caller's 400 naming the content part (`messages[i].parts[j]`),
never an upstream error: the image is part of the request.

Addresses are checked where the connection is made, not beside it: a host name is resolved once, by the session's own
resolver (`_CheckedResolver`), which refuses the whole host when any of its addresses is refused (a name that mixes a
public and an internal address is a rebinding trick, not an image host) and hands aiohttp only the checked addresses,
so the connection goes to exactly what was checked; there is no DNS cache and no second lookup. aiohttp never asks the
resolver about IP literals (`http://127.0.0.1/`, `http://[::ffff:127.0.0.1]/`), so `_check_url` checks those itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from modelmax.v1 import completion_pb2 as pb
from services.catalog import IPNetwork, RemoteImages
from services.completion.validation import IMAGE_MEDIA_TYPES
from services.errors import GatewayError, invalid_request

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Not public, yet not (on every Python) in is_private / is_reserved: checked by name.
_REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "100.64.0.0/10", "fc00::/7", "fec0::/10", "64:ff9b:1::/48")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are the IPv4 address reached
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d, which some stacks still route to a.b.c.d
# One message for every way a fetch can fail, so that a caller pointing the gateway at an internal address learns
# nothing from the answer (no status, no content type, no "refused" versus "no route").
_UNFETCHABLE = "the image URL could not be fetched as an image (image/png, image/jpeg, image/gif or image/webp)."


def refused_address(address: IPAddress, allowed_networks: Iterable[IPNetwork] = ()) -> bool:
    """Whether the gateway must not connect to `address` for a remote image. Pure: no network.

    Refused: loopback, private, link-local (cloud metadata at 169.254.169.254), multicast, unspecified, reserved,
    broadcast, shared (100.64.0.0/10), "this network" (0.0.0.0/8), unique-local (fc00::/7) and site-local (fec0::/10)
    addresses, anything else outside the public internet (`is_global`), the deprecated IPv4-compatible ::a.b.c.d, and
    the IPv6 forms that carry a refused IPv4 address: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16) and NAT64
    (64:ff9b::/96); those forms of a public IPv4 address are judged as that address.
    An address inside `allowed_networks`, or whose embedded IPv4 address is, is allowed whatever its kind.
    """
    allowed = tuple(allowed_networks)
    if any(address in network for network in allowed):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in _IPV4_COMPATIBLE:
            return True  # ::, ::1 and the deprecated ::a.b.c.d: never a legitimate image host
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return refused_address(embedded, allowed)
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or not address.is_global
        or any(address in network for network in _REFUSED_NETWORKS)
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when it is one of the forms that reach an IPv4 host."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class _Refused(Exception):
    """A URL the policy refuses, found before any connection (by `_check_url`, or by the resolver for a name)."""

    def __init__(self, what: str | None) -> None:
        super().__init__(what)
        self.what = what  # "the host 'x'", "the port 8080"; None: not an http(s) URL

    def error(self, param: str, *, redirected: bool) -> GatewayError:
        if redirected:  # where an image host redirects is its answer, not the caller's input: not echoed
            message = "the image URL redirects to a URL that is not allowed for remote images on this gateway."
        elif self.what is None:
            message = "an image URL must be an http(s) URL or a data: URL."
        else:  # the caller's own host or port, never the address a name resolved to
            message = f"{self.what} is not allowed for remote images on this gateway."
        return invalid_request(f"Invalid '{param}': {message}", field=param)


class _CheckedResolver(AbstractResolver):
    """Resolves with getaddrinfo and returns the addresses only when every one is allowed, else refuses the host."""

    def __init__(self, allowed_networks: tuple[IPNetwork, ...]) -> None:
        self._resolver = aiohttp.ThreadedResolver()
        self._allowed = allowed_networks

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            try:
                address = ipaddress.ip_address(result["host"])
            except ValueError:
                raise _Refused(f"the host '{host}'") from None
            if refused_address(address, self._allowed):
                raise _Refused(f"the host '{host}'")  # the whole host, even if another of its addresses is allowed
        return results

    async def close(self) -> None:
        await self._resolver.close()


def remote_images(params: pb.CompletionParams) -> list[tuple[str, pb.Image]]:
    """(field, image) of every image part that still has only a URL, in message order; usually empty, cheaply."""
    wanted: list[tuple[str, pb.Image]] = []
    for index, message in enumerate(params.messages):
        if not message.parts:
            continue
        for part_index, part in enumerate(message.parts):
            if part.HasField("image") and part.image.url and not part.image.data:
                wanted.append((f"messages[{index}].parts[{part_index}]", part.image))
    return wanted


class ImageFetcher:
    """Resolves a request's image URLs into bytes, with one aiohttp session created on first use."""

    def __init__(self, policy: RemoteImages) -> None:
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None

    async def resolve(self, wanted: list[tuple[str, pb.Image]]) -> None:
        """Fetch each image of `wanted` (from remote_images): fill its `data` and `media_type` and clear its URL.

        Raises a 400 naming the first part (in message order) that cannot be fetched; all are fetched at once. More
        than `max_images` URLs is a 400 naming the first part past the limit, before anything is fetched.
        """
        if not wanted:
            return
        if not self._policy.enabled:
            param = wanted[0][0]
            raise invalid_request(
                f"Invalid '{param}': remote image URLs are disabled on this gateway; send the image inline as a "
                "data: URL (data:image/png;base64,...).",
                field=param,
            )
        limit = self._policy.max_images
        if len(wanted) > limit:
            param = wanted[limit][0]
            raise invalid_request(
                f"Invalid '{param}': a request may carry at most {limit} image URLs on this gateway; send the "
                "others inline as data: URLs.",
                field=param,
            )
        fetches = (self._fetch(image.url, param) for param, image in wanted)
        results = await asyncio.gather(*fetches, return_exceptions=True)
        for result in results:  # the first failure in message order; the others were fetched or failed too
            if isinstance(result, BaseException):
                raise result
        for (_, image), (data, media_type) in zip(wanted, results, strict=True):  # type: ignore[misc]
            image.data = data
            image.media_type = media_type
            image.ClearField("url")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _fetch(self, url: str, param: str) -> tuple[bytes, str]:
        try:
            async with asyncio.timeout(self._policy.timeout_seconds):
                return await self._follow(url, param)
        except TimeoutError:
            raise invalid_request(
                f"Invalid '{param}': the image at this URL did not arrive within "
                f"{self._policy.timeout_seconds:g} seconds.",
                field=param,
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:  # could not connect, broke off, malformed URL or response
            # Deliberately vague: telling "refused" from "no route" would help map the gateway's network.
            raise invalid_request(f"Invalid '{param}': {_UNFETCHABLE}", field=param) from exc

    async def _follow(self, url: str, param: str) -> tuple[bytes, str]:
        """GET `url`, following up to MAX_REDIRECTS redirects ourselves so each hop is checked like the first."""
        session = self._client()
        target = URL(url)  # parsed once, by aiohttp's own parser, so the URL checked is the URL fetched
        for hop in range(MAX_REDIRECTS + 1):
            try:
                self._check_url(target)
                async with session.get(target, allow_redirects=False) as response:
                    if response.status in _REDIRECTS and "location" in response.headers:
                        target = target.join(URL(response.headers["location"]))
                        continue
                    return await self._read(response, param)
            except _Refused as exc:
                raise exc.error(param, redirected=hop > 0) from None
        raise invalid_request(f"Invalid '{param}': the image URL redirects too many times.", field=param)

    async def _read(self, response: aiohttp.ClientResponse, param: str) -> tuple[bytes, str]:
        # Neither the status nor the content type is echoed: they would tell a prying caller what an address answered.
        unfetchable = invalid_request(f"Invalid '{param}': {_UNFETCHABLE}", field=param)
        if response.status != 200:
            raise unfetchable
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type not in IMAGE_MEDIA_TYPES:
            raise unfetchable
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            # We asked for identity: a compressed body would hide its real size until decompressed.
            raise unfetchable
        limit = self._policy.max_bytes
        if (response.content_length or 0) > limit:
            raise _too_big(param, limit)
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise _too_big(param, limit)  # leaving the block drops the connection: the rest is never read
        if not body:
            raise unfetchable
        return bytes(body), media_type

    def _check_url(self, url: URL) -> None:
        """Scheme, port, host name and, for an IP literal, its address: all before any connection."""
        host = url.raw_host  # what aiohttp connects to (IDNA-encoded, lower-case, IPv6 without brackets)
        if url.scheme not in ("http", "https") or not host:
            raise _Refused(None)
        if url.port not in self._policy.allowed_ports:
            raise _Refused(f"the port {url.port}")
        allowed = self._policy.allowed_hosts
        names = {host.rstrip("."), (url.host or "").lower().rstrip(".")}  # as sent (IDNA) and as written
        if allowed is not None and not names & allowed:
            raise _Refused(f"the host '{host}'")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if refused_address(literal, self._policy.allowed_networks):
                raise _Refused(f"the host '{host}'")
        elif ":" in host or host.replace(".", "").isdigit():
            # What aiohttp takes for an IP literal (so never resolves) but no canonical address: 2130706433, 127.1.
            raise _Refused(f"the host '{host}'")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_CheckedResolver(self._policy.allowed_networks),
                use_dns_cache=False,  # every connection resolves (and is checked) anew: no stale, unchecked answer
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"Accept": "image/*", "Accept-Encoding": "identity"},
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # a cookie one image host sets is never sent anywhere
                trust_env=False,  # no proxy from the environment: the checked address is the one connected to
            )
        return self._session


def _too_big(param: str, limit: int) -> GatewayError:
    return invalid_request(f"Invalid '{param}': the image at this URL is larger than {limit} bytes.", field=param)
