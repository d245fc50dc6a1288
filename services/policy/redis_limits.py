"""RedisLimiter: the per-key rate limits of services/policy/limits.py on Redis/Valkey, shared by every replica.

Each `acquire` and each `settle` is one atomic round trip: a Lua script (EVALSHA, falling back to EVAL once per
server when its script cache does not hold it yet, as after a restart) that reads the server's own clock with
`TIME`, so replicas with skewed clocks still agree on the minute, and checks and counts in one step, so replicas
racing on one key admit exactly its limit. The semantics are `MemoryLimiter`'s: requests, then tokens, then
concurrency are checked, in that order, and a refusal counts nothing.

Keys, all under one Redis Cluster hash tag per API key (so one key's counters share a slot):

    mm:rl:v1:{<key_id>}:w:<window>:req   requests admitted in the window (a string; INCR; expires after 2 windows)
    mm:rl:v1:{<key_id>}:w:<window>:tok   tokens reserved or used in the window (INCRBY; expires after 2 windows)
    mm:rl:v1:{<key_id>}:leases           requests in flight: a sorted set of lease ids scored by their expiry (us),
                                         kept only for a key with a concurrency limit

`v1` names the scripts' version, not the gateway's. A change to what the scripts store or mean takes a new prefix
(`v2`), so during a rolling update the old and the new gateway never read each other's counters with the wrong
semantics: each version counts its own, and for the length of the rollout a key may be admitted up to its limit by
each of them. A change that keeps the layout and the meaning (a faster script) keeps the prefix.

A lease expires `lease_seconds` after its acquire (it must outlast the longest request the core allows): a replica
that died mid-request cannot hold its slots for ever, because every acquire first drops the expired leases. A lease
id names one request in flight (the request's id): acquiring with one already held refreshes it, taking no new slot.
A key without a concurrency limit takes no lease, and one whose only limit is rpm is not settled at all (its request
counted once, whatever it used): one round trip per request. A concurrency limit added to a key while its requests
are in flight counts only the requests admitted after it.

The client is services/policy/resp.py (one pipelined RESP2 connection; redis-py cost more than the whole latency
budget of a limited request, see its docstring).

Failure is the caller's to decide: any Redis call that times out (`timeout` for each round trip, the connection's
opening included), cannot connect or is answered with an error raises `LimiterUnavailable`, and the policy
chooses to fail open or closed. Nothing is retried here: a timed-out acquire may have counted, and a retry would
count it twice
(its slot then frees itself when its lease expires, its tokens when the window ends). A Redis that loses its data
(no persistence, a restart) forgets the current window's counts; the next window is exact again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from services.policy.limits import WINDOW_SECONDS, Grant, KeyLimits, LimiterUnavailable, RateLimited, Usage
from services.policy.resp import Redis, RedisError, RedisUnavailable, Reply, ReplyError

PREFIX = "mm:rl:v1"
DEFAULT_TIMEOUT = 0.25
DEFAULT_LEASE_SECONDS = 900.0

# KEYS: the leases' sorted set, the window counters' prefix. ARGV: rpm, tpm, max_concurrent (-1: no limit), tokens,
# lease id, lease length (us), window length (s). Returns {refused limit or "", requests, tokens, us left, window}.
_ACQUIRE = """
local rpm, tpm, max_concurrent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease, lease_us, window_s = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local window = math.floor(tonumber(time[1]) / window_s)
local left_us = (window + 1) * window_s * 1000000 - now_us
local requests_key = KEYS[2] .. string.format('%d', window) .. ':req'
local tokens_key = KEYS[2] .. string.format('%d', window) .. ':tok'
if max_concurrent >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_us)
end
local requests = tonumber(redis.call('GET', requests_key) or 0)
local used = tonumber(redis.call('GET', tokens_key) or 0)
local refused = ''
if rpm >= 0 and requests + 1 > rpm then
  refused = 'requests'
elseif tpm >= 0 and used + tokens > tpm then
  refused = 'tokens'
elseif max_concurrent >= 0 and redis.call('ZCARD', KEYS[1]) + 1 > max_concurrent then
  refused = 'concurrency'
end
if refused == '' then
  requests = redis.call('INCR', requests_key)
  used = redis.call('INCRBY', tokens_key, tokens)
  redis.call('EXPIRE', requests_key, 2 * window_s)
  redis.call('EXPIRE', tokens_key, 2 * window_s)
  if max_concurrent >= 0 then
    redis.call('ZADD', KEYS[1], now_us + lease_us, lease)
    redis.call('PEXPIRE', KEYS[1], math.ceil(lease_us / 1000) + 1000)
  end
end
return {refused, requests, used, left_us, window}
"""

# KEYS: as _ACQUIRE's. ARGV: lease id, the grant's window, used minus reserved tokens, window length (s).
# A grant of an earlier window leaves the tokens alone: its estimate was that window's, which is over.
_SETTLE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local window_s = tonumber(ARGV[4])
local window = math.floor(tonumber(redis.call('TIME')[1]) / window_s)
if window == tonumber(ARGV[2]) then
  local tokens_key = KEYS[2] .. string.format('%d', window) .. ':tok'
  if redis.call('INCRBY', tokens_key, ARGV[3]) < 0 then
    redis.call('SET', tokens_key, 0)
  end
  redis.call('EXPIRE', tokens_key, 2 * window_s)
end
return 1
"""


