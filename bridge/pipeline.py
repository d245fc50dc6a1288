"""The one request pipeline: route -> credential -> identity -> bounded body -> admission -> the dialect's handler.

Every HTTP request takes these steps in this order, as plain function calls from `serve`; no route skips one, and
there is no middleware stack between them. A route declared `public` (the Kubernetes probes) is let through without
a key and without a slot; that is the only difference between routes, and it is declared in the route table
(bridge/app.py), where a test reads it.

The steps are cheap by construction: the route of a fixed path is one dict lookup, the key is forwarded to the core
in the call's metadata (the core authenticates every call, so there is no second check here to keep in step), the
slot is a counter, a body that arrives in one message is used as it is, and the request's metrics are recorded
once its last byte is out (`Observation.finish`), not on the client's critical path. Failures raise `Refused` or
the dialect's own `DialectError`; the route's dialect words them (bridge/dialect.py).

The slot is taken once the body is in (a client stuck mid-upload holds none; a request finding no free slot is
refused before its body is read), and a body counts against the process's cap on buffered bytes from its first
byte until its handler has parsed it.

With tracing on (startup/tracing.py), each request to a route that is not public is one SERVER span, from its head to
its last byte, child of the caller's W3C `traceparent`; the calls to the core carry the span's trace context in their
metadata, so the core's spans are its children. Off, the request pays one check.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from grpc_health.v1 import health_pb2_grpc
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from bridge.auth import Identity
from bridge.dialect import Dialect, DialectError, Refusal, Refused
from bridge.metrics import BridgeMetrics, Observation, request_id_from
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from modelmax.v1 import key_service_pb2_grpc
from startup import tracing

log = logging.getLogger(__name__)

# Headers and gRPC metadata the gateway shares across dialects.
REQUEST_ID = "x-request-id"  # sent to the core and returned on every response of an authenticated route
AUTHORIZATION = "authorization"  # the caller's key, forwarded to the core, which checks it
OVERHEAD = "x-modelmax-overhead-ms"  # the gateway's own time (bridge + core) on whole (non-streamed) responses
DEPLOYMENT = "x-modelmax-deployment"  # which catalog deployment served: "<position>:<provider>:<model>"
ATTEMPTS = "x-modelmax-attempts"  # tries it took, retries and fallbacks included

Metadata = tuple[tuple[str, str], ...]
Handler = Callable[["Exchange"], Awaitable[Response]]

_RETRY_AFTER: Mapping[str, str] = MappingProxyType({"retry-after": "1"})  # an overloaded gateway frees up fast
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the route table: a method and path, the dialect's handler, and what the pipeline owes it."""

    method: str  # a GET route answers HEAD too
    path: str  # fixed, or ending in "{name}", which matches the rest of the path, slashes included
    handler: Handler
    dialect: Dialect  # words this route's refusals
    public: bool = False  # no key and no slot: only the health probes
    json_body: bool = False  # the body must be JSON: a 415 before it is read
    metered: bool = False  # counted in the request metrics and log line


@dataclass(slots=True)
class Gateway:
    """What the pipeline and the handlers share for the life of the process: one channel to the core, settings."""

    stub: svc_grpc.CompletionServiceAsyncStub
    health: health_pb2_grpc.HealthStub
    max_body_bytes: int
    timeout: float
    metrics: BridgeMetrics
    max_concurrent: int = 1024
    active: int = 0  # requests holding a slot now (a stream holds its slot until its last byte)
    keys: key_service_pb2_grpc.KeyServiceAsyncStub | None = None  # the admin API's (bridge/admin), same channel

    max_buffered_bytes: int = 32 * 1024 * 1024
    buffered: int = 0  # body bytes being read or parsed now, across requests
    ping_seconds: float = 10.0  # a streaming dialect's keep-alive event after this long without one from the core

    def admit(self) -> None:
        """Take a slot or refuse at once: never a queue. The pipeline gives the slot back."""
        if self.active >= self.max_concurrent:
            raise Refused(Refusal.OVERLOADED, headers=_RETRY_AFTER)
        self.active += 1

    def buffer(self, size: int) -> None:
        """Count `size` more body bytes held, or refuse (503) if that would pass the process's cap; the first
        request is always let in (its body is within max_body_bytes, which is within the cap)."""
        if self.buffered and self.buffered + size > self.max_buffered_bytes:
            raise Refused(Refusal.OVERLOADED, headers=_RETRY_AFTER)
        self.buffered += size


