"""What every dialect reads from a core call, whatever words it uses: the core's ErrorInfo (reason, field, retry
delay) of a failed call, and the key's x-ratelimit-* values of the initial metadata (services/policy/limits.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "modelmax.v1"
_STATUS_DETAILS = "grpc-status-details-bin"  # where gRPC carries a google.rpc.Status
_RATE_LIMIT = "x-ratelimit-"
NO_LIMITS: Mapping[str, str] = MappingProxyType({})


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The core's ErrorInfo: a detail of the google.rpc.Status in the call's trailing metadata."""
    trailing = cast(Iterable[tuple[str, str | bytes]], exc.trailing_metadata() or ())  # aio: pairs, as iterated
    for key, value in trailing:
        if key == _STATUS_DETAILS and isinstance(value, bytes):
            return _domain_info(status_pb2.Status.FromString(value))
    return None


def _domain_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:  # Unpack is False for another detail type
            return info
    return None


def retry_delay(info: error_details_pb2.ErrorInfo) -> float | None:
    """The core's `retry_after` (seconds): finite and non-negative, or None. Retry-After headers are made of it."""
    value = info.metadata.get("retry_after")
    try:
        seconds = None if value is None else float(value)
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def rate_limit_headers(metadata: object) -> Mapping[str, str]:
    """The x-ratelimit-* values of the core's metadata (a key with rate limits: a stream's initial metadata, a whole
    answer's trailers), as response headers."""
    if not metadata:
        return NO_LIMITS
    found = {
        key: value
        for key, value in cast(Iterable[tuple[str, str | bytes]], metadata)
        if key.startswith(_RATE_LIMIT) and isinstance(value, str)
    }
    return found or NO_LIMITS
