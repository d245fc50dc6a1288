"""OpenTelemetry traces for the core and the bridge: off unless configured, OTLP export, W3C trace context.

Configured only by the standard `OTEL_*` environment variables, from the process entry points (`configure`), never at
import time. Tracing is on when `OTEL_TRACES_EXPORTER` is `otlp`, or when it is unset and an OTLP endpoint is
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`); `OTEL_SDK_DISABLED=true`, any other
`OTEL_TRACES_EXPORTER` (`none`) or no variable at all leaves it off. Off, no TracerProvider exists and `current` is
None: the hot path checks that one module attribute per request and creates nothing.

On, spans go through a BatchSpanProcessor (`OTEL_BSP_*`) to an OTLP exporter over gRPC or HTTP/protobuf
(`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else http/protobuf as the specification
says), with the exporter's own endpoint, header and timeout variables; the SDK reads `OTEL_TRACES_SAMPLER(_ARG)` for
head sampling and `OTEL_RESOURCE_ATTRIBUTES`. `service.name` is `OTEL_SERVICE_NAME`, else the process's own name
(modelmax-core, modelmax-bridge). `shutdown` exports what is still buffered: the processes call it when they drain.

The provider is ModelMax's own, not installed as the API's global one, so nothing else in the process exports
through it. Trace context travels as W3C `traceparent` and `tracestate`, in HTTP headers and gRPC metadata alike.
Prompts and completions are not recorded (spans carry counts, names and outcomes) unless the operator opts in with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`: then each upstream attempt's span also carries the
conventions' `gen_ai.system_instructions`, `gen_ai.input.messages` and `gen_ai.output.messages` (text and tool
calls; never images, reasoning or keys).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import Span as Span
from opentelemetry.trace import SpanKind as SpanKind
from opentelemetry.trace import Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# The GenAI instrumentations' switch for recording message content, read here too; anything but "true" is off.
CAPTURE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
_PROTOCOLS: Final = ("grpc", "http/protobuf")
_W3C: Final = TraceContextTextMapPropagator()

Context = context_api.Context


class Tracing:
    """The process's tracer and the provider behind it (which owns the exporter)."""

    __slots__ = ("capture_content", "provider", "tracer")

    def __init__(self, provider: TracerProvider, *, capture_content: bool = False) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("modelmax")
        # The operator's opt-in to prompts and completions on the attempt spans (CAPTURE_CONTENT, below); off, spans
        # carry counts, names and outcomes only.
        self.capture_content = capture_content

    def start(
        self, name: str, kind: SpanKind, parent: Context | None, attributes: Mapping[str, AttributeValue]
    ) -> Span:
        """A started span, child of `parent` (a context from `parent_of` or `context_of`; None: a new trace)."""
        return self.tracer.start_span(name, parent, kind, attributes)


# The process's tracing once `configure` turned it on; None (the default) means off.
current: Tracing | None = None


def enabled(env: Mapping[str, str]) -> bool:
    """Whether `env` turns tracing on (the rule in the module's docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return "otlp" in (name.strip() for name in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service_name: str) -> Tracing | None:
    """Turn tracing on for this process if its environment says so; returns it (also kept in `current`), or None.

    Raises ValueError for an OTLP protocol it does not know, so a process refuses to start on a typo."""
    global current
    env = os.environ
    if not enabled(env):
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    protocol = protocol.strip().lower() or "http/protobuf"
    if protocol not in _PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL must be one of {', '.join(_PROTOCOLS)}: {protocol!r}")
    # The SDK and its exporters are imported only here: a process with tracing off never loads them.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME", "").strip() or service_name})
    provider = SdkTracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    processor: SpanProcessor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    current = Tracing(provider, capture_content=env.get(CAPTURE_CONTENT, "").strip().lower() == "true")
    log.info("tracing on: OTLP over %s as %s", protocol, resource.attributes[SERVICE_NAME])
    return current


def shutdown() -> None:
    """Export the spans still buffered and stop the exporter; tracing is off afterwards. A no-op when it is off."""
    global current
    tracing, current = current, None
    if tracing is not None:
        tracing.provider.shutdown()


def parent_of(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    """The remote parent a caller sent as W3C trace context; None when it sent none (or an invalid one)."""
    if not traceparent:
        return None
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    extracted = _W3C.extract(carrier)
    return extracted if trace.get_current_span(extracted).get_span_context().is_valid else None


def parent_in(pairs: Sequence[tuple[str, str | bytes]] | None) -> Context | None:
    """The remote parent in gRPC metadata or decoded HTTP header pairs (lower-case names)."""
    traceparent = tracestate = None
    for key, value in pairs or ():
        if key == TRACEPARENT and isinstance(value, str):
            traceparent = value
        elif key == TRACESTATE and isinstance(value, str):
            tracestate = value
    return parent_of(traceparent, tracestate)


def context_of(span: Span) -> Context:
    """A context whose current span is `span`: the parent of its children, or what `attach` makes current."""
    return trace.set_span_in_context(span)


def headers_of(span: Span) -> tuple[tuple[str, str], ...]:
    """`span`'s W3C trace context as header (or metadata) pairs: what a callee needs to continue the trace."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context_of(span))
    return tuple(carrier.items())


def outgoing() -> tuple[tuple[str, str], ...]:
    """The W3C trace context of the current span (an upstream attempt's, made current by the core's dispatch) as
    header pairs for an outgoing HTTP request; empty when tracing is off or no span is current."""
    if current is None:
        return ()
    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return ()
    return headers_of(span)


def attach(span: Span) -> object:
    """Make `span` current in this task until `detach(token)`, so that outgoing calls carry its trace context."""
    return context_api.attach(context_of(span))


def detach(token: object) -> None:
    context_api.detach(token)  # type: ignore[arg-type]  # the Token `attach` returned


def end(span: Span, error_type: str = "", attributes: Mapping[str, AttributeValue] | None = None) -> None:
    """Set `attributes`, mark a failure (`error.type`, status ERROR) unless `error_type` is "", and end `span`."""
    if attributes:
        span.set_attributes(attributes)
    if error_type:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))
    span.end()
