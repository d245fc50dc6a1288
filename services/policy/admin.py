"""KeyService: key management (management keys only) and key self-inspection (any key), on the policy store.

Every call is authenticated by the one policy point (`Policy.authenticate`), as completions are: GetCurrentKey takes
a key of either kind, static keys included (they have no record: every model, no budget); the other RPCs take a
management key, which only a store can hold, so without a store they are refused as PERMISSION_DENIED (static keys
are inference keys) or UNAUTHENTICATED. Requests are checked here, field by field, before the store is touched; the
store's own refusals and failures are mapped once, in `_stored`:

    KeyNotFound          -> KEY_NOT_FOUND
    KeyRevoked           -> INVALID_REQUEST  ("revoked keys cannot be changed")
    ValueError           -> INVALID_REQUEST  (a value the key model refuses)
    any other exception  -> POLICY_UNAVAILABLE, retry_after=1 (the store failed: never INTERNAL)

A change made here (update, revoke, rotate) is dropped from this process's key cache at once; other replicas see it
within their cache TTL. Each management call writes one log line: the action, the management key that made it, the
key it was about and the outcome; never a secret.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import grpc

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import key_service_pb2 as ks
from modelmax.v1 import key_service_pb2_grpc as ks_grpc
from services.errors import GatewayError, invalid_request, shown
from services.policy import key_messages as km
from services.policy.gate import Policy
from services.policy.keys import KeyKind, KeyRecord, KeySpec, Period, window_start
from services.policy.store import UNSET, GroupBy, KeyChanges, KeyNotFound, KeyRevoked, Store

log = logging.getLogger(__name__)

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]

_REQUEST_ID: Final = "x-request-id"
_UNAVAILABLE = pb.ErrorReason.ERROR_REASON_POLICY_UNAVAILABLE

_GROUP_BY: Final[dict[ks.UsageGrouping.ValueType, GroupBy]] = {
    ks.UsageGrouping.USAGE_GROUPING_KEY: "key",
    ks.UsageGrouping.USAGE_GROUPING_MODEL: "model",
    ks.UsageGrouping.USAGE_GROUPING_DAY: "day",
}
# UpdateKey's mask paths.
_UPDATABLE: Final = (
    "name", "owner", "expire_time", "allowed_models", "budget", "budget.amount_micros", "budget.period", "rpm", "tpm",
    "max_concurrent",
)  # fmt: skip


@dataclass(slots=True)
class _Audit:
    """What a management call's log line says."""

    action: str
    request_id: str
    key_id: str  # the key the call is about ("" until a created key has its id)
    by: str = ""  # the management key's id, once authenticated