class _Script:
    """One Lua script: EVALSHA, or EVAL (which also caches it) when the server does not know it yet."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: tuple[str, str], args: Sequence[str | int]) -> Reply:
        try:
            return await client.call("EVALSHA", self.sha, 2, *keys, *args)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
            return await client.call("EVAL", self.source, 2, *keys, *args)


class RedisLimiter:
    """The `Limiter` protocol on Redis/Valkey: one atomic script per call, counted on the server's clock."""

    __slots__ = ("_acquire", "_client", "_lease_us", "_releasing", "_settle", "_timeout")

    def __init__(
        self, client: Redis, *, timeout: float = DEFAULT_TIMEOUT, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> None:
        """Args:
        client: the server's client (services/policy/resp.py), its own deadline per call.
        timeout: seconds allowed for each round trip (the NOSCRIPT fallback's EVAL is a second), the connection's
            opening included.
        lease_seconds: how long a request holds its concurrency slot unless settled first.
        """
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self._client = client
        self._timeout = timeout
        self._lease_us = round(lease_seconds * 1_000_000)
        self._acquire = _Script(_ACQUIRE)
        self._settle = _Script(_SETTLE)
        self._releasing: set[asyncio.Task[None]] = set()  # awaited settles of `release` (no connection was open)

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = DEFAULT_TIMEOUT, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> RedisLimiter:
        """A limiter on `redis://[[user]:password@]host:port/db` (or `rediss://`, `unix://`); connects on first use.

        Every call of every request goes over one pipelined connection, reopened after a failure: Redis runs one
        script at a time, and a burst that opened a connection per request would spend its timeout connecting.
        """
        return cls(Redis(url, timeout=timeout), timeout=timeout, lease_seconds=lease_seconds)

    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int, lease: str) -> Grant:
        args = (_limit(limits.rpm), _limit(limits.tpm), _limit(limits.max_concurrent), tokens, lease)
        reply = await self._call(self._acquire, key_id, (*args, self._lease_us, WINDOW_SECONDS))
        refused, requests, used, left_us, window = reply
        left = int(left_us) / 1_000_000
        usage = Usage(limits, int(requests), int(used), left)
        if refused:
            raise RateLimited(refused, 1.0 if refused == "concurrency" else left, usage)
        return Grant(key_id, lease, int(window), tokens, usage)

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        if grant.settled:
            return
        # Marked before the call: a timed-out settle may have run, and its token correction must not apply twice.
        grant.settled = True
        limits = grant.usage.limits
        if limits.tpm is None and limits.max_concurrent is None:
            return  # nothing to give back: the acquire took no lease, and the request counts as one, whatever it used
        delta = used_tokens - grant.tokens
        await self._call(self._settle, grant.key_id, (grant.lease, grant.window, delta, WINDOW_SECONDS))

    def release(self, grant: Grant, used_tokens: int, failed: Callable[[LimiterUnavailable], None]) -> None:
        """The settle script sent without waiting for it: no task, no timer, and at c=64 the writes of many
        requests' settles share the loop's ticks. NOSCRIPT (a restarted Redis) sends it again as EVAL; with no
        connection open (the first call, or after a failure), the awaited `settle` runs in a task instead."""
        if grant.settled:
            return
        limits = grant.usage.limits
        if limits.tpm is None and limits.max_concurrent is None:
            grant.settled = True
            return  # as in `settle`: nothing to give back
        keys = _keys(grant.key_id)
        args = (grant.lease, grant.window, used_tokens - grant.tokens, WINDOW_SECONDS)

        def replied(reply: Reply | RedisError) -> None:
            if isinstance(reply, ReplyError) and reply.code == "NOSCRIPT":
                if self._client.fire(replied_again, "EVAL", self._settle.source, 2, *keys, *args):
                    return
                reply = RedisUnavailable("the connection closed before the script could be sent again")
            replied_again(reply)

        def replied_again(reply: Reply | RedisError) -> None:
            if isinstance(reply, RedisError):
                failed(LimiterUnavailable(f"rate limits: Redis failed: {type(reply).__name__}: {reply}"))

        if self._client.fire(replied, "EVALSHA", self._settle.sha, 2, *keys, *args):
            grant.settled = True
            return
        task = asyncio.ensure_future(self._settle_awaited(grant, used_tokens, failed))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _settle_awaited(
        self, grant: Grant, used_tokens: int, failed: Callable[[LimiterUnavailable], None]
    ) -> None:
        try:
            await self.settle(grant, used_tokens)
        except LimiterUnavailable as exc:
            failed(exc)

    async def aclose(self) -> None:
        """Wait (within the timeout) for the settles sent and not yet answered, then close the connection."""
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._client.call("PING")  # answered after every command sent before it
        await self._client.aclose()

    async def _call(self, script: _Script, key_id: str, args: Sequence[str | int]) -> Any:
        keys = _keys(key_id)
        try:
            return await script(self._client, keys, args)
        except RedisError as exc:  # unreachable, closed, no answer within the client's deadline, or an error reply
            raise LimiterUnavailable(f"rate limits: Redis failed: {type(exc).__name__}: {exc}") from exc


def _keys(key_id: str) -> tuple[str, str]:
    """The scripts' KEYS for one API key: its leases, and the prefix of its window counters."""
    return f"{PREFIX}:{{{key_id}}}:leases", f"{PREFIX}:{{{key_id}}}:w:"


def _limit(value: int | None) -> int:
    return -1 if value is None else value
