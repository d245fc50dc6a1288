"""Usage metering: one UsageRecord per request, and the UsageWriter that batches them off the request path."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.policy.keys import require_aware

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request used and cost. Token counts follow OpenAI: `cached_tokens` is part of `prompt_tokens`, and
    `reasoning_tokens` is part of `completion_tokens`."""

    request_id: str  # unique: a store ignores a second record with the same id, so a retried batch never counts twice
    key_id: str
    model: str  # the catalog name the caller asked for
    deployment: str  # which of the model's deployments served it
    provider: str
    started_at: datetime
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int | None = None  # None: the model has no price (never 0, which would read as "free")
    status: str = "ok"  # "ok", or the ErrorReason name the request ended with
    stream: bool = False
    cancelled: bool = False
    estimated: bool = False  # the tokens were counted by the gateway because the upstream reported none
    duration_s: float = 0.0
    first_token_s: float | None = None  # time to the first output; None if there was none
    caller_request_id: str = ""  # the X-Request-Id the caller sent or was given, to join logs; not unique

    def __post_init__(self) -> None:
        require_aware("started_at", self.started_at)
        counts = (self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.reasoning_tokens)
        if min(counts) < 0:
            raise ValueError(f"token counts must not be negative: {counts}")


class UsageSink(Protocol):
    """Where the writer puts batches: every Store is one."""

    async def record_usage(self, records: Sequence[UsageRecord]) -> None: ...


class UsageBufferFull(Exception):
    """Raised by `UsageWriter.submit` only when the operator chose fail-closed metering and the buffer is full."""


class UsageWriter:
    """A bounded buffer of usage records and one background task that writes them in batches.

    `submit` never waits: a full buffer drops the record and counts it in `dropped` (or raises `UsageBufferFull`
    when `fail_closed`). A failing store is retried with capped exponential backoff while records wait in the
    buffer, which is the only place they wait, so a store that stays down fills the buffer and turns into drops, never
    into slow completions. `close()` is the shutdown drain: it writes everything still buffered, giving up only after
    `drain_timeout` seconds of a store that keeps failing (what it gives up on is counted in `dropped`).

    Usage:
        writer = UsageWriter(store)
        writer.start()
        writer.submit(record)   # from the request path
        await writer.close()    # at shutdown, after the server stops taking requests
    """

    def __init__(
        self,
        sink: UsageSink,
        *,
        max_buffer: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        fail_closed: bool = False,
        retry_initial: float = 0.1,
        retry_max: float = 10.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if not 0 < batch_size <= max_buffer:
            raise ValueError(f"need 0 < batch_size <= max_buffer, got {batch_size} and {max_buffer}")
        self._sink = sink
        self._max_buffer = max_buffer
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._fail_closed = fail_closed
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._drain_timeout = drain_timeout
        self._buffer: collections.deque[UsageRecord] = collections.deque()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # set after each batch written, for `flush`
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # records refused because the buffer was full, or abandoned by a drain that timed out
        self.written = 0  # records the store accepted
        self.failures = 0  # failed store calls (each one retried)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        """Whether a record submitted now would be dropped."""
        return len(self._buffer) >= self._max_buffer

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    def submit(self, record: UsageRecord) -> bool:
        """Buffer one record without waiting: True if kept, False if dropped (the buffer was full)."""
        if self._closing:
            raise RuntimeError("UsageWriter is closed")
        if len(self._buffer) >= self._max_buffer:
            if self._fail_closed:
                raise UsageBufferFull(f"usage buffer full ({self._max_buffer} records): metering is fail-closed")
            self.dropped += 1
            return False
        self._buffer.append(record)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
        return True

    async def flush(self, timeout: float = 2.0) -> None:
        """Write what is buffered now, before a report reads the store (this process's own records, read back at
        once); gives up quietly after `timeout`, leaving the records buffered for the writer's next try."""
        target = self.written + len(self._buffer)
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.written < target and self._task is not None and not self._task.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)

    async def close(self) -> None:
        """Stop taking records and write every one still buffered (the shutdown drain)."""
        self._closing = True
        self._wake.set()
        if self._task is None:  # never started: drain inline
            self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._drain_timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            lost, self.dropped = len(self._buffer), self.dropped + len(self._buffer)
            self._buffer.clear()
            log.error("usage drain gave up after %.1fs: %d records lost", self._drain_timeout, lost)

    async def _run(self) -> None:
        while True:
            if not self._closing and len(self._buffer) < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            # A tick writes what is there, a partial batch too; then full batches while there are any. A partial
            # batch left over waits for the next tick, so busy traffic is written in full batches.
            while self._buffer:
                await self._write_one_batch()
                if not self._closing and len(self._buffer) < self._batch_size:
                    break
            if self._closing and not self._buffer:
                return

    async def _write_one_batch(self) -> None:
        """Write the oldest batch, retrying until the store takes it. Records stay buffered until then, so they
        count against the bound (and a full buffer drops new records rather than growing)."""
        batch = list(itertools.islice(self._buffer, self._batch_size))
        delay = self._retry_initial
        while True:
            started = time.monotonic()
            try:
                await self._sink.record_usage(batch)
            except Exception as exc:  # any store failure: keep the records and retry; never lose them silently
                self.failures += 1
                log.warning("usage write of %d records failed (%s); retrying in %.2fs", len(batch), exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max)
                continue
            for _ in batch:  # only this task removes from the left; submit() only appends on the right
                self._buffer.popleft()
            self.written += len(batch)
            self._progress.set()
            log.debug("wrote %d usage records in %.3fs", len(batch), time.monotonic() - started)
            return
