"""API-key authentication: `Authorization: Bearer <key>` against the configured keys, in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from bridge.errors import OpenAIError


class KeyChecker:
    """Holds the configured keys as bytes and checks every one of them, so timing says nothing about which matched."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    def check(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise OpenAIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        presented = token.strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if scheme.lower() != "bearer" or not matched:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
