"""The shared limiter on a real redis-server, and the behaviour it shares with the in-process one (tested over both,
so the two cannot drift).

Counts live in fixed minutes, and redis-server reads the same clock as this process: a test that needs its calls in
one minute starts early enough in one (`_in_one_window`) and asserts afterwards that it stayed there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from services.policy.limits import (
    WINDOW_SECONDS,
    Grant,
    KeyLimits,
    Limiter,
    MemoryLimiter,
    RateLimited,
    Usage,
    duration,
    window_of,
)
from services.policy.redis_limits import PREFIX, LimiterUnavailable, RedisLimiter
from tests import redis_server as redis_fixtures
from tests.redis_server import RedisServer

Replicas = Callable[[], Limiter]
SLACK = 1.0  # the limiter's timeout is 0.25 s: a failure must be reported well within a second


async def _in_one_window(margin: float = 3.0) -> int:
    """Wait for the next minute if this one ends within `margin` seconds; the window the scenario then runs in."""
    window, left = window_of(time.time())
    if left < margin:
        await asyncio.sleep(left + 0.05)
        window, _ = window_of(time.time())
    return window


async def _usage(limiter: Limiter, key_id: str) -> Usage:
    """The key's counts as they stand, read by a request that every limiter refuses first and so counts nothing."""
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, KeyLimits(rpm=0), 0, "peek")
    return refused.value.usage


def _lease() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def key_id() -> str:
    return f"key{uuid.uuid4().hex[:12]}"  # the session's Redis is shared: every test counts under its own key


@asynccontextmanager
async def _redis_limiters(default_url: str) -> AsyncIterator[Callable[..., RedisLimiter]]:
    """Opens RedisLimiters ("replicas": each its own client and connections), all closed at the end."""
    opened: list[RedisLimiter] = []

    # A generous default: on a loaded machine a cold connection can take longer than the production 0.25 s; the
    # tests of the timeout itself pass theirs.
    def open_(url: str = default_url, *, timeout: float = 2.0, lease_seconds: float = 900) -> RedisLimiter:
        limiter = RedisLimiter.from_url(url, timeout=timeout, lease_seconds=lease_seconds)
        opened.append(limiter)
        return limiter

    try:
        yield open_
    finally:
        await asyncio.gather(*(limiter.aclose() for limiter in opened))


@pytest.fixture
async def open_redis(redis_url: str) -> AsyncIterator[Callable[..., RedisLimiter]]:
    async with _redis_limiters(redis_url) as open_:
        yield open_


