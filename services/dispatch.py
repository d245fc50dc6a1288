"""Dispatch: which deployment serves a completion, in what order, and its retries, fallbacks, cooldowns and timeouts.

A public model name is a `Route` over one or more `Deployment`s (built once from the catalog and the providers).
`dispatch` tries them until one produces its first event, within one time budget: the route's
`retry.budget_seconds`, capped by the caller's gRPC deadline. A retryable failure before the first output retries the
same deployment (with backoff, or the upstream's Retry-After) and then falls back to the next; once a deployment has
produced output, the completion stays on it. Per process, in memory: a deployment's failures are counted where they
happen, and nothing needs a database.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, CooldownPolicy, RetryPolicy, TimeoutPolicy
from services.errors import GatewayError
from services.metrics import CoreMetrics, Measurement
from services.prices import Price
from services.providers import Provider, ProviderRegistry

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
    ) -> Started:
        """Try the route's deployments until one produces its first event; raise the last failure if none does.

        `time_remaining` is the caller's gRPC deadline in seconds from now (None: no deadline); it caps the route's
        retry budget, so no backoff sleeps past the point where the caller has stopped waiting. Each try counts in
        `measurement` (`serving` names the deployment tried or serving, for metrics and logs).
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
                stream = deployment.provider.stream(params, incremental=incremental)
                limits = deployment.timeouts
                loop_now = asyncio.get_running_loop().time()
                end = None if limits.total_seconds is None else loop_now + limits.total_seconds
                first_by = end if limits.first_token_seconds is None else loop_now + limits.first_token_seconds
                if end is not None and first_by is not None:
                    first_by = min(first_by, end)
                try:
                    # Pre-stream failures surface here, and so does a provider that never starts answering.
                    first = await next_event(stream, measurement, first_by, deployment.label)
                except GatewayError as exc:
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
                except BaseException:
                    await stream.aclose()
                    raise
                route.succeeded(deployment)
                return Started(deployment, first, stream, attempts, end)
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
