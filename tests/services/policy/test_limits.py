"""The in-process limiter's window arithmetic and OpenAI's duration format for the x-ratelimit-reset-* headers (the
behaviour shared with the Redis limiter is tested over both in test_redis_limits.py)."""

from __future__ import annotations

import pytest

from services.policy.limits import KeyLimits, MemoryLimiter, RateLimited, Usage, duration, window_of


@pytest.mark.parametrize(
    ("seconds", "written"),
    [(0.0004, "1ms"), (0.02, "20ms"), (0.9991, "1000ms"), (1.0, "1s"), (1.2, "2s"), (59.5, "1m0s"), (360, "6m0s")],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, written: str) -> None:
    assert duration(seconds) == written


def test_windows_are_the_epoch_s_minutes() -> None:
    assert window_of(120.0) == (2, 60.0)
    assert window_of(179.5) == (2, 0.5)


async def test_a_new_minute_starts_from_zero_but_keeps_the_slots_in_flight() -> None:
    now = [600.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    limits = KeyLimits(rpm=1, tpm=100, max_concurrent=2)
    grant = await limiter.acquire("k", limits, 50, "a")
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire("k", limits, 10, "b")
    assert refused.value.which == "requests" and refused.value.retry_after == 60.0
    now[0] = 661.0  # the next minute: a new request and new tokens, while the first is still running
    second = await limiter.acquire("k", limits, 100, "c")
    assert second.usage == Usage(limits, 1, 100, 59.0)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire("k", KeyLimits(max_concurrent=2), 0, "d")
    assert refused.value.which == "concurrency"
    await limiter.settle(grant, 7)  # settled in a later window: its tokens stay where they were counted
    await limiter.settle(grant, 7)  # once only
    third = await limiter.acquire("k", KeyLimits(max_concurrent=2), 0, "e")
    assert third.usage.requests == 2