@pytest.fixture(params=["memory", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    """A way to open the limiter of another replica: the one in-process limiter, or a new Redis client each time."""
    if request.param == "memory":
        memory = MemoryLimiter()
        yield lambda: memory
        await memory.aclose()
    else:  # the server is looked up only here, so memory-only runs never start it
        async with _redis_limiters(request.getfixturevalue("redis_url")) as open_:
            yield open_


# ---- the behaviour both limiters share ----


async def test_exactly_rpm_requests_pass_a_minute(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(rpm=5)
    window = await _in_one_window()
    grants = [await limiter.acquire(key_id, limits, 0, _lease()) for _ in range(5)]
    assert [g.usage.requests for g in grants] == [1, 2, 3, 4, 5]
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 0, _lease())
    assert refused.value.which == "requests"
    assert 0 < refused.value.retry_after <= WINDOW_SECONDS
    assert refused.value.retry_after == refused.value.usage.reset_seconds
    assert refused.value.usage == Usage(limits, 5, 0, refused.value.usage.reset_seconds)
    assert {g.window for g in grants} == {window}


async def test_tokens_are_reserved_then_settled_to_what_was_used(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(tpm=100)
    window = await _in_one_window()
    first = await limiter.acquire(key_id, limits, 60, _lease())
    assert (first.tokens, first.usage.tokens) == (60, 60)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 50, _lease())  # 60 + 50 reserved would pass 100
    assert (refused.value.which, refused.value.usage.tokens) == ("tokens", 60)
    await limiter.settle(first, 20)  # used less than reserved: 40 tokens come back
    assert (await _usage(limiter, key_id)).tokens == 20
    second = await limiter.acquire(key_id, limits, 50, _lease())
    assert second.usage.tokens == 70
    await limiter.settle(second, 80)  # used more than reserved: the extra 30 are counted too
    assert (await _usage(limiter, key_id)).tokens == 100
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 1, _lease())
    assert refused.value.which == "tokens" and 0 < refused.value.retry_after <= WINDOW_SECONDS
    assert {first.window, second.window} == {window}


async def test_a_release_not_waited_for_is_seen_by_the_next_call(replicas: Replicas, key_id: str) -> None:
    """`release`, the request path's settle: nothing awaited, and yet the very next call of the same limiter sees
    the slot back and the tokens corrected (one connection runs its commands in order)."""
    limiter, limits = replicas(), KeyLimits(tpm=100, max_concurrent=1)
    await _in_one_window()
    await limiter.acquire(key_id, limits, 0, _lease())  # opens the connection the releases then use
    failures: list[LimiterUnavailable] = []
    for used in (10, 30):
        grant = await limiter.acquire(key_id, KeyLimits(tpm=100, max_concurrent=2), 60, _lease())
        limiter.release(grant, used, failures.append)
        assert grant.settled
        limiter.release(grant, 1000, failures.append)  # once only
    assert (await _usage(limiter, key_id)).tokens == 40
    with pytest.raises(RateLimited, match="concurrency"):  # the first acquire's slot is still held
        await limiter.acquire(key_id, limits, 0, _lease())
    assert failures == []


async def test_requests_then_tokens_then_concurrency_are_checked_in_that_order(replicas: Replicas) -> None:
    limiter = replicas()
    await _in_one_window()
    every, tokens_and_slots = f"k{uuid.uuid4().hex}", f"k{uuid.uuid4().hex}"
    all_three = KeyLimits(rpm=1, tpm=10, max_concurrent=1)
    await limiter.acquire(every, all_three, 10, _lease())
    with pytest.raises(RateLimited) as refused:  # over all three: the requests are named
        await limiter.acquire(every, all_three, 5, _lease())
    assert refused.value.which == "requests"
    two = KeyLimits(tpm=10, max_concurrent=1)
    await limiter.acquire(tokens_and_slots, two, 10, _lease())
    with pytest.raises(RateLimited) as refused:  # over the tokens and the slots: the tokens are named
        await limiter.acquire(tokens_and_slots, two, 5, _lease())
    assert refused.value.which == "tokens"
    with pytest.raises(RateLimited) as refused:  # within the tokens, over the slots
        await limiter.acquire(tokens_and_slots, two, 0, _lease())
    assert refused.value.which == "concurrency" and refused.value.retry_after == 1.0


async def test_refusals_count_nothing(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(rpm=4, tpm=100, max_concurrent=2)
    window = await _in_one_window()
    first = await limiter.acquire(key_id, limits, 60, _lease())
    for tokens in (41, 50, 100):  # refused on the tokens: neither a request nor its tokens are counted
        with pytest.raises(RateLimited, match="tokens"):
            await limiter.acquire(key_id, limits, tokens, _lease())
    second = await limiter.acquire(key_id, limits, 40, _lease())  # exactly the tokens left
    assert (second.usage.requests, second.usage.tokens) == (2, 100)
    for _ in range(3):  # refused on the slots: nothing counted either
        with pytest.raises(RateLimited, match="concurrency"):
            await limiter.acquire(key_id, limits, 0, _lease())
    assert (await _usage(limiter, key_id)).requests == 2
    await limiter.settle(second, 0)
    third = await limiter.acquire(key_id, limits, 40, _lease())
    await limiter.settle(first, 0)
    fourth = await limiter.acquire(key_id, limits, 0, _lease())
    assert (third.usage.requests, fourth.usage.requests, fourth.usage.tokens) == (3, 4, 40)
    with pytest.raises(RateLimited, match="requests"):  # rpm=4 is used up by the four admitted requests alone
        await limiter.acquire(key_id, limits, 0, _lease())
    assert {first.window, second.window, third.window, fourth.window} == {window}


async def test_concurrency_slots_come_back_when_settled(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(max_concurrent=2)
    a = await limiter.acquire(key_id, limits, 0, _lease())
    await limiter.acquire(key_id, limits, 0, _lease())
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 0, _lease())
    assert (refused.value.which, refused.value.retry_after) == ("concurrency", 1.0)
    await limiter.settle(a, 0)
    await limiter.acquire(key_id, limits, 0, _lease())
    with pytest.raises(RateLimited, match="concurrency"):
        await limiter.acquire(key_id, limits, 0, _lease())


async def test_a_grant_is_settled_once(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(tpm=100, max_concurrent=2)
    window = await _in_one_window()
    a = await limiter.acquire(key_id, limits, 50, _lease())
    b = await limiter.acquire(key_id, limits, 30, _lease())
    await limiter.settle(a, 10)
    await limiter.settle(a, 10)  # again: neither its tokens nor its slot are given back twice
    assert a.settled and (await _usage(limiter, key_id)).tokens == 40
    await limiter.acquire(key_id, limits, 0, _lease())
    with pytest.raises(RateLimited, match="concurrency"):  # b and the new one hold both slots
        await limiter.acquire(key_id, limits, 0, _lease())
    assert {a.window, b.window} == {window}


async def test_a_grant_of_an_earlier_window_gives_back_its_slot_but_not_its_tokens(
    replicas: Replicas, key_id: str
) -> None:
    limiter, limits = replicas(), KeyLimits(tpm=100, max_concurrent=1)
    await _in_one_window()
    grant = await limiter.acquire(key_id, limits, 50, _lease())
    # as if it had been admitted a minute ago: its estimate was that minute's, which is over
    await limiter.settle(dataclasses.replace(grant, window=grant.window - 1), 0)
    later = await limiter.acquire(key_id, limits, 50, _lease())  # the slot is free, and 50 + 50 tokens counted
    assert later.usage.tokens == 100 and later.window == grant.window


async def test_a_kind_without_a_limit_does_not_limit(replicas: Replicas, key_id: str) -> None:
    limiter = replicas()
    await _in_one_window()
    grants = [await limiter.acquire(key_id, KeyLimits(tpm=10_000), 100, _lease()) for _ in range(30)]  # no rpm, slots
    assert (grants[-1].usage.requests, grants[-1].usage.tokens) == (30, 3000)
    many = [await limiter.acquire(key_id, KeyLimits(rpm=100), 10**6, _lease()) for _ in range(3)]  # no tpm
    assert many[-1].usage.tokens == 3000 + 3 * 10**6


async def test_keys_are_counted_apart(replicas: Replicas) -> None:
    limiter, limits = replicas(), KeyLimits(rpm=1, max_concurrent=1)
    await _in_one_window()
    await limiter.acquire("one" + uuid.uuid4().hex, limits, 0, _lease())
    other = await limiter.acquire("two" + uuid.uuid4().hex, limits, 0, _lease())
    assert other.usage.requests == 1


async def test_the_headers_say_what_was_counted(replicas: Replicas, key_id: str) -> None:
    limiter, limits = replicas(), KeyLimits(rpm=10, tpm=1000, max_concurrent=5)
    await _in_one_window()
    await limiter.acquire(key_id, limits, 100, _lease())
    grant = await limiter.acquire(key_id, limits, 150, _lease())
    headers = dict(grant.usage.metadata())
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "8"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "750"
    assert 0 < grant.usage.reset_seconds <= WINDOW_SECONDS
    assert headers["x-ratelimit-reset-requests"] == headers["x-ratelimit-reset-tokens"]
    assert headers["x-ratelimit-reset-requests"] == duration(grant.usage.reset_seconds)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 751, _lease())
    refused_headers = dict(refused.value.usage.metadata())
    assert refused_headers["x-ratelimit-remaining-requests"] == "8"  # the refusal is not counted
    assert refused_headers["x-ratelimit-remaining-tokens"] == "750"


@pytest.mark.parametrize(
    ("limits", "tokens", "admitted"),
    [(KeyLimits(rpm=37), 0, 37), (KeyLimits(tpm=1000), 30, 33), (KeyLimits(max_concurrent=7), 0, 7)],
    ids=["rpm", "tpm", "concurrency"],
)
async def test_racing_replicas_admit_exactly_the_limit(
    replicas: Replicas, key_id: str, limits: KeyLimits, tokens: int, admitted: int
) -> None:
    limiters = [replicas() for _ in range(4)]
    window = await _in_one_window(margin=5)

    async def attempt(i: int) -> Grant | None:
        try:
            return await limiters[i % len(limiters)].acquire(key_id, limits, tokens, _lease())
        except RateLimited:
            return None

    outcomes = await asyncio.gather(*(attempt(i) for i in range(200)))
    grants = [g for g in outcomes if g is not None]
    assert len(grants) == admitted
    assert sorted(g.usage.requests for g in grants) == list(range(1, admitted + 1))  # each saw its own count
    assert {g.window for g in grants} == {window}


# ---- Redis alone: keys, leases, the server's clock, failures ----


async def test_keys_are_versioned_and_share_one_cluster_slot(
    open_redis: Callable[..., RedisLimiter], redis_url: str, key_id: str
) -> None:
    assert PREFIX == "mm:rl:v1"
    limiter = open_redis(lease_seconds=30)
    window = await _in_one_window()
    await limiter.acquire(key_id, KeyLimits(rpm=5, tpm=100, max_concurrent=3), 7, _lease())
    async with Redis.from_url(redis_url, decode_responses=True) as raw:
        found = set(await raw.keys(f"*{key_id}*"))
        assert found == {
            f"mm:rl:v1:{{{key_id}}}:leases",
            f"mm:rl:v1:{{{key_id}}}:w:{window}:req",
            f"mm:rl:v1:{{{key_id}}}:w:{window}:tok",
        }
        assert len({key_slot(str(k).encode()) for k in found}) == 1
        assert await raw.get(f"mm:rl:v1:{{{key_id}}}:w:{window}:req") == "1"
        assert await raw.get(f"mm:rl:v1:{{{key_id}}}:w:{window}:tok") == "7"
        for counter in found - {f"mm:rl:v1:{{{key_id}}}:leases"}:  # gone once no later request can read it
            assert WINDOW_SECONDS < await raw.ttl(counter) <= 2 * WINDOW_SECONDS
        assert 30 < await raw.ttl(f"mm:rl:v1:{{{key_id}}}:leases") <= 31  # as long as its newest lease
        # another version's counters are not this version's: a full v2 minute does not refuse a v1 request
        await raw.set(f"mm:rl:v2:{{{key_id}}}:w:{window}:req", 1000)
    await limiter.acquire(key_id, KeyLimits(rpm=5), 0, _lease())


async def test_only_a_concurrency_limit_takes_a_lease_and_only_rpm_alone_skips_the_settle(
    open_redis: Callable[..., RedisLimiter], redis_url: str, key_id: str
) -> None:
    limiter = open_redis()
    window = await _in_one_window()
    rpm_only = await limiter.acquire(key_id, KeyLimits(rpm=5), 0, _lease())
    tokens = await limiter.acquire(key_id, KeyLimits(rpm=5, tpm=100), 40, _lease())
    async with Redis.from_url(redis_url, decode_responses=True) as raw:
        assert not await raw.exists(f"mm:rl:v1:{{{key_id}}}:leases")
        await raw.script_flush()  # a settle that reaches Redis now takes two round trips: EVALSHA, then EVAL
        before = int((await raw.info("stats"))["total_commands_processed"])
        await limiter.settle(rpm_only, 9)
        assert rpm_only.settled
        assert int((await raw.info("stats"))["total_commands_processed"]) == before + 1  # the INFO itself
        await limiter.settle(tokens, 10)
        assert await raw.get(f"mm:rl:v1:{{{key_id}}}:w:{window}:tok") == "10"  # the token settle did run


async def test_an_expired_lease_frees_its_slot(open_redis: Callable[..., RedisLimiter], key_id: str) -> None:
    limiter, limits = open_redis(lease_seconds=0.3), KeyLimits(max_concurrent=1)
    await limiter.acquire(key_id, limits, 0, _lease())  # never settled: its replica died
    with pytest.raises(RateLimited, match="concurrency"):
        await limiter.acquire(key_id, limits, 0, _lease())
    await asyncio.sleep(0.4)
    late = await limiter.acquire(key_id, limits, 0, _lease())
    with pytest.raises(RateLimited, match="concurrency"):  # the new lease holds the slot, until it expires too
        await limiter.acquire(key_id, limits, 0, _lease())
    await limiter.settle(late, 0)
    await limiter.acquire(key_id, limits, 0, _lease())


async def test_the_window_is_the_servers_not_the_replicas(
    open_redis: Callable[..., RedisLimiter], key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = await _in_one_window()
    real = time.time()
    monkeypatch.setattr(time, "time", lambda: real + 3 * 3600 + 17.0)  # this replica's clock is hours off
    fast = open_redis()
    grant = await fast.acquire(key_id, KeyLimits(rpm=2), 0, _lease())
    monkeypatch.setattr(time, "time", lambda: real - 3600.0)
    slow = open_redis()
    second = await slow.acquire(key_id, KeyLimits(rpm=2), 0, _lease())
    assert (grant.window, second.window, second.usage.requests) == (window, window, 2)
    assert 0 < second.usage.reset_seconds <= WINDOW_SECONDS


async def test_a_flushed_script_cache_is_refilled(
    open_redis: Callable[..., RedisLimiter], redis_url: str, key_id: str
) -> None:
    limiter = open_redis()
    await _in_one_window()
    await limiter.acquire(key_id, KeyLimits(rpm=3), 0, _lease())
    async with Redis.from_url(redis_url) as raw:
        await raw.script_flush()
    assert (await limiter.acquire(key_id, KeyLimits(rpm=3), 0, _lease())).usage.requests == 2


async def test_a_release_after_a_flushed_script_cache_is_sent_again_as_eval(
    open_redis: Callable[..., RedisLimiter], redis_url: str, key_id: str
) -> None:
    limiter, limits = open_redis(), KeyLimits(tpm=100)
    window = await _in_one_window()
    grant = await limiter.acquire(key_id, limits, 70, _lease())
    async with Redis.from_url(redis_url, decode_responses=True) as raw:
        await raw.script_flush()
        failures: list[LimiterUnavailable] = []
        limiter.release(grant, 5, failures.append)
        assert (await _usage(limiter, key_id)).tokens == 5  # NOSCRIPT, then EVAL: both before this call
        assert await raw.get(f"mm:rl:v1:{{{key_id}}}:w:{window}:tok") == "5"
    assert failures == []


async def test_a_release_to_a_killed_redis_reports_the_failure_and_never_raises(
    open_redis: Callable[..., RedisLimiter], redis_server: RedisServer, key_id: str
) -> None:
    limiter, limits = open_redis(redis_server.url, timeout=0.25), KeyLimits(max_concurrent=5)
    grants = [await limiter.acquire(key_id, limits, 0, _lease()) for _ in range(2)]
    failures: list[LimiterUnavailable] = []
    redis_server.stop()
    limiter.release(grants[0], 0, failures.append)  # sent on the connection still believed open, or awaited
    await asyncio.sleep(0.1)  # the closed connection is noticed
    limiter.release(grants[1], 0, failures.append)  # no connection: the awaited settle, in a task
    for _ in range(40):
        if len(failures) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(failures) == 2 and all(isinstance(f, LimiterUnavailable) for f in failures), failures
    await asyncio.wait_for(limiter.aclose(), 2)  # nothing left waiting


async def _timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        await asyncio.wait_for(call(), 5)  # a hang fails the test rather than stalling it
    return time.monotonic() - started


async def test_a_killed_redis_is_unavailable_within_the_timeout_and_recovers(
    open_redis: Callable[..., RedisLimiter], redis_server: RedisServer, key_id: str
) -> None:
    limiter, idle = open_redis(redis_server.url, timeout=0.25), open_redis(redis_server.url, timeout=0.25)
    limits = KeyLimits(rpm=10, max_concurrent=10)  # a slot to give back: the settle has to reach Redis
    grant = await limiter.acquire(key_id, limits, 0, _lease())
    await idle.acquire(key_id, limits, 0, _lease())  # a replica with a pooled connection, unused during the outage
    redis_server.stop()
    assert await _timed(lambda: limiter.acquire(key_id, limits, 0, _lease())) < SLACK
    assert await _timed(lambda: limiter.settle(grant, 0)) < SLACK
    assert grant.settled  # at most once: a settle that may have run is not sent again
    redis_server.start()  # empty, and without the scripts: counting starts again
    await _in_one_window()
    again = await limiter.acquire(key_id, limits, 0, _lease())
    assert again.usage.requests == 1
    # the idle replica's first call after the outage passes too: its closed connection is replaced, not used
    assert (await idle.acquire(key_id, limits, 0, _lease())).usage.requests == 2


async def test_a_frozen_redis_is_unavailable_within_the_timeout(
    open_redis: Callable[..., RedisLimiter], redis_server: RedisServer, key_id: str
) -> None:
    limiter, limits = open_redis(redis_server.url, timeout=0.25), KeyLimits(rpm=10)
    await _in_one_window()
    await limiter.acquire(key_id, limits, 0, _lease())  # connected: the next call waits on an open socket
    with redis_server.paused():
        assert 0.2 < await _timed(lambda: limiter.acquire(key_id, limits, 0, _lease())) < SLACK  # its 0.25 s
        fresh = open_redis(redis_server.url, timeout=0.1)  # its connection is accepted, its first call unanswered
        assert await _timed(lambda: fresh.acquire(key_id, limits, 0, _lease())) < 0.5
    # back: each timed-out request may have been counted when the server read it (none is retried, so once at most)
    assert (await limiter.acquire(key_id, limits, 0, _lease())).usage.requests in (2, 3, 4)


async def test_nothing_listening_is_unavailable(open_redis: Callable[..., RedisLimiter]) -> None:
    limiter = open_redis(f"redis://127.0.0.1:{redis_fixtures._free_port()}/0", timeout=0.25)
    assert await _timed(lambda: limiter.acquire("k", KeyLimits(rpm=1), 0, _lease())) < SLACK


async def test_tokens_never_go_below_zero(
    open_redis: Callable[..., RedisLimiter], redis_server: RedisServer, key_id: str
) -> None:
    limiter, limits = open_redis(redis_server.url), KeyLimits(tpm=100)
    await _in_one_window()
    grant = await limiter.acquire(key_id, limits, 60, _lease())
    redis_server.stop()
    await asyncio.sleep(0.1)  # a restart takes longer than no time at all: the client sees its connection close
    redis_server.start()  # the window's counts are lost: the settle's 50 back would make them -50
    await limiter.settle(grant, 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.acquire(key_id, limits, 101, _lease())
    assert (refused.value.which, refused.value.usage.tokens) == ("tokens", 0)


def test_a_missing_redis_server_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="make tools"):
        redis_fixtures._redis_server_binary()
