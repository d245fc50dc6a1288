"""`python -m bench.otlp_sink PORT`: an OTLP/gRPC trace receiver that accepts every export and keeps nothing.

What a collector costs the gateway is its side of the export (encoding, the gRPC call); this sink answers at once, so
`bench.keys --traces` measures the gateway's tracing and not a collector's. It prints the spans received on exit.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as collector_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as collector_grpc


class _Sink(collector_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0

    async def Export(  # noqa: N802 (the collector's method name)
        self, request: collector_pb.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> collector_pb.ExportTraceServiceResponse:
        self.spans += sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
        return collector_pb.ExportTraceServiceResponse()


async def _serve(port: int) -> None:
    sink = _Sink()
    server = grpc.aio.server()
    collector_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(grace=5)
    print(f"otlp sink: {sink.spans:,} spans received", flush=True)


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
