"""Routes: which deployment serves a request, in what order, and when one is skipped (cooldown) or retried.

Per process, in memory: a deployment's failures are counted where they happen, and nothing needs a database.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from modelmax.v1 import completion_pb2 as pb
from services.catalog import CooldownPolicy, RetryPolicy, TimeoutPolicy
from services.errors import GatewayError
from services.providers import Provider

R = pb.ErrorReason
# Worth another try of the same deployment (after a backoff), then of the next one.
RETRYABLE = {R.ERROR_REASON_RATE_LIMITED, R.ERROR_REASON_UPSTREAM_UNAVAILABLE, R.ERROR_REASON_UPSTREAM_TIMEOUT}
# This deployment cannot serve (its model or its credentials are wrong): the next one may.
NEXT_DEPLOYMENT = {R.ERROR_REASON_MODEL_NOT_FOUND, R.ERROR_REASON_UPSTREAM_AUTH}


@dataclass(slots=True)
class Deployment:
    """One provider deployment of a route, with its failure count for the cooldown."""

    label: str  # "1:bedrock:deepseek.v3.2": catalog position, provider kind, upstream model
    kind: str
    provider: Provider
    weight: float | None
    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    failures: int = 0
    cooled_until: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.cooled_until


@dataclass(slots=True)
class Route:
    """A public model name's deployments and policies."""

    name: str
    deployments: list[Deployment]
    retry: RetryPolicy
    cooldown: CooldownPolicy | None
    rng: random.Random = field(default_factory=random.Random)

    def plan(self) -> list[Deployment]:
        """The deployments to try for one request, in order: by weight when weights are set, else as listed.

        Deployments cooling down are left out. Raises UPSTREAM_UNAVAILABLE, with a Retry-After, when all are.
        """
        if any(d.weight is not None for d in self.deployments):
            # Weighted order without replacement (Efraimidis-Spirakis); weight 0 deployments only as last resorts.
            weighted = [d for d in self.deployments if d.weight]
            weighted.sort(key=lambda d: self.rng.random() ** (1.0 / d.weight), reverse=True)  # type: ignore[operator]
            ordered = weighted + [d for d in self.deployments if not d.weight]
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
