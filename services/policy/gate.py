"""Policy: the core's one check of every call (who is calling, may it use this model, can it pay) and its meter.

Every gRPC call to the core carries the caller's key in `authorization: Bearer <key>` metadata: the bridge
forwards its HTTP caller's header, an internal service sends its own key. The core authenticates it here, so there
is no path to a completion (or to the key list) that skips this check; the bridge checks nothing the core does not.

Two kinds of key are accepted:
- static keys from the settings (MODELMAX_API_KEY(S), the keys file): every model, no budget, identified by a
  fingerprint (`static-<sha256 prefix>`); the simple mode, with no database;
- keys in the policy store (`mm-<id>-<secret>`): allowed models, a budget, expiry and revocation, looked up
  through the per-process KeyCache, whose TTL bounds how long a revoked key keeps working on another replica.

Per completion: `authenticate`, then `admit` (model allowed, price known for a budgeted key, budget reserved), then
`meter` once it ended however it ended: one UsageRecord to the batching writer, and the reservation settled to the
real cost. The store being unreachable is handled as the operator chose (`fail_closed`): refuse what cannot be
checked (POLICY_UNAVAILABLE), or serve (cached keys past their TTL, budgets unreserved) and count it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from modelmax.v1 import completion_pb2 as pb
from services.errors import GatewayError, shown
from services.policy.cache import KeyCache, KeyRefused
from services.policy.keys import Budget, KeyKind, KeyRecord
from services.policy.limits import Grant, KeyLimits, Limiter, LimiterUnavailable, MemoryLimiter, RateLimited
from services.policy.store import Reservation, Store
from services.policy.usage import UsageRecord, UsageWriter
from services.prices import Price

log = logging.getLogger(__name__)

AUTHORIZATION: Final = "authorization"  # gRPC metadata: "Bearer <key>", as in HTTP
STATIC_NAME: Final = "static"  # the name of every key from the settings
# Reservations need an output bound when the request sets none: this many tokens (the store admits while anything
# is left, so a small bound risks overspending by more than one reservation, a large one only makes admission
# stricter near the end of a budget).
DEFAULT_RESERVED_OUTPUT: Final = 4096
_IMAGE_TOKENS: Final = 2048  # a bound on what one image costs as prompt tokens (providers count 258 to ~1,600)
_MESSAGE_TOKENS: Final = 8  # the chat template's tokens around each message

_UNAUTHENTICATED = pb.ErrorReason.ERROR_REASON_UNAUTHENTICATED
_DENIED = pb.ErrorReason.ERROR_REASON_PERMISSION_DENIED
_UNAVAILABLE = pb.ErrorReason.ERROR_REASON_POLICY_UNAVAILABLE
_LIMIT_WORDS: Final = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "requests in flight at once",
}
_REFUSED_MESSAGES: Final[Mapping[str, str]] = {
    "malformed": "Incorrect API key provided.",
    "unknown": "Incorrect API key provided.",
    "wrong_secret": "Incorrect API key provided.",
    "revoked": "This API key has been revoked.",
    "expired": "This API key has expired.",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `key_id` and `name` are safe to log; the key itself never leaves `authenticate`."""

    key_id: str
    name: str
    kind: KeyKind
    record: KeyRecord | None = None  # None: a static key (every model, no budget, no expiry)

    def allows(self, model: str) -> bool:
        return self.record is None or self.record.allows_model(model)


@dataclass(slots=True)
class Admission:
    """What `admit` let through: the price the request is metered at and the budget it holds, if any."""

    principal: Principal
    price: Price | None
    budget: Budget | None = None  # set: `reserve` must hold the request's cost against it before the call
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    reservation: Reservation | None = None


