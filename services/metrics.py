"""The core's Prometheus metrics (OpenTelemetry GenAI names where one fits), and one completion's measurements.

The `gen_ai_*` metrics carry the GenAI conventions' attributes as labels (services/genai.py: dots become
underscores); `error_type` is the failure's status word, and "" (which Prometheus treats as absent) on success. The
`modelmax_*` metrics keep their own labels (`model`, `provider` as the catalog's kind, `status`).

Labels are bounded: the catalog's model names, provider kinds and deployments, a status from the ErrorReason enum, a
token type, and (unless turned off) the callers' key ids. A model name that is not in the catalog is recorded as
"unknown", so callers cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelmax.v1 import completion_pb2 as pb
from services.genai import OPERATION_CHAT, provider_name
from startup.labels import Children, process_metrics

# Seconds: from sub-millisecond gateway overhead to multi-minute generations.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# Tokens per request, as the OpenTelemetry GenAI conventions suggest (powers of 4).
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# The GenAI conventions' advice for gen_ai.client.operation.duration (seconds, doubling from 10 ms).
_CLIENT_DURATION = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


def status_of(reason: pb.ErrorReason.ValueType | None) -> str:
    """The `status` label: "ok", "cancelled", or the ErrorReason without its prefix, in lower case (the
    `error_type` label of a failure is the same word)."""
    if reason is None:
        return "ok"
    return pb.ErrorReason.Name(reason).removeprefix("ERROR_REASON_").lower()


class CoreMetrics:
    """Every metric the core exports, in one registry of its own (so tests can run several cores).

    `key_labels` adds the per-key counters (a series per key and model): an operator with many keys turns it off.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, key_labels: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        process_metrics(r, "core")  # first: it turns the _created series off before any metric here exists
        genai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model"]
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds", "Time to serve one completion, end to end in the core.",
            [*genai, "error_type"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "Time from the request to the first generated token.",
            [*genai, "error_type"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Time per generated token after the first.",
            [*genai, "error_type"], buckets=_PER_TOKEN, registry=r,
        )  # fmt: skip
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens per completion, by type (input: prompt, output: completion).",
            [*genai, "gen_ai_token_type"], buckets=_TOKENS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "modelmax_core_requests", "Completions served, by outcome.", ["model", "provider", "status"], registry=r
        )
        self.upstream_errors = Counter(
            "modelmax_core_upstream_errors", "Failures reported by providers, by reason.",
            ["model", "provider", "reason"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "modelmax_core_retries", "Tries of the same deployment again after a retryable failure.",
            ["model", "provider"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "modelmax_core_fallbacks", "Moves to the next deployment of a model after a failure.", ["model"], registry=r
        )
        self.inflight = Gauge(
            "modelmax_core_inflight_streams", "Completions in progress.", ["model", "provider"], registry=r
        )
        self.overhead = Histogram(
            "modelmax_core_overhead_seconds",
            "The core's own time per completion: total time minus time waiting on the provider.",
            ["model", "provider"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        # One upstream call (one attempt: a retry or a fallback is another), from its request to its last byte or
        # its failure; `server_address` tells two regions of one model apart, `error_type` is "" on success.
        self.client_operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "Time of one call to an upstream deployment (one attempt).",
            [*genai, "server_address", "error_type"], buckets=_CLIENT_DURATION, registry=r,
        )  # fmt: skip
        # The labelled series the hot path records into, resolved once per label values.
        self.client_operation_duration_of = Children(self.client_operation_duration)
        self.request_duration_of = Children(self.request_duration)
        self.requests_of = Children(self.requests)
        self.overhead_of = Children(self.overhead)
        self.upstream_errors_of = Children(self.upstream_errors)
        self.time_to_first_token_of = Children(self.time_to_first_token)
        self.time_per_output_token_of = Children(self.time_per_output_token)
        self.token_usage_of = Children(self.token_usage)
        self.inflight_of = Children(self.inflight)
        self.retries_of = Children(self.retries)
        self.fallbacks_of = Children(self.fallbacks)
        # Per calling key (Measurement.key_id, the public id, never the secret): None when turned off.
        self.key_requests_of: Children[Counter] | None = None
        self.key_tokens_of: Children[Counter] | None = None
        if key_labels:
            self.key_requests_of = Children(
                Counter(
                    "modelmax_core_key_requests", "Completions per calling key, by error type (none when served).",
                    ["key_id", "gen_ai_request_model", "error_type"], registry=r,
                )
            )  # fmt: skip
            self.key_tokens_of = Children(
                Counter(
                    "modelmax_core_key_tokens", "Tokens per calling key, by type (input: prompt, output: completion).",
                    ["key_id", "gen_ai_request_model", "gen_ai_token_type"], registry=r,
                )
            )  # fmt: skip
        # A deployment label ("1:bedrock:deepseek.v3.2") to its upstream model, the gen_ai_response_model label:
        # split once per deployment, not once per completion.
        self._response_models: dict[str, str] = {}

    def response_model(self, deployment: str) -> str:
        """The upstream model of a deployment label ("index:kind:model"); "" when no deployment was tried."""
        model = self._response_models.get(deployment)
        if model is None:
            model = self._response_models[deployment] = deployment.split(":", 2)[-1]
        return model


class UsageBuffer(Protocol):
    @property
    def buffered(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def written(self) -> int: ...


class PolicyCounts(Protocol):
    """What the metrics read from the policy (services.policy.gate.Policy) at each scrape."""

    @property
    def store_errors(self) -> int: ...
    @property
    def limiter_errors(self) -> int: ...
    @property
    def writer(self) -> UsageBuffer | None: ...


class _PolicyCollector(Collector):
    """The policy's counters, read at scrape time: nothing on the request path."""

    def __init__(self, policy: PolicyCounts) -> None:
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        policy = self._policy
        yield CounterMetricFamily(
            "modelmax_core_policy_store_errors", "Policy store calls that failed (key lookups, budgets, settles).",
            value=policy.store_errors,
        )  # fmt: skip
        yield CounterMetricFamily(
            "modelmax_core_rate_limiter_errors",
            "Rate-limiter calls that failed (Redis unreachable or slow): served or refused as configured.",
            value=policy.limiter_errors,
        )
        writer = policy.writer
        if writer is None:
            return
        yield CounterMetricFamily(
            "modelmax_core_usage_records_written", "Usage records the policy store accepted.", value=writer.written
        )
        yield CounterMetricFamily(
            "modelmax_core_usage_records_dropped",
            "Usage records lost: the buffer was full, or the shutdown drain gave up on a failing store.",
            value=writer.dropped,
        )
        yield GaugeMetricFamily(
            "modelmax_core_usage_records_buffered", "Usage records waiting to be written.", value=writer.buffered
        )


def watch_policy(metrics: CoreMetrics, policy: PolicyCounts) -> None:
    metrics.registry.register(_PolicyCollector(policy))


class Queued(Protocol):
    """A provider with a queue of its own (the embedded model's worker): its depth is a gauge."""

    def queue_depth(self) -> int: ...


class _QueueCollector(Collector):
    """modelmax_core_local_queue_depth{model}: read at each scrape, so the hot path pays nothing for it."""

    def __init__(self, queued: Mapping[str, Sequence[Queued]]) -> None:
        self._queued = queued

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modelmax_core_local_queue_depth",
            "Requests waiting for the embedded model's worker, the running one aside (beyond max_queue: 503).",
            labels=["model"],
        )
        for model, providers in self._queued.items():
            family.add_metric([model], sum(provider.queue_depth() for provider in providers))
        yield family


def watch_queues(metrics: CoreMetrics, providers: Mapping[str, Sequence[object]]) -> None:
    """Export the queue depth of every deployment whose provider has a queue (`Queued`), by public model name."""
    queued = {
        model: [cast(Queued, provider) for provider in deployments if hasattr(provider, "queue_depth")]
        for model, deployments in providers.items()
    }
    metrics.registry.register(_QueueCollector({model: found for model, found in queued.items() if found}))


class Deployed(Protocol):
    """What the deployment state gauge reads of a deployment (services.dispatch.Deployment)."""

    @property
    def label(self) -> str: ...
    @property
    def kind(self) -> str: ...
    def available(self, now: float) -> bool: ...


class Routed(Protocol):
    """What the deployment state gauge reads of a route (services.dispatch.Route)."""

    @property
    def name(self) -> str: ...
    @property
    def deployments(self) -> Sequence[Deployed]: ...


class _DeploymentCollector(Collector):
    """modelmax_core_deployment_state: each deployment's state (1) and the state it is not in (0), read at scrape
    time from the routes themselves, so the hot path pays nothing for it."""

    def __init__(self, routes: Mapping[str, Routed]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modelmax_core_deployment_state",
            "1 for the state each deployment is in: healthy, or cooling_down after repeated failures (skipped).",
            labels=["gen_ai_request_model", "deployment", "gen_ai_provider_name", "state"],
        )
        now = time.monotonic()  # the clock Route.failed sets cooldowns by
        for route in self._routes.values():
            for deployment in route.deployments:
                healthy = deployment.available(now)
                labels = [route.name, deployment.label, provider_name(deployment.kind)]
                family.add_metric([*labels, "healthy"], 1 if healthy else 0)
                family.add_metric([*labels, "cooling_down"], 0 if healthy else 1)
        yield family


def watch_deployments(metrics: CoreMetrics, routes: Mapping[str, Routed]) -> None:
    """Export the state of every deployment of `routes` (the dispatcher's own, so cooldowns show as they happen)."""
    metrics.registry.register(_DeploymentCollector(routes))


@dataclass(slots=True)
class Measurement:
    """One completion's timings and counts, and the deployment that served it; recorded once when it ends.

    `provider` starts as the route's first deployment's kind and follows each try (`serving`), so a completion that
    fell back from Bedrock to Gemini is counted, in flight and at the end, as Gemini's: never the first one's. The
    same goes for `deployment`, whose upstream model is the `gen_ai_response_model` label.
    """

    model: str
    provider: str
    metrics: CoreMetrics
    started: float = field(default_factory=time.perf_counter)
    provider_wait: float = 0.0
    first_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    deployment: str = ""  # the deployment tried last, or serving once one started
    attempts: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    output_chars: int = 0  # text and tool arguments relayed: the estimate of a stream cut before its usage
    key_id: str = ""  # the calling key's public id, once authenticated ("" before, or for a refused credential)

    def __post_init__(self) -> None:
        self.metrics.inflight_of(self.model, self.provider).inc()

    def serving(self, deployment: str, provider: str, attempts: int) -> None:
        """The completion is now being tried on (or served by) `deployment`, of provider kind `provider`."""
        self.deployment, self.attempts = deployment, attempts
        if provider != self.provider:
            inflight = self.metrics.inflight_of
            inflight(self.model, self.provider).dec()
            inflight(self.model, provider).inc()
            self.provider = provider

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def overhead(self) -> float:
        return max(0.0, time.perf_counter() - self.started - self.provider_wait)

    def record(self, status: str, upstream_reason: str | None) -> float:
        """Record into the metrics (and leave the in-flight gauge); returns the total duration in seconds."""
        metrics = self.metrics
        now = time.perf_counter()
        total = now - self.started
        model, provider = self.model, self.provider
        metrics.inflight_of(model, provider).dec()
        metrics.requests_of(model, provider, status).inc()
        metrics.overhead_of(model, provider).observe(max(0.0, total - self.provider_wait))
        if upstream_reason is not None:
            metrics.upstream_errors_of(model, provider, upstream_reason).inc()
        error = "" if status == "ok" else status
        genai = (OPERATION_CHAT, provider_name(provider), model, metrics.response_model(self.deployment))
        metrics.request_duration_of(*genai, error).observe(total)
        if self.first_token is not None:
            metrics.time_to_first_token_of(*genai, error).observe(self.first_token - self.started)
            if self.completion_tokens and self.completion_tokens > 1:
                per_token = (now - self.first_token) / (self.completion_tokens - 1)
                metrics.time_per_output_token_of(*genai, error).observe(per_token)
        if self.prompt_tokens is not None:
            metrics.token_usage_of(*genai, "input").observe(self.prompt_tokens)
        if self.completion_tokens is not None:
            metrics.token_usage_of(*genai, "output").observe(self.completion_tokens)
        key = self.key_id
        if key and metrics.key_requests_of is not None and metrics.key_tokens_of is not None:
            metrics.key_requests_of(key, model, error).inc()
            if self.prompt_tokens:
                metrics.key_tokens_of(key, model, "input").inc(self.prompt_tokens)
            if self.completion_tokens:
                metrics.key_tokens_of(key, model, "output").inc(self.completion_tokens)
        return total
