"""Remote images: the core fetches each http(s) image URL of a request once, before routing, so providers only ever
see image bytes (`Image.data` + `media_type`) and a retry or fallback never downloads the image again.

Fetching a URL the caller chose is a server-side request on the caller's behalf (SSRF), so it is off unless the
catalog's `remote_images:` section enables it, and then bounded: http(s) only, optionally only `allowed_hosts` (checked
on every redirect too), one time limit for the whole fetch, a size limit enforced while the body streams in (never
buffering past it), no compressed bodies, and one of the four image media types. Every failure is the caller's 400
naming the content part (`messages[i].parts[j]`), never an upstream error: the image is part of the request.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin, urlsplit

import aiohttp

from modelmax.v1 import completion_pb2 as pb
from services.catalog import RemoteImages
from services.completion.validation import IMAGE_MEDIA_TYPES
from services.errors import GatewayError, invalid_request

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


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

        Raises a 400 naming the first part (in message order) that cannot be fetched; all are fetched at once.
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
            raise invalid_request(f"Invalid '{param}': the image URL could not be fetched.", field=param) from exc

    async def _follow(self, url: str, param: str) -> tuple[bytes, str]:
        """GET `url`, following up to MAX_REDIRECTS redirects ourselves so each hop's scheme and host are checked."""
        session = self._client()
        for _ in range(MAX_REDIRECTS + 1):
            self._check_url(url, param)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in _REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                return await self._read(response, param)
        raise invalid_request(f"Invalid '{param}': the image URL redirects too many times.", field=param)

    async def _read(self, response: aiohttp.ClientResponse, param: str) -> tuple[bytes, str]:
        if response.status != 200:
            raise invalid_request(
                f"Invalid '{param}': fetching the image URL failed with HTTP status {response.status}.", field=param
            )
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type not in IMAGE_MEDIA_TYPES:
            raise invalid_request(
                f"Invalid '{param}': the URL's content type {media_type or 'none'!r} is not a supported image type; "
                "use image/png, image/jpeg, image/gif or image/webp.",
                field=param,
            )
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            # We asked for identity: a compressed body would hide its real size until decompressed.
            raise invalid_request(f"Invalid '{param}': the image URL answered with a compressed body.", field=param)
        limit = self._policy.max_bytes
        if (response.content_length or 0) > limit:
            raise _too_big(param, limit)
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise _too_big(param, limit)  # leaving the block drops the connection: the rest is never read
        if not body:
            raise invalid_request(f"Invalid '{param}': the image URL returned an empty body.", field=param)
        return bytes(body), media_type

    def _check_url(self, url: str, param: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid_request(
                f"Invalid '{param}': an image URL must be an http(s) URL or a data: URL.", field=param
            )
        allowed = self._policy.allowed_hosts
        if allowed is not None and parts.hostname.lower() not in allowed:
            raise invalid_request(
                f"Invalid '{param}': the host '{parts.hostname}' is not allowed for remote images on this gateway.",
                field=param,
            )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Accept": "image/*", "Accept-Encoding": "identity"}, auto_decompress=False
            )
        return self._session


def _too_big(param: str, limit: int) -> GatewayError:
    return invalid_request(f"Invalid '{param}': the image at this URL is larger than {limit} bytes.", field=param)
