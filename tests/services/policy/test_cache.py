"""KeyCache on both real backends: what it accepts and refuses, and how long a revoked key keeps working."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from services.policy.cache import KeyCache, KeyRefused
from services.policy.keys import KeyRecord, KeySpec, parse_key
from services.policy.store import KeyChanges, Store
from tests.policy_stores import Backend


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Counting:
    """A store wrapper that counts the reads that reach the database."""

    def __init__(self, store: Store) -> None:
        self.store, self.reads = store, 0

    async def get_key(self, key_id: str) -> KeyRecord | None:
        self.reads += 1
        return await self.store.get_key(key_id)


async def _refusal(cache: KeyCache, presented: str, **kwargs: str) -> str:
    with pytest.raises(KeyRefused) as info:
        await cache.authenticate(presented, **kwargs)  # type: ignore[arg-type]
    parsed = parse_key(presented)
    assert (parsed.secret if parsed else presented) not in str(info.value)  # the secret is never in the message
    return info.value.reason


async def test_accepts_a_good_key_and_refuses_the_rest(store: Store) -> None:
    cache = KeyCache(store)
    record, whole = await store.create_key(KeySpec("k"))
    assert await cache.authenticate(whole) == record
    assert await _refusal(cache, "not-a-key") == "malformed"
    assert await _refusal(cache, "mm-aaaaaaaaaaaa-" + "x" * 43) == "unknown"
    assert await _refusal(cache, f"mm-{record.id}-" + "x" * 43) == "wrong_secret"
    assert await _refusal(cache, whole, kind="management") == "wrong_kind"


async def test_management_keys_are_not_inference_keys(store: Store) -> None:
    cache = KeyCache(store)
    admin, whole = await store.create_key(KeySpec("ops", kind="management"))
    assert await cache.authenticate(whole, kind="management") == admin
    assert await _refusal(cache, whole) == "wrong_kind"


async def test_expiry_refuses_without_waiting_for_the_cache(store: Store) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    cache = KeyCache(store, now=lambda: now[0])
    record, whole = await store.create_key(KeySpec("k", expires_at=now[0] + timedelta(minutes=1)))
    assert await cache.authenticate(whole) == record
    now[0] += timedelta(minutes=1)
    assert await _refusal(cache, whole) == "expired"


async def test_a_revoked_key_works_for_at_most_the_ttl_on_another_replica(backend: Backend) -> None:
    here, there = await backend.open(), await backend.open()
    clock = Clock()
    cache = KeyCache(here, ttl=5.0, clock=clock)
    record, whole = await here.create_key(KeySpec("k"))
    await cache.authenticate(whole)  # cached at t=1000
    await there.revoke_key(record.id)
    clock.t += 4.999
    assert await cache.authenticate(whole) == record  # still cached: the documented delay
    clock.t += 0.001
    assert await _refusal(cache, whole) == "revoked"  # never past the TTL
    cache.clear()
    assert await _refusal(cache, whole) == "revoked"  # a fresh read agrees


async def test_a_revoked_key_is_refused_within_a_short_real_ttl(backend: Backend) -> None:
    here, there = await backend.open(), await backend.open()
    cache = KeyCache(here, ttl=0.3)
    record, whole = await here.create_key(KeySpec("k"))
    await cache.authenticate(whole)
    await there.revoke_key(record.id)
    revoked_at = time.monotonic()
    while True:
        try:
            await cache.authenticate(whole)
        except KeyRefused as refused:
            assert refused.reason == "revoked"
            break
        assert time.monotonic() - revoked_at < 0.3 + 0.2, "served a revoked key past its TTL"
        await asyncio.sleep(0.02)
    assert time.monotonic() - revoked_at <= 0.3 + 0.2


async def test_invalidate_makes_a_local_change_immediate(store: Store) -> None:
    cache = KeyCache(store, clock=Clock())
    record, whole = await store.create_key(KeySpec("k"))
    await cache.authenticate(whole)
    await store.revoke_key(record.id)
    cache.invalidate(record.id)
    assert await _refusal(cache, whole) == "revoked"


async def test_rotation_retires_the_old_secret_within_the_ttl_and_the_new_one_works_soon(backend: Backend) -> None:
    here, there = await backend.open(), await backend.open()
    clock = Clock()
    cache = KeyCache(here, ttl=5.0, negative_ttl=1.0, clock=clock)
    record, old = await here.create_key(KeySpec("k"))
    await cache.authenticate(old)
    _, new = await there.rotate_key(record.id)
    assert await _refusal(cache, new) == "wrong_secret"  # the cached hash is too fresh to re-read yet
    clock.t += 1.0
    assert (await cache.authenticate(new)).id == record.id  # a wrong secret re-read a 1 s old record
    assert await _refusal(cache, old) == "wrong_secret"


async def test_lookups_are_cached_and_negative_results_briefly(store: Store) -> None:
    counting, clock = Counting(store), Clock()
    cache = KeyCache(counting, ttl=5.0, negative_ttl=1.0, clock=clock)
    record, whole = await store.create_key(KeySpec("k"))
    for _ in range(3):
        await cache.authenticate(whole)
    assert counting.reads == 1 and cache.hits == 2
    for _ in range(3):  # a wrong secret for a cached id is refused without a read (until the entry is 1 s old)
        with pytest.raises(KeyRefused):
            await cache.authenticate(f"mm-{record.id}-" + "y" * 43)
    assert counting.reads == 1
    unknown = "mm-bbbbbbbbbbbb-" + "z" * 43
    for _ in range(3):
        with pytest.raises(KeyRefused):
            await cache.authenticate(unknown)
    assert counting.reads == 2
    clock.t += 1.0
    with pytest.raises(KeyRefused):
        await cache.authenticate(unknown)
    assert counting.reads == 3  # the negative entry lapsed after 1 s
    clock.t += 4.0
    await cache.authenticate(whole)
    assert counting.reads == 4  # and the positive one after 5 s


async def test_the_cache_is_size_bounded(store: Store) -> None:
    cache = KeyCache(store, max_entries=3, clock=Clock())
    made = [await store.create_key(KeySpec(f"k{i}")) for i in range(5)]
    for _, whole in made:
        await cache.authenticate(whole)
    assert len(cache) == 3
    await store.update_key(made[0][0].id, KeyChanges(name="evicted, so read again"))
    assert (await cache.authenticate(made[0][1])).name == "evicted, so read again"
