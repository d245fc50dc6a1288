"""Per-key rate limits: requests per minute, tokens per minute (input + output), requests in flight.

A key's limits come from its record (services/policy/keys.py). `acquire` is one atomic check-and-count for a request
about to run: one request against the minute's requests, an estimate of its tokens (the prompt's upper bound plus
its max tokens) against the minute's tokens, and one slot of its concurrency; it counts nothing when it refuses.
`settle` replaces the estimate by the tokens the request really used (streams and cancellations included) and gives
the slot back. Windows are fixed minutes (the epoch's, so every replica agrees on them): exactly `rpm` requests
are admitted per minute, never more, and `reset` is the time to the minute's end.

`MemoryLimiter` counts in this process (correct for one replica). A shared backend (Redis/Valkey) implements the
same `Limiter` protocol with one atomic round trip per call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a key has used of its limits in the current window, after a decision."""

    limits: KeyLimits
    requests: int  # admitted this window, this one included when admitted
    tokens: int  # reserved or used this window
    reset_seconds: float  # until the window ends

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """OpenAI's x-ratelimit-* headers for these values, as gRPC metadata (the bridge copies them)."""
        pairs: list[tuple[str, str]] = []
        reset = duration(self.reset_seconds)
        if self.limits.rpm is not None:
            pairs += [
                ("x-ratelimit-limit-requests", str(self.limits.rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, self.limits.rpm - self.requests))),
                ("x-ratelimit-reset-requests", reset),
            ]
        if self.limits.tpm is not None:
            pairs += [
                ("x-ratelimit-limit-tokens", str(self.limits.tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, self.limits.tpm - self.tokens))),
                ("x-ratelimit-reset-tokens", reset),
            ]
        return tuple(pairs)


@dataclass(slots=True)
class Grant:
    """An admitted request's hold on its key's limits, given back by `Limiter.settle`."""

    key_id: str
    lease: str  # the request's id: its concurrency slot, in a backend that keeps slots by name
    window: int  # the window its tokens were counted in
    tokens: int  # the estimate reserved
    usage: Usage
    settled: bool = False


class RateLimited(Exception):
    """Over a limit: which one, when a retry could pass, and the key's usage as it stands (for the headers)."""

    def __init__(self, which: str, retry_after: float, usage: Usage) -> None:
        super().__init__(which)
        self.which = which  # "requests", "tokens" or "concurrency"
        self.retry_after = retry_after
        self.usage = usage


class LimiterUnavailable(Exception):
    """A shared limiter did not answer in time or at all; the policy fails open or closed, as configured."""


class Limiter(Protocol):
    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int, lease: str) -> Grant:
        """Count one request, `tokens` reserved and one slot, or raise RateLimited having counted nothing."""
        ...

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        """Replace the grant's reserved tokens by `used_tokens` in its window and give its slot back (once)."""
        ...

    def release(self, grant: Grant, used_tokens: int, failed: Callable[[LimiterUnavailable], None]) -> None:
        """`settle` without waiting for it (the request path's way: a request that ended owes nothing more); a
        failure goes to `failed`, never raised. What it does is seen by every later call of this limiter."""
        ...

    async def aclose(self) -> None: ...


def _never(_: LimiterUnavailable) -> None:
    """The in-process limiter cannot fail."""


def window_of(now: float) -> tuple[int, float]:
    """The fixed window `now` falls in, and the seconds left in it."""
    window = int(now // WINDOW_SECONDS)
    return window, (window + 1) * WINDOW_SECONDS - now


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "20ms", "1s", "6m0s" (whole seconds from 1 s on, rounded up)."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass(slots=True)
class _Counts:
    window: int
    requests: int = 0
    tokens: int = 0
    inflight: int = 0


@dataclass(slots=True)
class MemoryLimiter:
    """Counts in this process: correct for one replica. One entry per key that has limits."""

    clock: Callable[[], float] = time.time  # seconds since the epoch (a test may step it)
    _keys: dict[str, _Counts] = field(default_factory=dict)

    def _now(self) -> float:
        return self.clock()

    def _counts(self, key_id: str, window: int) -> _Counts:
        counts = self._keys.get(key_id)
        if counts is None:
            counts = self._keys[key_id] = _Counts(window)
        elif counts.window != window:  # a new window: the old one's counts are history (in-flight slots are not)
            counts.window, counts.requests, counts.tokens = window, 0, 0
        return counts

    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int, lease: str) -> Grant:
        window, left = window_of(self._now())
        counts = self._counts(key_id, window)
        if limits.rpm is not None and counts.requests + 1 > limits.rpm:
            raise RateLimited("requests", left, Usage(limits, counts.requests, counts.tokens, left))
        if limits.tpm is not None and counts.tokens + tokens > limits.tpm:
            raise RateLimited("tokens", left, Usage(limits, counts.requests, counts.tokens, left))
        if limits.max_concurrent is not None and counts.inflight + 1 > limits.max_concurrent:
            raise RateLimited("concurrency", 1.0, Usage(limits, counts.requests, counts.tokens, left))
        counts.requests += 1
        counts.tokens += tokens
        counts.inflight += 1
        return Grant(key_id, lease, window, tokens, Usage(limits, counts.requests, counts.tokens, left))

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        self.release(grant, used_tokens, _never)

    def release(self, grant: Grant, used_tokens: int, failed: Callable[[LimiterUnavailable], None]) -> None:
        if grant.settled:
            return
        grant.settled = True
        counts = self._counts(grant.key_id, window_of(self._now())[0])
        counts.inflight = max(0, counts.inflight - 1)
        if grant.window == counts.window:
            counts.tokens = max(0, counts.tokens + used_tokens - grant.tokens)
        # a request that started in an earlier window: its estimate was that window's, which is over

    async def aclose(self) -> None:
        self._keys.clear()