@dataclass(frozen=True, slots=True)
class Tokens:
    """A provider's usage report, in OpenAI's sense (cached within prompt, reasoning within completion)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a completion ended, as the servicer measured it."""

    request_id: str  # the caller's (the bridge's X-Request-Id, or whatever a direct caller sent)
    model: str
    deployment: str
    provider: str
    status: str  # "ok", "cancelled", or a status label (services.metrics.status_of)
    stream: bool
    duration_s: float
    first_token_s: float | None
    usage: Tokens | None  # as the provider reported it; None when it reported none
    output_chars: int  # generated text (and tool arguments) relayed, for the estimate when usage is None
    produced: bool  # a provider started answering (so the prompt was, at least, read and billed upstream)


def static_key_id(key: str) -> str:
    """A static key's id: a short fingerprint, stable across restarts, that does not reveal the key."""
    return "static-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class StaticKeys:
    """The settings' keys as bytes; every check compares against every key, so timing says nothing about which
    matched (or whether one did)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple((key.encode(), Principal(static_key_id(key), STATIC_NAME, "inference")) for key in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, presented: bytes) -> Principal | None:
        found = None
        for key, principal in self._keys:  # no early exit
            if hmac.compare_digest(presented, key):
                found = principal
        return found


class Policy:
    """The core's policy point. Build with `Policy(static_keys)` (static mode) or with a store, cache and writer."""

    def __init__(
        self,
        static: StaticKeys,
        store: Store | None = None,
        *,
        cache: KeyCache | None = None,
        writer: UsageWriter | None = None,
        fail_closed: bool = False,
        reserved_output: int = DEFAULT_RESERVED_OUTPUT,
        limiter: Limiter | None = None,
        limits_fail_closed: bool = False,
    ) -> None:
        if store is not None and (cache is None or writer is None):
            raise ValueError("a policy with a store needs its key cache and usage writer")
        self.static = static
        self.store = store
        self.cache = cache
        self.writer = writer
        self.fail_closed = fail_closed
        self._reserved_output = reserved_output
        self.limiter: Limiter = limiter or MemoryLimiter()
        self.limits_fail_closed = limits_fail_closed
        self.limiter_errors = 0  # limiter calls that failed (Redis unreachable); exported as a metric
        self._limiter_warned = 0.0  # when the last warning about it was logged (one per 10 s at most)
        self._settling: set[asyncio.Task[None]] = set()
        self.store_errors = 0  # store calls that failed (each logged); exported as a metric

    @classmethod
    def open(
        cls,
        static: StaticKeys,
        store: Store | None,
        *,
        cache_ttl: float,
        fail_closed: bool,
        max_buffer: int,
        limiter: Limiter | None = None,
        limits_fail_closed: bool = False,
    ) -> Policy:
        """A policy over `store` (None: static keys only), with its cache and a started usage writer."""
        if store is None:
            return cls(static, fail_closed=fail_closed, limiter=limiter, limits_fail_closed=limits_fail_closed)
        writer = UsageWriter(store, max_buffer=max_buffer, batch_size=min(500, max_buffer))
        writer.start()
        return cls(
            static, store, cache=KeyCache(store, ttl=cache_ttl), writer=writer, fail_closed=fail_closed,
            limiter=limiter, limits_fail_closed=limits_fail_closed,
        )  # fmt: skip

    async def aclose(self) -> None:
        """The shutdown drain: settle what is in flight, then write every buffered usage record."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.limiter.aclose()
        if self.writer is not None:
            await self.writer.close()
        if self.store is not None:
            await self.store.close()

    # authentication

    async def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, *, kind: KeyKind = "inference"
    ) -> Principal:
        """The caller of a call with this metadata, or GatewayError (UNAUTHENTICATED, PERMISSION_DENIED for a key
        of the other kind, POLICY_UNAVAILABLE when the store cannot say)."""
        header = ""
        for name, value in metadata or ():
            if name == AUTHORIZATION and isinstance(value, str):
                header = value
                break
        scheme, _, token = header.partition(" ")
        presented = token.strip()
        if not presented or scheme.lower() != "bearer":
            raise GatewayError(
                _UNAUTHENTICATED, "No API key: send it in the call's metadata as `authorization: Bearer <key>`."
            )
        principal = self.static.find(presented.encode())
        if principal is None:
            principal = await self._stored(presented, kind)
        if principal.kind != kind:
            raise _wrong_kind(principal.kind)
        return principal

    async def _stored(self, presented: str, kind: KeyKind) -> Principal:
        if self.cache is None:
            raise GatewayError(_UNAUTHENTICATED, _REFUSED_MESSAGES["unknown"])
        try:
            record = await self.cache.authenticate(presented, kind=kind)
        except KeyRefused as refused:
            if refused.reason == "wrong_kind":
                raise _wrong_kind("management" if kind == "inference" else "inference") from None
            raise GatewayError(_UNAUTHENTICATED, _REFUSED_MESSAGES[refused.reason]) from None
        except Exception as exc:  # noqa: BLE001 (the store failed: answer as configured, never a 500)
            record = self._stale(presented, kind, exc)
        return Principal(record.id, record.name, record.kind, record)

    def _stale(self, presented: str, kind: KeyKind, exc: Exception) -> KeyRecord:
        """While the store is down: fail-open serves a key this process has seen (however long ago), checked as
        the cache would; fail-closed, or a key never seen, is POLICY_UNAVAILABLE (never a 401: the key may be
        fine)."""
        self._store_failed("key lookup", exc)
        assert self.cache is not None
        record = None if self.fail_closed else self.cache.stale(presented)
        if record is None or record.kind != kind or not record.is_active(datetime.now(UTC)):
            raise GatewayError(
                _UNAVAILABLE, "The gateway cannot check API keys right now; retry shortly.", retry_after=1
            )
        return record

    # admission

    @staticmethod
    def check_model(principal: Principal, model: str) -> None:
        """PERMISSION_DENIED for a model outside the key's allowed models. Checked before the catalog is, so a
        restricted key learns nothing about the models it may not use (not even whether they exist)."""
        if not principal.allows(model):
            raise GatewayError(_DENIED, f"This API key may not use the model '{shown(model)}'.", field="model")

    def admit(self, principal: Principal, params: pb.CompletionParams, price: Price | None) -> Admission:
        """What `principal` runs `params` under: its price, and whether a budget must be reserved (`reserve`).
        PERMISSION_DENIED for an unpriced model and a key with a budget; POLICY_UNAVAILABLE when metering is
        fail-closed and cannot keep up. No store is touched here."""
        record = principal.record
        if self.writer is not None and self.fail_closed and self.writer.full:
            raise GatewayError(
                _UNAVAILABLE, "The gateway cannot meter requests right now; retry shortly.", retry_after=1
            )
        budget = None if record is None else record.budget
        if budget is not None and price is None:
            raise GatewayError(
                _DENIED,
                f"The model '{params.model}' has no price, and this API key has a budget: it may use priced models "
                "only.",
                field="model",
            )
        return Admission(principal, price, budget=budget)

    async def reserve(self, admission: Admission, params: pb.CompletionParams) -> None:
        """Hold an upper bound of the request's cost against the key's budget, or raise BUDGET_EXHAUSTED."""
        budget, price = admission.budget, admission.price
        assert budget is not None and price is not None and self.store is not None
        out = params.max_tokens if params.HasField("max_tokens") else self._reserved_output
        amount = price.estimate_micros(prompt_bound(params), out * max(params.choice_count, 1))
        try:
            admission.reservation = await self.store.reserve(
                admission.principal.key_id, amount, budget.window_start(admission.started_at), budget.amount_micros
            )
        except Exception as exc:  # noqa: BLE001 (the store failed: answer as configured)
            self._store_failed("budget reservation", exc)
            if self.fail_closed:
                raise GatewayError(
                    _UNAVAILABLE, "The gateway cannot check budgets right now; retry shortly.", retry_after=1
                ) from None
            return  # served unreserved: the spend is still metered when the store is back
        if admission.reservation is None:
            period = "in total" if budget.period == "total" else f"this {budget.period}"
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_BUDGET_EXHAUSTED,
                f"This API key has used its budget ({_usd(budget.amount_micros)} {period}).",
            )

    # metering

    async def limit(self, principal: Principal, params: pb.CompletionParams, lease: str) -> Grant | None:
        """Count the request against its key's rate limits (services/policy/limits.py), or raise RATE_LIMITED with
        the retry delay and the key's x-ratelimit-* values; None for a key without limits."""
        record = principal.record
        if record is None or (record.rpm is None and record.tpm is None and record.max_concurrent is None):
            return None
        limits = KeyLimits(record.rpm, record.tpm, record.max_concurrent)
        tokens = 0
        if limits.tpm is not None:
            out = params.max_tokens if params.HasField("max_tokens") else self._reserved_output
            tokens = prompt_estimate(params) + out * max(params.choice_count, 1)
            if tokens > limits.tpm:  # could never pass: not a wait, a request to change
                raise GatewayError(
                    pb.ErrorReason.ERROR_REASON_INVALID_REQUEST,
                    f"This request may use {tokens} tokens (its prompt and max_tokens), more than the key's limit of "
                    f"{limits.tpm} tokens per minute; lower max_tokens or shorten the prompt.",
                    field="max_tokens",
                )
        try:
            return await self.limiter.acquire(principal.key_id, limits, tokens, lease)
        except LimiterUnavailable as exc:
            self._limiter_failed("check", exc)
            if self.limits_fail_closed:
                raise GatewayError(
                    _UNAVAILABLE, "The gateway cannot check this key's rate limits right now; retry shortly.",
                    retry_after=1,
                ) from None  # fmt: skip
            return None  # fail-open: served, uncounted
        except RateLimited as exc:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_RATE_LIMITED,
                f"Rate limit reached for this key: {_LIMIT_WORDS[exc.which]}. Retry after {exc.retry_after:.1f}s.",
                retry_after=exc.retry_after,
                headers=exc.usage.metadata(),
            ) from None

    def unlimit(self, grant: Grant, used_tokens: int) -> None:
        """Settle a grant of `limit` to the tokens the request used, and give its slot back (off the request path:
        the limiter does not wait for it, and it is sent on the loop's next turn, once the answer has gone)."""
        asyncio.get_running_loop().call_soon(self.limiter.release, grant, used_tokens, self._unlimit_failed)

    def _unlimit_failed(self, exc: LimiterUnavailable) -> None:
        # the slot frees itself when its lease expires, the tokens with the window
        self._limiter_failed("settlement", exc)

    def _limiter_failed(self, what: str, exc: Exception) -> None:
        self.limiter_errors += 1
        now = time.monotonic()
        if now - self._limiter_warned >= 10.0:  # an outage is one line per 10 s, not one per request
            self._limiter_warned = now
            mode = "refusing keys with limits" if self.limits_fail_closed else "serving keys with limits uncounted"
            log.warning("rate limiter unavailable (%s failed: %s); %s", what, exc.__cause__ or exc, mode)

    def meter(self, admission: Admission, outcome: Outcome, params: pb.CompletionParams) -> UsageRecord | None:
        """Record what the completion used, and settle its reservation to that cost (off the request path)."""
        if self.writer is None:
            return None
        record = usage_record(admission, outcome, params)
        if not self.writer.submit(record):  # counted in the writer's `dropped` (a metric)
            log.error("usage buffer full: request %s of key %s not metered", record.request_id, record.key_id)
        if admission.reservation is not None:
            task = asyncio.create_task(self._settle(admission.reservation, record.cost_micros or 0))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        return record

    async def _settle(self, reservation: Reservation, cost: int) -> None:
        assert self.store is not None
        try:
            await self.store.settle(reservation, cost)
        except Exception as exc:  # noqa: BLE001 (the hold lapses on its own; the usage record has the cost)
            self._store_failed("budget settle", exc)

    def _store_failed(self, what: str, exc: Exception) -> None:
        self.store_errors += 1
        log.warning("policy store failed (%s): %s: %s", what, type(exc).__name__, exc)


