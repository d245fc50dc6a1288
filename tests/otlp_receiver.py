"""OTLP trace receivers on 127.0.0.1 for tests: the collector's own gRPC TraceService, and OTLP/HTTP (protobuf).

Both decode what arrives into `ReceivedSpan`s (ids as hex, attributes as Python values, the sender's service.name),
so a test asserts on what a collector would have stored, exported by the real SDK over the real wire protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as collector_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as collector_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.serve import serve

KINDS = {
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str  # "server", "client", "internal"
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    error: bool  # status ERROR

    def __repr__(self) -> str:  # a failed assertion lists the spans readably
        return f"<{self.service} {self.kind} {self.name!r} {self.span_id}<-{self.parent_span_id or '-'}>"


@dataclass
class Received:
    """Every span a receiver was sent, in arrival order."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, request: collector_pb.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            kind=KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            error=span.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                        )
                    )
        self.arrived.set()

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]


class _TraceService(collector_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    async def Export(  # noqa: N802 (the collector's method name)
        self, request: collector_pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> collector_pb.ExportTraceServiceResponse:
        self._received.add(request)
        return collector_pb.ExportTraceServiceResponse()


@asynccontextmanager
async def otlp_grpc_receiver() -> AsyncIterator[tuple[str, Received]]:
    """An OTLP/gRPC receiver; yields its endpoint ("http://127.0.0.1:PORT", as OTEL_EXPORTER_OTLP_ENDPOINT takes it)
    and what it receives."""
    received = Received()
    server = grpc.aio.server()
    collector_grpc.add_TraceServiceServicer_to_server(_TraceService(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(grace=None)


@asynccontextmanager
async def otlp_http_receiver() -> AsyncIterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver (protobuf bodies on POST /v1/traces); yields its root URL and what it receives."""
    received = Received()

    async def export(request: Request) -> Response:
        if request.headers.get("content-type") != "application/x-protobuf":
            return Response(status_code=415)
        received.add(collector_pb.ExportTraceServiceRequest.FromString(await request.body()))
        body = collector_pb.ExportTraceServiceResponse().SerializeToString()
        return Response(body, media_type="application/x-protobuf")

    async with serve(Starlette(routes=[Route("/v1/traces", export, methods=["POST"])])) as url:
        yield url, received


def _attributes(pairs: Iterable[Any]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None
