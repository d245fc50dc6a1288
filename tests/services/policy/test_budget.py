"""Budget reservations on both real backends, from two stores ("replicas") sharing one database."""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from services.policy.keys import Budget, KeySpec
from services.policy.store import Reservation, Store
from tests.policy_stores import Backend

WINDOW = datetime(2026, 7, 1, tzinfo=UTC)


async def _replicas(backend: Backend) -> tuple[Store, Store, str]:
    a, b = await backend.open(), await backend.open()
    record, _ = await a.create_key(KeySpec("budgeted", budget=Budget(1000, "month")))
    return a, b, record.id


async def test_concurrent_reservations_on_two_replicas_never_pass_budget_plus_one(backend: Backend) -> None:
    a, b, key = await _replicas(backend)
    rng = random.Random(7)
    amounts = [rng.randint(20, 90) for _ in range(60)]  # 60 asks, about 3300 in all
    replicas = itertools.cycle([a, b])
    results = await asyncio.gather(*(next(replicas).reserve(key, amt, WINDOW, 1000) for amt in amounts))
    admitted = [r for r in results if r is not None]
    held = sum(r.amount_micros for r in admitted)
    # Each admission saw less than the limit committed, so the last one took it at most one reservation over...
    assert held < 1000 + max(amounts)
    assert held - max(r.amount_micros for r in admitted) < 1000
    # ...and each refusal saw the limit reached, so nothing was refused early.
    assert held >= 1000
    assert (await a.budget_state(key, WINDOW)).held_micros == held
    assert (await b.budget_state(key, WINDOW)).held_micros == held


async def test_equal_reservations_admit_exactly_the_ceiling(backend: Backend) -> None:
    a, b, key = await _replicas(backend)
    results = await asyncio.gather(*(s.reserve(key, 300, WINDOW, 1000) for s in [a, b] * 10))
    assert sum(r is not None for r in results) == 4  # 0, 300, 600, 900 are under 1000; then 1200 is committed


async def test_settle_reconciles_to_the_real_cost(backend: Backend) -> None:
    a, b, key = await _replicas(backend)
    first = await a.reserve(key, 400, WINDOW, 1000)
    second = await b.reserve(key, 400, WINDOW, 1000)
    assert first and second
    assert await a.budget_state(key, WINDOW) == (await b.budget_state(key, WINDOW))
    assert (await a.budget_state(key, WINDOW)).held_micros == 800
    assert await b.settle(first, 150)  # the estimate was high: 250 comes back
    assert await a.settle(second, 500)  # and low: the real cost counts in full
    state = await a.budget_state(key, WINDOW)
    assert (state.spent_micros, state.held_micros) == (650, 0)
    assert not await a.settle(first, 150)  # settling twice counts once
    assert (await b.budget_state(key, WINDOW)).spent_micros == 650
    third = await a.reserve(key, 1000, WINDOW, 1000)  # 650 < 1000: still admitted, however large
    assert third is not None
    assert await a.reserve(key, 1, WINDOW, 1000) is None  # 650 + 1000 held
    await a.settle(third, 400)
    assert await b.reserve(key, 1, WINDOW, 1000) is None  # 1050 spent: over, by less than one reservation
    assert (await b.budget_state(key, WINDOW)).spent_micros == 1050


async def test_windows_are_separate_per_key_and_period(backend: Backend) -> None:
    a, b, key = await _replicas(backend)
    assert await a.reserve(key, 1000, WINDOW, 1000)
    assert await a.reserve(key, 1, WINDOW, 1000) is None
    assert await b.reserve(key, 1, WINDOW + timedelta(days=31), 1000)  # next month
    other, _ = await a.create_key(KeySpec("other"))
    assert await b.reserve(other.id, 1, WINDOW, 1000)
    assert (await a.budget_state("never-reserved", WINDOW)) == (await a.budget_state("never-reserved", WINDOW))
    assert (await a.budget_state("never-reserved", WINDOW)).spent_micros == 0


async def test_an_unsettled_reservation_lapses_and_a_late_settle_still_counts(backend: Backend) -> None:
    a, b, key = await _replicas(backend)
    stuck = await a.reserve(key, 1000, WINDOW, 1000, hold=timedelta(milliseconds=300))
    assert stuck is not None
    assert await b.reserve(key, 1, WINDOW, 1000) is None
    await asyncio.sleep(0.4)  # its replica "died": the hold lapses
    assert (await b.budget_state(key, WINDOW)).held_micros == 0
    late = await b.reserve(key, 100, WINDOW, 1000)
    assert late is not None
    assert await a.settle(stuck, 700)  # the request did finish after all: its cost counts, once
    assert await b.settle(late, 100)
    assert (await a.budget_state(key, WINDOW)).spent_micros == 800
    assert not await a.settle(stuck, 700)


@pytest.mark.parametrize(("amount", "limit", "hold"), [(-1, 10, 1.0), (1, 0, 1.0), (1, 10, 0.0)])
async def test_bad_arguments_are_refused(store: Store, amount: int, limit: int, hold: float) -> None:
    with pytest.raises(ValueError):
        await store.reserve("k", amount, WINDOW, limit, hold=timedelta(seconds=hold))
    with pytest.raises(ValueError):
        await store.reserve("k", 1, datetime(2026, 7, 1), 10)  # naive


async def test_settle_of_an_unknown_reservation_is_false(store: Store) -> None:
    assert not await store.settle(Reservation("nope", "k", WINDOW, 5), 5)