def usage_record(admission: Admission, outcome: Outcome, params: pb.CompletionParams) -> UsageRecord:
    """The record of one completion: the provider's usage when it reported one, else an estimate (marked so) when a
    provider answered or the caller cancelled, else nothing used."""
    usage = outcome.usage
    estimated = False
    if usage is not None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cached, reasoning = usage.cached_tokens, usage.reasoning_tokens
    elif outcome.produced or outcome.status == "cancelled":
        estimated = True
        prompt = prompt_estimate(params)  # the likely size, never the reservation's upper bound
        completion = math.ceil(outcome.output_chars / 4)
        cached = reasoning = 0
    else:
        prompt = completion = cached = reasoning = 0
    price = admission.price
    cost = None if price is None else price.cost_micros(prompt, cached, completion)
    return UsageRecord(
        request_id=record_id(),  # the core's own: a caller's request id may repeat, a record's must not
        caller_request_id=outcome.request_id,
        key_id=admission.principal.key_id,
        model=outcome.model,
        deployment=outcome.deployment,
        provider=outcome.provider,
        started_at=admission.started_at,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        cost_micros=cost,
        status=outcome.status,
        stream=outcome.stream,
        cancelled=outcome.status == "cancelled",
        estimated=estimated,
        duration_s=outcome.duration_s,
        first_token_s=outcome.first_token_s,
    )