@dataclass(slots=True)
class Exchange:
    """One request as its handler receives it, once the pipeline has let it through."""

    request: Request
    gateway: Gateway
    seen: Observation
    identity: Identity | None  # None only on a public route
    metadata: Metadata  # for every call to the core: the request id and the caller's key
    body: bytes  # read whole, within max_body_bytes


class RouteTable:
    """The routes as declared, and their lookup: one dict get for a fixed path, a prefix scan for the others."""

    def __init__(self, routes: Iterable[Route], fallback: Dialect) -> None:
        self.routes = tuple(routes)
        self.fallback = fallback  # words the 404 of a path that no route declares
        self._fixed: dict[str, dict[str, Route]] = {}
        self._prefixed: dict[str, tuple[str, dict[str, Route]]] = {}  # prefix -> (parameter name, by method)
        for route in self.routes:
            prefix, brace, name = route.path.partition("{")
            if brace:
                methods = self._prefixed.setdefault(prefix, (name.removesuffix("}"), {}))[1]
            else:
                methods = self._fixed.setdefault(route.path, {})
            for method in (route.method, "HEAD") if route.method == "GET" else (route.method,):
                if method in methods:
                    raise ValueError(f"two routes for {method} {route.path}")
                methods[method] = route

    def methods(self, scope: Scope) -> dict[str, Route] | None:
        """The routes of the request's path by method; sets the scope's path_params for a parameterised path."""
        path: str = scope["path"]
        methods = self._fixed.get(path)
        if methods is not None:
            return methods
        for prefix, (name, by_method) in self._prefixed.items():
            if path.startswith(prefix):
                scope["path_params"] = {name: path[len(prefix) :]}
                return by_method
        return None


