"""A gRPC channel to the core that authenticates like any internal caller: its key in `authorization` metadata."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from tests.conftest import API_KEY


class _WithKey:
    """Adds `authorization: Bearer <key>` to every call's metadata, after whatever the call itself sends."""

    def __init__(self, key: str) -> None:
        self._pair = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._pair)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryWithKey(_WithKey, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


# grpc.aio files each interceptor under the first call type it implements, so each type needs its own object.
class _StreamWithKey(_WithKey, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


def core_channel(
    target: str, key: str = API_KEY, *, credentials: grpc.ChannelCredentials | None = None, **kwargs: Any
) -> grpc.aio.Channel:
    """An aio channel to `target` whose calls carry `key` (the tests' static key unless told): plaintext, or TLS with
    `credentials` (grpc.ssl_channel_credentials; pass `options=[("grpc.ssl_target_name_override", name)]` to verify
    another name than the target's host)."""
    interceptors = [_UnaryWithKey(key), _StreamWithKey(key)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors, **kwargs)
    return grpc.aio.secure_channel(target, credentials, interceptors=interceptors, **kwargs)