def record_id() -> str:
    """A unique id that sorts by time: nanoseconds since the epoch, then 64 random bits (hex, 32 characters).

    Time first, so the usage table's primary-key index grows at its right edge, as a log does: random ids (uuid4)
    land on random pages of an index that soon outgrows the page cache, and each insert costs a page read.
    """
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


def _text_size(params: pb.CompletionParams) -> tuple[int, int, int]:
    """(characters of text, UTF-8 bytes of text, images) in the prompt: messages, tool calls, reasoning given back,
    tool definitions, the response format's schema (redacted reasoning is opaque bytes, not text)."""
    chars = octets = images = 0
    texts: list[str] = []
    for message in params.messages:
        texts.append(message.content)
        for part in message.parts:
            if part.HasField("image"):
                images += 1
            else:
                texts.append(part.text)
        for call in message.tool_calls:
            texts += (call.name, call.arguments)
        texts += (block.text for block in message.reasoning)
    for tool in params.tools:
        texts += (tool.name, tool.description, tool.parameters)
    texts.append(params.response_format.schema)
    for text in texts:
        chars += len(text)
        octets += len(text.encode()) if not text.isascii() else len(text)
    return chars, octets, images


def prompt_estimate(params: pb.CompletionParams) -> int:
    """A likely prompt size in tokens (about four characters a token), for a request the provider never counted;
    at least one token per message, so a cancelled request is never metered at 0."""
    chars, _, images = _text_size(params)
    return max(1, math.ceil(chars / 4) + _MESSAGE_TOKENS * len(params.messages) + _IMAGE_TOKENS * images)


def prompt_bound(params: pb.CompletionParams) -> int:
    """An upper bound of the prompt in tokens, for a budget reservation: a byte-level tokenizer's token covers at
    least one byte, so the text's UTF-8 length bounds its tokens."""
    _, octets, images = _text_size(params)
    return octets + _MESSAGE_TOKENS * len(params.messages) + _IMAGE_TOKENS * images


def _wrong_kind(kind: KeyKind) -> GatewayError:
    if kind == "management":
        return GatewayError(_DENIED, "A management key cannot run completions; use an inference key.")
    return GatewayError(_DENIED, "An inference key cannot manage keys; use a management key.")


def _usd(micros: int) -> str:
    return f"${micros / 1_000_000:,.2f}"