async def serve(gateway: Gateway, table: RouteTable, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one HTTP request."""
    methods = table.methods(scope)
    route = None if methods is None else methods.get(scope["method"])
    if route is None:
        await _miss(table, methods, scope)(scope, receive, send)
        return
    request = Request(scope, receive)
    headers = request.headers
    seen = Observation(gateway.metrics, request_id_from(headers.get(REQUEST_ID)), route.metered)
    span = None
    if tracing.current is not None and not route.public:  # off, a request pays this one check
        span = _server_span(tracing.current, route, scope, request)
    admitted = False
    held = _Held(gateway)
    status = 499  # unless a response is sent: the client (or the server) went away first
    try:
        try:
            identity = None
            if not route.public:
                identity = route.dialect.credential(scope["headers"])  # the core checks it
                seen.key_id = identity.key_id
                if gateway.active >= gateway.max_concurrent:  # no slot to serve it with: do not read its body
                    raise Refused(Refusal.OVERLOADED, headers=_RETRY_AFTER)
            if route.json_body:
                _require_json(headers.get("content-type", ""))
            body = await _read_body(receive, headers.get("content-length", ""), held)
            if not route.public:
                gateway.admit()  # only now: a client still uploading holds no slot
                admitted = True
            metadata = _metadata(seen.request_id, identity)
            if span is not None:
                metadata += tracing.headers_of(span)
            exchange = Exchange(request, gateway, seen, identity, metadata, body)
            del body
            try:
                response = await route.handler(exchange)
            finally:
                exchange.body = b""  # parsed: the handler's messages hold what is left of it
                held.release()
        except DialectError as exc:
            response = exc.response(_own_headers(route, seen))
        except Refused as exc:
            response = route.dialect.error_for(exc).response({**_own_headers(route, seen), **exc.headers})
        except ClientGone:
            return  # nobody is listening: no response
        except Exception:  # a bug: logged once here, answered with the dialect's 500
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = route.dialect.error_for(Refused(Refusal.INTERNAL)).response(_own_headers(route, seen))
        status = response.status_code
        await response(scope, receive, send)
    finally:
        held.release()
        if admitted:
            gateway.active -= 1
        seen.finish(status)  # after the last byte; a no-op when a stream already finished it
        if span is not None:
            _end_server_span(span, status)


def _server_span(tracer: tracing.Tracing, route: Route, scope: Scope, request: Request) -> tracing.Span:
    """The SERVER span of one request, named as the HTTP conventions say: "{method} {route}"."""
    headers = request.headers
    parent = tracing.parent_of(headers.get(tracing.TRACEPARENT), headers.get(tracing.TRACESTATE))
    attributes = {
        "http.request.method": scope["method"],
        "http.route": route.path,
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
    }
    return tracer.start(f"{scope['method']} {route.path}", tracing.SpanKind.SERVER, parent, attributes)


def _end_server_span(span: tracing.Span, status: int) -> None:
    if status == 499:  # no response was sent: the client went away first
        tracing.end(span, "cancelled")
        return
    tracing.end(span, str(status) if status >= 500 else "", {"http.response.status_code": status})


def _metadata(request_id: str, identity: Identity | None) -> Metadata:
    if identity is None:
        return ((REQUEST_ID, request_id),)
    return ((REQUEST_ID, request_id), (AUTHORIZATION, identity.authorization))


def _own_headers(route: Route, seen: Observation) -> Mapping[str, str]:
    return _NO_HEADERS if route.public else {REQUEST_ID: seen.request_id}


def _require_json(content_type: str) -> None:
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise Refused(Refusal.UNSUPPORTED_MEDIA_TYPE)


class ClientGone(Exception):
    """The client disconnected before a response started (while its body came in, or while the core started)."""


class _Held:
    """The body bytes one request counts in gateway.buffered (503 once the process holds max_buffered_bytes of
    bodies), given back once its handler has parsed them."""

    __slots__ = ("gateway", "size")

    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.size = gateway, 0

    def grow(self, size: int) -> None:
        if size > self.size:
            self.gateway.buffer(size - self.size)
            self.size = size

    def release(self) -> None:
        self.gateway.buffered -= self.size
        self.size = 0


async def _read_body(receive: Receive, length: str, held: _Held) -> bytes:
    """The whole body, refused (413) past max_body_bytes whether or not a Content-Length announced it, and counted
    in `held` from the start (the announced length) or as it comes (chunked)."""
    limit = held.gateway.max_body_bytes
    if length.isdigit():
        if int(length) > limit:
            raise _too_large(limit)
        held.grow(int(length))
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: the whole body in one message, used as it is
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        held.grow(size)  # beyond what a Content-Length announced, if any
        parts.append(part)
    return b"".join(parts)


def _too_large(limit: int) -> Refused:
    return Refused(Refusal.BODY_TOO_LARGE, {"limit": str(limit)})


def _miss(table: RouteTable, methods: dict[str, Route] | None, scope: Scope) -> Response:
    """No route for this request: a 405 naming the allowed methods, a redirect across a trailing slash, or a 404."""
    details = {"method": scope["method"], "path": URL(scope=scope).path}
    if methods:
        allow = {"allow": ", ".join(methods)}
        refused = Refused(Refusal.METHOD_NOT_ALLOWED, details, allow)
        return next(iter(methods.values())).dialect.error_for(refused).response(allow)
    path: str = scope["path"]
    if path != "/":  # as Starlette's router does: "/healthz/" redirects to "/healthz", and "/v1/models" the other way
        other = {**scope, "path": path.rstrip("/") if path.endswith("/") else path + "/"}
        if table.methods(other) is not None:
            return RedirectResponse(url=str(URL(scope=other)))
    return table.fallback.error_for(Refused(Refusal.NOT_FOUND, details)).response(_NO_HEADERS)
