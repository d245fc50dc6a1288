"""UsageWriter: batching, the shutdown drain, drops when full, a failing store, fail-closed; then on both backends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from services.policy.store import Store
from services.policy.usage import UsageBufferFull, UsageRecord, UsageWriter
from tests.policy_stores import Backend

T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _record(i: int) -> UsageRecord:
    return UsageRecord(f"req-{i:05d}", "key-a", "sonnet", "sonnet-us", "bedrock", T0, 10, 0, 5, cost_micros=i)


class Sink:
    """An in-memory store: records each batch, and can be told to fail or to hang."""

    def __init__(self, *, fail_first: int = 0, fail_always: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.calls = 0
        self.fail_first, self.fail_always = fail_first, fail_always
        self.gate = asyncio.Event()
        self.gate.set()

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        self.calls += 1
        await self.gate.wait()
        if self.fail_always or self.calls <= self.fail_first:
            raise ConnectionError("store down")
        self.batches.append([r.request_id for r in records])

    @property
    def ids(self) -> list[str]:
        return [i for batch in self.batches for i in batch]


async def _until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_full_batches_are_written_at_once_and_the_rest_on_close() -> None:
    sink = Sink()
    writer = UsageWriter(sink, batch_size=10, max_buffer=100, flush_interval=60.0)
    writer.start()
    for i in range(25):
        assert writer.submit(_record(i))
    await _until(lambda: writer.written == 20)  # two full batches, long before the 60 s tick
    assert [len(b) for b in sink.batches] == [10, 10] and writer.buffered == 5
    await writer.close()
    assert [len(b) for b in sink.batches] == [10, 10, 5]
    assert sink.ids == [f"req-{i:05d}" for i in range(25)]  # nothing lost, nothing twice, in order
    assert writer.dropped == 0 and writer.buffered == 0


async def test_a_partial_batch_is_written_on_the_interval() -> None:
    sink = Sink()
    writer = UsageWriter(sink, batch_size=100, flush_interval=0.05)
    writer.start()
    for i in range(3):
        writer.submit(_record(i))
    await _until(lambda: writer.written == 3)
    await writer.close()
    assert sink.batches == [["req-00000", "req-00001", "req-00002"]]


async def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    sink = Sink()
    sink.gate.clear()  # the store hangs
    writer = UsageWriter(sink, batch_size=5, max_buffer=5, flush_interval=0.01)
    writer.start()
    started = time.monotonic()
    kept = [writer.submit(_record(i)) for i in range(8)]
    assert time.monotonic() - started < 0.1  # submit never waits for the store
    assert kept == [True] * 5 + [False] * 3 and writer.dropped == 3
    sink.gate.set()
    await writer.close()
    assert sink.ids == [f"req-{i:05d}" for i in range(5)] and writer.dropped == 3


async def test_a_store_that_fails_for_a_while_loses_nothing() -> None:
    sink = Sink(fail_first=4)
    writer = UsageWriter(sink, batch_size=4, flush_interval=0.01, retry_initial=0.01, retry_max=0.05)
    writer.start()
    for i in range(10):
        writer.submit(_record(i))
    await _until(lambda: writer.written == 8)
    assert writer.failures == 4
    for i in range(10, 12):  # still accepting while it caught up
        writer.submit(_record(i))
    await writer.close()
    assert sink.ids == [f"req-{i:05d}" for i in range(12)] and writer.dropped == 0


async def test_fail_closed_raises_when_the_buffer_is_full() -> None:
    sink = Sink()
    sink.gate.clear()
    writer = UsageWriter(sink, batch_size=2, max_buffer=2, fail_closed=True)
    writer.start()
    writer.submit(_record(0))
    writer.submit(_record(1))
    with pytest.raises(UsageBufferFull):
        writer.submit(_record(2))
    assert writer.dropped == 0
    sink.gate.set()
    await writer.close()
    assert sink.ids == ["req-00000", "req-00001"]


async def test_the_drain_gives_up_on_a_dead_store_and_counts_what_it_lost() -> None:
    sink = Sink(fail_always=True)
    writer = UsageWriter(sink, batch_size=10, retry_initial=0.01, retry_max=0.02, drain_timeout=0.2)
    writer.start()
    for i in range(7):
        writer.submit(_record(i))
    started = time.monotonic()
    await writer.close()
    assert time.monotonic() - started < 1.0
    assert writer.dropped == 7 and writer.buffered == 0 and writer.written == 0 and writer.failures > 1
    with pytest.raises(RuntimeError):
        writer.submit(_record(8))


async def test_close_drains_a_writer_that_was_never_started() -> None:
    sink = Sink()
    writer = UsageWriter(sink, batch_size=2)
    for i in range(5):
        writer.submit(_record(i))
    await writer.close()
    assert [len(b) for b in sink.batches] == [2, 2, 1]


async def test_the_writer_fills_a_real_store_and_close_flushes_it(backend: Backend, store: Store) -> None:
    writer = UsageWriter(store, batch_size=50, flush_interval=0.05)
    writer.start()
    for i in range(120):
        writer.submit(_record(i))
    await writer.close()
    [row] = await backend.raw("SELECT count(*) AS n, sum(cost_micros) AS cost FROM usage_records")
    assert (row["n"], row["cost"]) == (120, sum(range(120)))
    [totals] = await store.usage_report(T0, T0.replace(day=2), "key")
    assert (totals.requests, totals.prompt_tokens, totals.cost_micros) == (120, 1200, sum(range(120)))
