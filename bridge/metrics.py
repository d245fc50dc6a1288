"""The bridge's Prometheus metrics, and one HTTP request's observation (metrics, overhead, its JSON log line).

Labels are bounded: `model` is a catalog model name or "unknown" (a name the core has not served is never a label
value), `status` an HTTP status code, `stream` true or false.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from startup.labels import Children, process_metrics

requests_log = logging.getLogger("bridge.requests")

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_MAX_REQUEST_ID = 128


class BridgeMetrics:
    """Every metric the bridge exports, in a registry of its own, plus the model names it may use as labels."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.known_models: set[str] = set()
        r = self.registry
        process_metrics(r, "bridge")  # first: it turns the _created series off before any metric here exists
        self.requests = Counter(
            "modelmax_bridge_requests", "Chat completion requests, by HTTP status.", ["model", "status"], registry=r
        )
        self.duration = Histogram(
            "modelmax_bridge_request_duration_seconds", "Time to serve a chat completion request, to its last byte.",
            ["model", "stream"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.time_to_first_chunk = Histogram(
            "modelmax_bridge_time_to_first_chunk_seconds", "Time from the request to the first SSE chunk.",
            ["model"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.inflight = Gauge("modelmax_bridge_inflight_streams", "SSE streams open.", ["model"], registry=r)
        self.overhead = Histogram(
            "modelmax_bridge_overhead_seconds",
            "The bridge's own time per request: total time minus time waiting on the core.",
            ["model"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.transport_refusals = Counter(
            "modelmax_bridge_transport_refusals",
            "Connections the HTTP transport refused or closed, by reason (bridge/transport.py).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.buffered_bytes = Gauge(
            "modelmax_bridge_buffered_body_bytes", "Request body bytes being read or parsed now.", registry=r
        )
        # The labelled series the hot path records into, resolved once per label values.
        self.requests_of = Children(self.requests)
        self.duration_of = Children(self.duration)
        self.time_to_first_chunk_of = Children(self.time_to_first_chunk)
        self.inflight_of = Children(self.inflight)
        self.overhead_of = Children(self.overhead)

    def label(self, model: str, status: int) -> str:
        """`model` once the core has served it (so it is in the catalog), else "unknown"."""
        if model in self.known_models:
            return model
        if status < 400 and model:
            self.known_models.add(model)
            return model
        return "unknown"


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when it is a sane token (printable ASCII, no space), else a new one.

    ASCII only: the header arrives decoded as latin-1, where bytes 0xA1-0xFF are printable characters, but the id
    goes to the core as gRPC metadata, which takes printable ASCII alone."""
    if header and len(header) <= _MAX_REQUEST_ID and header.isascii() and header.isprintable() and " " not in header:
        return header
    return uuid.uuid4().hex


@dataclass(slots=True)
class Observation:
    """One request: timings, then (on a metered route) one record of metrics and one log line when it ends."""

    metrics: BridgeMetrics
    request_id: str
    metered: bool = True  # counted in the metrics and logged: the chat-completion routes
    key_id: str = ""  # the caller's Identity.key_id once authenticated; never the key
    model: str = ""
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    core_wait: float = 0.0
    first_chunk: float | None = None
    core_overhead_ms: float | None = None
    stream_status: int = 0  # a stream that ended with an error event: that error's HTTP status
    done: bool = False

    def overhead_ms(self) -> float:
        """The bridge's own time so far, plus the core's when it reported it."""
        own = max(0.0, time.perf_counter() - self.started - self.core_wait) * 1000
        return own + (self.core_overhead_ms or 0.0)

    def chunk(self) -> None:
        if self.first_chunk is None:
            self.first_chunk = time.perf_counter()

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        if not self.metered:
            return
        now = time.perf_counter()
        model = self.metrics.label(self.model, status)
        self.metrics.requests_of(model, str(status)).inc()
        self.metrics.duration_of(model, "true" if self.stream else "false").observe(now - self.started)
        self.metrics.overhead_of(model).observe(max(0.0, now - self.started - self.core_wait))
        if self.first_chunk is not None:
            self.metrics.time_to_first_chunk_of(model).observe(self.first_chunk - self.started)
        if not requests_log.isEnabledFor(logging.INFO):
            return  # the line's fields cost more than the check
        requests_log.info(
            "request",
            extra={
                "request_id": self.request_id,
                "key_id": self.key_id,
                "model": model,
                "stream": self.stream,
                "status": status,
                "duration_ms": round((now - self.started) * 1000, 3),
                "overhead_ms": round(self.overhead_ms(), 3),
            },
        )