class KeyServicer(ks_grpc.KeyServiceServicer):
    """KeyService over `policy` (its store, cache and authentication); `models` are the catalog's public names,
    the only names `allowed_models` may hold."""

    def __init__(self, policy: Policy, models: Iterable[str]) -> None:
        self._policy = policy
        self._models = frozenset(models)

    # self-inspection

    async def GetCurrentKey(  # noqa: N802 (gRPC method name)
        self, request: ks.GetCurrentKeyRequest, context: Context
    ) -> ks.GetCurrentKeyResponse:
        return await _answer(context, "GetCurrentKey", lambda: self._current(context))

    async def _current(self, context: Context) -> ks.GetCurrentKeyResponse:
        metadata = context.invocation_metadata()
        try:
            principal = await self._policy.authenticate(metadata, kind="inference")
        except GatewayError as exc:
            if exc.reason != pb.ErrorReason.ERROR_REASON_PERMISSION_DENIED:
                raise
            principal = await self._policy.authenticate(metadata, kind="management")  # a key may inspect itself
        now = datetime.now(UTC)
        record = principal.record
        budget = None if record is None else record.budget
        period: Period = "month" if budget is None else budget.period
        start = window_start(period, now)
        reply = ks.GetCurrentKeyResponse(
            key=km.static_api_key(principal) if record is None else km.api_key(record, now),
            usage_period=km.PERIOD[period],
            period_start_time=km.to_timestamp(start),
        )
        store = self._policy.store
        if store is None:
            return reply
        if self._policy.writer is not None:
            await self._policy.writer.flush()  # this replica's own records, read back at once
        rows = await self._stored(store.usage_report(start, now, "key", key_id=principal.key_id))
        mine = next((row for row in rows if row.group == principal.key_id), None)
        reply.usage.CopyFrom(km.usage_totals(mine) if mine else ks.UsageTotals(group=principal.key_id, cost_micros=0))
        if record is not None and budget is not None:
            state = await self._stored(store.budget_state(record.id, start))
            remaining = max(0, budget.amount_micros - state.spent_micros - state.held_micros)
            reply.budget_status.CopyFrom(
                ks.BudgetStatus(
                    spent_micros=state.spent_micros, held_micros=state.held_micros, remaining_micros=remaining
                )
            )
        return reply

    # management

    async def CreateKey(self, request: ks.CreateKeyRequest, context: Context) -> ks.CreateKeyResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.CreateKeyResponse:
            now = datetime.now(UTC)
            spec = self._spec(request.key, now)
            record, whole = await self._stored(store.create_key(spec))
            audit.key_id = record.id
            return ks.CreateKeyResponse(key=km.api_key(record, now), secret_key=whole)

        return await self._manage(context, "CreateKey", "", work)

    async def ListKeys(self, request: ks.ListKeysRequest, context: Context) -> ks.ListKeysResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.ListKeysResponse:
            owner = request.owner if request.HasField("owner") else None
            records = await self._stored(store.list_keys(owner=owner, include_revoked=request.include_revoked))
            now = datetime.now(UTC)
            return ks.ListKeysResponse(keys=[km.api_key(record, now) for record in records])

        return await self._manage(context, "ListKeys", "", work)

    async def GetKey(self, request: ks.GetKeyRequest, context: Context) -> ks.GetKeyResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.GetKeyResponse:
            record = await self._existing(store, request.key_id, "key_id")
            return ks.GetKeyResponse(key=km.api_key(record, datetime.now(UTC)))

        return await self._manage(context, "GetKey", request.key_id, work)

    async def UpdateKey(self, request: ks.UpdateKeyRequest, context: Context) -> ks.UpdateKeyResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.UpdateKeyResponse:
            key_id = request.key.id
            paths = set(request.update_mask.paths)
            if not paths:
                raise invalid_request("'update_mask' must name the fields to change.", field="update_mask")
            for path in sorted(paths):
                if path not in _UPDATABLE:
                    raise invalid_request(
                        f"update_mask names '{shown(path)}', which cannot be changed; the fields that can are: "
                        f"{', '.join(_UPDATABLE)}.",
                        field="update_mask",
                    )
            current = await self._existing(store, key_id, "key.id")
            if current.revoked_at is not None:
                raise _revoked("key.id")
            now = datetime.now(UTC)
            changes = self._changes(request.key, paths, current, now)
            record = await self._stored(store.update_key(key_id, changes), key_id=key_id, field="key.id")
            self._forget(key_id)
            return ks.UpdateKeyResponse(key=km.api_key(record, now))

        return await self._manage(context, "UpdateKey", request.key.id, work)

    async def RevokeKey(self, request: ks.RevokeKeyRequest, context: Context) -> ks.RevokeKeyResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.RevokeKeyResponse:
            key_id = km.required_id(request.key_id, "key_id")
            record = await self._stored(store.revoke_key(key_id), key_id=key_id, field="key_id")
            self._forget(key_id)
            return ks.RevokeKeyResponse(key=km.api_key(record, datetime.now(UTC)))

        return await self._manage(context, "RevokeKey", request.key_id, work)

    async def RotateKey(self, request: ks.RotateKeyRequest, context: Context) -> ks.RotateKeyResponse:  # noqa: N802
        async def work(store: Store, audit: _Audit) -> ks.RotateKeyResponse:
            key_id = km.required_id(request.key_id, "key_id")
            record, whole = await self._stored(store.rotate_key(key_id), key_id=key_id, field="key_id")
            self._forget(key_id)
            return ks.RotateKeyResponse(key=km.api_key(record, datetime.now(UTC)), secret_key=whole)

        return await self._manage(context, "RotateKey", request.key_id, work)

    async def GetUsageReport(  # noqa: N802
        self, request: ks.GetUsageReportRequest, context: Context
    ) -> ks.GetUsageReportResponse:
        async def work(store: Store, audit: _Audit) -> ks.GetUsageReportResponse:
            start = km.instant(request.HasField("start_time"), request.start_time, "start_time")
            end = km.instant(request.HasField("end_time"), request.end_time, "end_time")
            if start >= end:
                raise invalid_request(
                    "'end_time' must be after the start time (the end is excluded).", field="end_time"
                )
            group_by = _GROUP_BY.get(request.group_by)
            if group_by is None:
                raise invalid_request("'group_by' must be key, model or day.", field="group_by")
            if self._policy.writer is not None:
                await self._policy.writer.flush()
            rows = await self._stored(store.usage_report(start, end, group_by))
            return ks.GetUsageReportResponse(rows=[km.usage_totals(row) for row in rows])

        return await self._manage(context, "GetUsageReport", "", work)

    # the steps

    async def _manage(
        self, context: Context, action: str, key_id: str, work: Callable[[Store, _Audit], Awaitable[R]]
    ) -> R:
        """Authenticate a management key, run `work` on the store, and log the call once, however it ended."""
        metadata = context.invocation_metadata()
        audit = _Audit(action, _request_id(metadata), shown(key_id))

        async def audited() -> R:
            outcome = "ERROR_REASON_INTERNAL"  # unless it ends otherwise
            try:
                principal = await self._policy.authenticate(metadata, kind="management")
                audit.by = principal.key_id
                store = self._policy.store
                if store is None:  # not reached: only a store holds management keys
                    raise GatewayError(_UNAVAILABLE, "The gateway has no key store.")
                result = await work(store, audit)
                outcome = "ok"
                return result
            except GatewayError as exc:
                outcome = pb.ErrorReason.Name(exc.reason)
                raise
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                log.info(
                    "key management: %s of key %s by management key %s: %s",
                    action,
                    audit.key_id or "-",
                    audit.by or "-",
                    outcome,
                    extra={
                        "request_id": audit.request_id,
                        "action": action,
                        "key_id": audit.key_id,
                        "management_key_id": audit.by,
                        "outcome": outcome,
                    },
                )

        return await _answer(context, action, audited)

    async def _stored(self, step: Awaitable[R], *, key_id: str = "", field: str = "") -> R:
        """The store's answer, or its refusal or failure as a GatewayError."""
        try:
            return await step
        except KeyNotFound:
            raise _not_found(key_id, field) from None
        except KeyRevoked:
            raise _revoked(field) from None
        except ValueError as exc:
            raise invalid_request(str(exc), field=field) from None
        except Exception as exc:  # noqa: BLE001 (the store failed: retryable, never INTERNAL)
            self._policy.store_errors += 1
            log.warning("policy store failed (key management): %s: %s", type(exc).__name__, exc)
            raise GatewayError(
                _UNAVAILABLE, "The gateway cannot reach its key store right now; retry shortly.", retry_after=1
            ) from None

    async def _existing(self, store: Store, key_id: str, field: str) -> KeyRecord:
        record = await self._stored(store.get_key(km.required_id(key_id, field)))
        if record is None:
            raise _not_found(key_id, field)
        return record

    def _forget(self, key_id: str) -> None:
        if self._policy.cache is not None:
            self._policy.cache.invalidate(key_id)

    # requests to the key model

    def _spec(self, key: ks.ApiKey, now: datetime) -> KeySpec:
        kind: KeyKind = "management" if key.kind == ks.KeyKind.KEY_KIND_MANAGEMENT else "inference"
        if key.kind not in (ks.KeyKind.KEY_KIND_UNSPECIFIED, *km.KIND.values()):
            raise invalid_request("'key.kind' must be inference or management.", field="key.kind")
        limits: dict[str, Any] = {
            "allowed_models": self._allowed(key),
            "budget": km.budget_of_key(key),
            "rpm": km.limit_of(key.HasField("rpm"), key.rpm, "rpm"),
            "tpm": km.limit_of(key.HasField("tpm"), key.tpm, "tpm"),
            "max_concurrent": km.limit_of(key.HasField("max_concurrent"), key.max_concurrent, "max_concurrent"),
        }
        if kind == "management":  # before the key model, which refuses the same, so the error names the field
            for attribute, field in km.INFERENCE_ONLY:
                if limits[attribute] is not None:
                    raise invalid_request(
                        f"A management key cannot have 'key.{field}': it manages keys and never calls models.",
                        field=f"key.{field}",
                    )
        try:
            return KeySpec(
                name=km.checked_name(key.name),
                owner=km.checked_owner(key.owner),
                kind=kind,
                expires_at=km.expiry_of(key, now),
                **limits,
            )
        except ValueError as exc:  # each field is checked above; this is the key model's last word
            raise invalid_request(str(exc), field="key") from None

    def _changes(self, key: ks.ApiKey, paths: set[str], current: KeyRecord, now: datetime) -> KeyChanges:
        partly = "budget.amount_micros" in paths or "budget.period" in paths
        # the whole budget, or one part of it (the other kept), or unchanged
        whole = "budget" in paths
        budget = km.budget_of_key(key) if whole else None
        part = km.budget_part(key, paths, current) if partly and not whole else UNSET
        changes = KeyChanges(
            name=km.checked_name(key.name) if "name" in paths else UNSET,
            owner=km.checked_owner(key.owner) if "owner" in paths else UNSET,
            expires_at=km.expiry_of(key, now) if "expire_time" in paths else UNSET,
            allowed_models=self._allowed(key) if "allowed_models" in paths else UNSET,
            budget=budget if whole else part,
            rpm=km.limit_of(key.HasField("rpm"), key.rpm, "rpm") if "rpm" in paths else UNSET,
            tpm=km.limit_of(key.HasField("tpm"), key.tpm, "tpm") if "tpm" in paths else UNSET,
            max_concurrent=km.limit_of(key.HasField("max_concurrent"), key.max_concurrent, "max_concurrent")
            if "max_concurrent" in paths
            else UNSET,
        )
        try:
            after = changes.apply(current)
        except ValueError as exc:
            raise invalid_request(str(exc), field="key") from None
        km.check_kind(current.kind, after)
        return changes

    def _allowed(self, key: ks.ApiKey) -> frozenset[str] | None:
        if not key.HasField("allowed_models"):
            return None
        names = key.allowed_models.models
        if not names:
            raise invalid_request(
                "'key.allowed_models' must name at least one model (leave it unset for every model).",
                field="key.allowed_models",
            )
        for index, name in enumerate(names):
            if name not in self._models:
                field = f"key.allowed_models.models[{index}]"
                raise invalid_request(f"'{field}' names '{shown(name)}', which is not in the catalog.", field=field)
        return frozenset(names)


async def _answer(context: Context, action: str, work: Callable[[], Awaitable[R]]) -> R:
    """`work`'s reply, or its failure as the call's status: a GatewayError as it is, anything else (a bug) as
    INTERNAL, logged once with its traceback."""
    try:
        return await work()
    except GatewayError as exc:
        status = exc.to_status()
    except Exception:  # noqa: BLE001 (a bug: report INTERNAL, log once)
        log.exception("internal error serving KeyService.%s", action)
        status = GatewayError(
            pb.ErrorReason.ERROR_REASON_INTERNAL, "The gateway failed to serve this request."
        ).to_status()
    # grpc.aio's context has abort_with_status (grpc/aio/_base_server.py); grpc-stubs 1.53 does not declare it
    await context.abort_with_status(status)  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status raises")  # not reached


def _not_found(key_id: str, field: str) -> GatewayError:
    return GatewayError(
        pb.ErrorReason.ERROR_REASON_KEY_NOT_FOUND, f"No API key has the id '{shown(key_id)}'.", field=field
    )


def _revoked(field: str) -> GatewayError:
    return invalid_request("The key is revoked: revoked keys cannot be changed or rotated.", field=field)


def _request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for name, value in metadata or ():
        if name == _REQUEST_ID and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex
