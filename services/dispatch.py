"""Dispatch: which deployment serves a completion, in what order, and its retries, fallbacks, cooldowns and timeouts.

A public model name is a `Route` over one or more `Deployment`s (built once from the catalog and the providers).
`dispatch` tries them until one produces its first event, within one time budget: the route's
`retry.budget_seconds`, capped by the caller's gRPC deadline. A retryable failure before the first output retries the
same deployment (with backoff, or the upstream's Retry-After) and then falls back to the next; once a deployment has
produced output, the completion stays on it. Per process, in memory: a deployment's failures are counted where they
happen, and nothing needs a database.

Each try is an `Attempt`: one observation of `gen_ai_client_operation_duration_seconds`, and with tracing on one
CLIENT span `chat {upstream model}` (the GenAI conventions' inference span), made current while the provider sends its
request so that the request carries the span's traceparent. A failed try ends its attempt here; the try that
started ends its attempt when its stream ends (services/completion/relay.py), with the usage and finish reasons.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services import genai
from services.catalog import CatalogEntry, CooldownPolicy, RetryPolicy, TimeoutPolicy
from services.errors import GatewayError
from services.metrics import CoreMetrics, Measurement, status_of
from services.prices import Price
from services.providers import Provider, ProviderRegistry
from startup import tracing

R = pb.ErrorReason
# Worth another try of the same deployment (after a backoff), then of the next one.
RETRYABLE = frozenset(
    {R.ERROR_REASON_RATE_LIMITED, R.ERROR_REASON_UPSTREAM_UNAVAILABLE, R.ERROR_REASON_UPSTREAM_TIMEOUT}
)
# This deployment cannot serve (its model or its credentials are wrong): the next one may.
NEXT_DEPLOYMENT = frozenset({R.ERROR_REASON_MODEL_NOT_FOUND, R.ERROR_REASON_UPSTREAM_AUTH})

Events = AsyncGenerator[svc.StreamCompletionResponse, None]


@dataclass(slots=True)
class Deployment:
    """One deployment of a route at run time: its catalog configuration, the provider serving it, its failures."""

    config: CatalogEntry  # the catalog's deployment: provider kind, upstream model, options, weight, timeouts
    provider: Provider
    label: str  # "1:bedrock:deepseek.v3.2": catalog position, provider kind, upstream model
    failures: int = 0
    cooled_until: float = 0.0

    @property
    def kind(self) -> str:
        """The provider kind ("bedrock"), a metrics label."""
        return self.config.provider

    @property
    def weight(self) -> float | None:
        """The share of traffic; None: tried in list order."""
        return self.config.weight

    @property
    def timeouts(self) -> TimeoutPolicy:
        return self.config.timeouts

    def available(self, now: float) -> bool:
        return now >= self.cooled_until

    @property
    def provider_name(self) -> str:
        """gen_ai.provider.name: "aws.bedrock", "gcp.gemini", "openai", "llama.cpp"."""
        return genai.provider_name(self.config.provider)


class Attempt:
    """One try of one deployment: its client-side duration, and its CLIENT span when tracing is on.

    `end` records both, once; later calls do nothing, so every path out of a try may call it.
    """

    __slots__ = ("_metrics", "_model", "deployment", "started", "span", "_ended")

    def __init__(
        self,
        metrics: CoreMetrics,
        model: str,
        deployment: Deployment,
        parent: tracing.Context | None,
        params: pb.CompletionParams,
    ) -> None:
        self._metrics = metrics
        self._model = model  # the public name (gen_ai.request.model)
        self.deployment = deployment
        self._ended = False
        self.span: tracing.Span | None = None
        tracer = tracing.current
        if parent is not None and tracer is not None:
            provider = deployment.provider
            attributes: dict[str, str | int] = {
                "gen_ai.operation.name": genai.OPERATION_CHAT,
                "gen_ai.provider.name": deployment.provider_name,
                "gen_ai.request.model": model,
                "modelmax.deployment": deployment.label,
            }
            if provider.server_address:
                attributes["server.address"] = provider.server_address
                if provider.server_port is not None:
                    attributes["server.port"] = provider.server_port
            if tracer.capture_content:  # the operator opted in to content on spans (startup/tracing.py)
                messages, system = genai.input_messages(params)
                attributes["gen_ai.input.messages"] = messages
                if system is not None:
                    attributes["gen_ai.system_instructions"] = system
            name = f"{genai.OPERATION_CHAT} {deployment.config.model}"
            self.span = tracer.start(name, tracing.SpanKind.CLIENT, parent, attributes)
        self.started = time.perf_counter()

    @property
    def captures_content(self) -> bool:
        """Whether this try's span records the completion's content (the operator's opt-in)."""
        return self.span is not None and tracing.current is not None and tracing.current.capture_content

    def end(
        self,
        error_type: str = "",
        usage: pb.Usage | None = None,
        finish_reasons: tuple[str, ...] = (),
        output: str | None = None,
    ) -> None:
        """The try is over: "" for success, else its error type (an ErrorReason's label, or "cancelled"); `output`
        is gen_ai.output.messages when the span captures content."""
        if self._ended:
            return
        self._ended = True
        deployment = self.deployment
        upstream = deployment.config.model
        self._metrics.client_operation_duration_of(
            genai.OPERATION_CHAT, deployment.provider_name, self._model, upstream,
            deployment.provider.server_address, error_type,
        ).observe(time.perf_counter() - self.started)  # fmt: skip
        span = self.span
        if span is None:
            return
        attributes: dict[str, str | int | tuple[str, ...]] = {"gen_ai.response.model": upstream}
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
            if usage.cached_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.reasoning_tokens:
                attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        if finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = finish_reasons
        if output is not None:
            attributes["gen_ai.output.messages"] = output
        tracing.end(span, error_type, attributes)


@dataclass(slots=True)
class Route:
    """A public model name's deployments and the policies that drive them."""

    name: str
    deployments: list[Deployment]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cooldown: CooldownPolicy | None = None
    price: Price | None = None  # what callers pay for this name; None: unpriced
    rng: random.Random = field(default_factory=random.Random)
    # The features every deployment honours: a request is checked against it once, before any is tried, so a
    # fallback never lands on a deployment that would silently drop part of the request.
    supported: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.supported = frozenset.intersection(*(frozenset(d.provider.supported) for d in self.deployments))

    @property
    def kind(self) -> str:
        """The provider kind of the first deployment: the route's label until a deployment serves."""
        return self.deployments[0].kind

    def plan(self) -> list[Deployment]:
        """The deployments to try for one request, in order: by weight when weights are set, else as listed.

        Deployments cooling down are left out. Raises UPSTREAM_UNAVAILABLE, with a Retry-After, when all are.
        """
        if any(d.weight is not None for d in self.deployments):
            # Weighted order without replacement (Efraimidis-Spirakis); weight 0 deployments only as last resorts.
            weighted = [(self.rng.random() ** (1.0 / d.weight), d) for d in self.deployments if d.weight]
            weighted.sort(key=lambda pair: pair[0], reverse=True)
            ordered = [d for _, d in weighted] + [d for d in self.deployments if not d.weight]
        else:
            ordered = list(self.deployments)
        now = time.monotonic()
        usable = [d for d in ordered if d.available(now)]
        if not usable:
            wait = min(d.cooled_until for d in ordered) - now
            raise GatewayError(
                R.ERROR_REASON_UPSTREAM_UNAVAILABLE,
                f"Every deployment of '{self.name}' is failing; try again in {wait:.0f}s.",
                retry_after=wait,
            )
        return usable

    def failed(self, deployment: Deployment) -> None:
        if self.cooldown is None:
            return
        deployment.failures += 1
        if deployment.failures >= self.cooldown.failures:
            deployment.cooled_until = time.monotonic() + self.cooldown.seconds
            # Back from cooldown, one more failure sends it straight back: it has not proven itself yet.
            deployment.failures = self.cooldown.failures - 1

    def succeeded(self, deployment: Deployment) -> None:
        deployment.failures = 0

    def backoff(self, try_index: int, retry_after: float | None) -> float:
        """Seconds to wait before try `try_index + 1` of a deployment: the upstream's Retry-After when it gave one,
        else exponential backoff with full jitter."""
        if retry_after is not None:
            return max(0.0, retry_after)
        cap = min(self.retry.max_backoff_seconds, self.retry.initial_backoff_seconds * (2**try_index))
        return self.rng.uniform(0.0, cap)


@dataclass(slots=True)
class Started:
    """A completion one deployment has started: its first event, and the rest of its stream."""

    deployment: Deployment
    first: svc.StreamCompletionResponse | None  # None: the provider's stream ended before any output
    stream: Events
    attempts: int  # tries it took, retries and fallbacks included
    end: float | None  # loop time by which the whole completion must be done (the deployment's total timeout)
    attempt: Attempt  # the try that started: ended with the stream


def build_routes(registry: ProviderRegistry) -> dict[str, Route]:
    """One Route per catalog entry, its deployments in catalog order, each paired with its provider."""
    routes: dict[str, Route] = {}
    for entry in registry.catalog.entries:
        deployments = [
            Deployment(config, provider, f"{index}:{config.provider}:{config.model}")
            for index, (config, provider) in enumerate(zip(entry.routes(), registry.providers[entry.name], strict=True))
        ]
        routes[entry.name] = Route(entry.name, deployments, entry.retry, entry.cooldown, entry.price)
    return routes


class Dispatcher:
    """Routes by public model name and starts completions on their deployments."""

    def __init__(self, routes: Mapping[str, Route], metrics: CoreMetrics) -> None:
        self._routes = dict(routes)
        self._metrics = metrics

    def route(self, model: str) -> Route:
        """The route of a public model name; MODEL_NOT_FOUND for a name the catalog does not have."""
        route = self._routes.get(model)
        if route is None:
            raise GatewayError(
                R.ERROR_REASON_MODEL_NOT_FOUND,
                f"The model '{model}' does not exist or you do not have access to it.",
                field="model",
            )
        return route

    async def dispatch(
        self,
        route: Route,
        params: pb.CompletionParams,
        measurement: Measurement,
        *,
        incremental: bool,
        time_remaining: float | None,
        trace: tracing.Context | None = None,
    ) -> Started:
        """Try the route's deployments until one produces its first event; raise the last failure if none does.

        `time_remaining` is the caller's gRPC deadline in seconds from now (None: no deadline); it caps the route's
        retry budget, so no backoff sleeps past the point where the caller has stopped waiting. Each try counts in
        `measurement` (`serving` names the deployment tried or serving, for metrics and logs). `trace` is the context
        of the core's span of the call when tracing is on: each try's span is its child.
        """
        budget = route.retry.budget_seconds
        if time_remaining is not None:
            budget = min(budget, max(0.0, time_remaining))
        deadline = time.monotonic() + budget
        attempts = 0
        failure: GatewayError | None = None
        for position, deployment in enumerate(route.plan()):
            if position > 0:
                self._metrics.fallbacks_of(measurement.model).inc()
            for try_index in range(route.retry.attempts):
                if try_index > 0:
                    self._metrics.retries_of(measurement.model, deployment.kind).inc()
                attempts += 1
                measurement.serving(deployment.label, deployment.kind, attempts)
                attempt = Attempt(self._metrics, measurement.model, deployment, trace, params)
                stream = deployment.provider.stream(params, incremental=incremental)
                limits = deployment.timeouts
                loop_now = asyncio.get_running_loop().time()
                end = None if limits.total_seconds is None else loop_now + limits.total_seconds
                first_by = end if limits.first_token_seconds is None else loop_now + limits.first_token_seconds
                if end is not None and first_by is not None:
                    first_by = min(first_by, end)
                # The provider sends its request on the first `next_event`: with its span current, it carries it.
                token = None if attempt.span is None else tracing.attach(attempt.span)
                try:
                    # Pre-stream failures surface here, and so does a provider that never starts answering.
                    first = await next_event(stream, measurement, first_by, deployment.label)
                except GatewayError as exc:
                    attempt.end(status_of(exc.reason))
                    await stream.aclose()
                    if exc.reason not in RETRYABLE and exc.reason not in NEXT_DEPLOYMENT:
                        raise  # the request itself is wrong: no other try would do better
                    route.failed(deployment)
                    failure = exc
                    if exc.reason not in RETRYABLE or try_index + 1 == route.retry.attempts:
                        break  # on to the next deployment
                    delay = route.backoff(try_index, exc.retry_after)
                    if time.monotonic() + delay >= deadline:
                        break
                    await asyncio.sleep(delay)
                    continue
                except BaseException as exc:
                    attempt.end("cancelled" if isinstance(exc, asyncio.CancelledError) else "internal")
                    await stream.aclose()
                    raise
                finally:
                    if token is not None:
                        tracing.detach(token)
                route.succeeded(deployment)
                return Started(deployment, first, stream, attempts, end, attempt)
            if time.monotonic() >= deadline:
                break
        assert failure is not None
        raise failure


async def next_event(
    stream: Events, measurement: Measurement, by: float | None, label: str
) -> svc.StreamCompletionResponse | None:
    """The provider's next event (None at its end), or UPSTREAM_TIMEOUT if it does not come by loop time `by`."""
    started = time.perf_counter()  # the wait is the provider's time, not the gateway's
    try:
        if by is None:
            return await anext(stream, None)
        try:
            async with asyncio.timeout_at(by):
                return await anext(stream, None)
        except TimeoutError:
            raise GatewayError(
                R.ERROR_REASON_UPSTREAM_TIMEOUT, f"The deployment {label} did not answer in time."
            ) from None
    finally:
        measurement.provider_wait += time.perf_counter() - started
