"""What an API dialect gives the pipeline: its error type, and its wording of the pipeline's own refusals.

The pipeline (bridge/pipeline.py) turns requests away for reasons no dialect owns: no key, a wrong key, no free
slot, a body too large or not JSON, an unknown path or method, a bug. It raises `Refused` with one of these reasons,
and the route's `Dialect` words it for its clients (OpenAI's `{"error": {...}}`, Anthropic's `{"type": "error",
...}`). A dialect's handlers raise their own `DialectError` subclass, which the pipeline sends as it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from starlette.responses import Response

if TYPE_CHECKING:
    from bridge.auth import Identity, RawHeaders

_NONE: Mapping[str, str] = MappingProxyType({})


class Refusal(enum.Enum):
    """Why the pipeline turned a request away before (or instead of) its handler."""

    MISSING_KEY = enum.auto()  # 401: no Authorization header
    INVALID_KEY = enum.auto()  # 401: a header, but not a configured key
    DUPLICATE_HEADER = enum.auto()  # 400: detail "header", a header that must come once came more than once
    OVERLOADED = enum.auto()  # 503: every slot is taken (Retry-After)
    UNSUPPORTED_MEDIA_TYPE = enum.auto()  # 415: the route takes JSON
    BODY_TOO_LARGE = enum.auto()  # 413: detail "limit", the limit in bytes
    HEADERS_TOO_LARGE = enum.auto()  # 431: detail "limit", the head's limit in bytes (bridge/transport.py)
    REQUEST_TIMEOUT = enum.auto()  # 408: detail "part", "headers" or "body", which did not arrive in time
    BODY_INCOMPLETE = enum.auto()  # 400: the client stopped sending before its Content-Length was in
    NOT_FOUND = enum.auto()  # 404: details "method" and "path"
    METHOD_NOT_ALLOWED = enum.auto()  # 405: details "method" and "path" (Allow)
    INTERNAL = enum.auto()  # 500: a bug, logged once by the pipeline


class Refused(Exception):
    """The pipeline's refusal: a reason, the details its wording may use, and HTTP headers it must carry."""

    def __init__(
        self, refusal: Refusal, details: Mapping[str, str] = _NONE, headers: Mapping[str, str] = _NONE
    ) -> None:
        super().__init__(refusal.name)
        self.refusal = refusal
        self.details = details
        self.headers = headers


class DialectError(Exception):
    """An error as one dialect's clients expect it: an HTTP status, and a body and headers in its shape."""

    status: int

    def response(self, headers: Mapping[str, str]) -> Response:
        """The error response; `headers` (the pipeline's, such as x-request-id) come first."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Dialect:
    """One API dialect as the pipeline sees it: a name, where its clients put their key, and its error for each
    refusal of the pipeline."""

    name: str
    error_for: Callable[[Refused], DialectError]
    credential: Callable[[RawHeaders], Identity]  # the key presented (bridge/auth.py), or Refused
