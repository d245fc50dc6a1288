"""KeyService through its generated stubs over a real channel: who may call it, field masks, errors as ErrorInfo, a
store that fails, reflection and health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from modelmax.v1 import key_service_pb2 as ks
from modelmax.v1 import key_service_pb2_grpc as ks_grpc
from services.policy import open_store
from services.policy.keys import KeySpec
from tests.conftest import API_KEY, running_core, write_catalog
from tests.policy_stores import PostgresServer, fresh_database

MODELS: list[dict[str, object]] = [
    {"name": "alpha", "provider": "openai", "model": "a", "options": {"base_url": "http://127.0.0.1:9"}}
]
MONTH = ks.BudgetPeriod.BUDGET_PERIOD_MONTH
DAY = ks.BudgetPeriod.BUDGET_PERIOD_DAY
BY_KEY = ks.UsageGrouping.USAGE_GROUPING_KEY


@dataclass
class Core:
    keys: ks_grpc.KeyServiceAsyncStub
    channel: grpc.aio.Channel
    admin: tuple[tuple[str, str], ...]  # metadata of the management key
    admin_id: str


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _core(tmp_path: Path, database_url: str) -> AsyncIterator[Core]:
    store = await open_store(database_url)
    try:
        record, key = await store.create_key(KeySpec(name="admin", kind="management"))
    finally:
        await store.close()
    # reflection on: test_reflection_and_health_know_the_service lists the services through it
    async with running_core(write_catalog(tmp_path, MODELS), database_url=database_url, reflection=True) as core:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            yield Core(ks_grpc.KeyServiceStub(channel), channel, bearer(key), record.id)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async for made in _core(tmp_path, f"sqlite:///{tmp_path}/policy.sqlite3"):
        yield made


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]  # an aio error is a Call too
    assert status is not None, "the error carries a google.rpc.Status"
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == "modelmax.v1"
    return info


async def refused(call: Awaitable[object], code: grpc.StatusCode, reason: str, field: str | None = None) -> str:
    """Await a call that must fail; returns its message."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    info = error_info(raised.value)
    assert info.reason == reason
    if field is not None:
        assert info.metadata["field"] == field
    return raised.value.details() or ""


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out


async def test_create_update_by_mask_rotate_revoke(core: Core, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.policy.admin")
    keys, admin = core.keys, core.admin
    spec = ks.ApiKey(name="svc", owner="team-b", budget=ks.Budget(amount_micros=3_000_000, period=MONTH), tpm=1000)
    created = await keys.CreateKey(ks.CreateKeyRequest(key=spec), metadata=admin)
    key = created.key
    assert created.secret_key.startswith(f"mm-{key.id}-")
    assert (key.kind, key.state, key.HasField("allowed_models"), key.tpm, key.HasField("rpm")) == (
        ks.KeyKind.KEY_KIND_INFERENCE, ks.KeyState.KEY_STATE_ACTIVE, False, 1000, False
    )  # fmt: skip

    def update(
        mask: list[str], changed: ks.ApiKey | None = None
    ) -> grpc.aio.UnaryUnaryCall[ks.UpdateKeyRequest, ks.UpdateKeyResponse]:
        changed = changed or ks.ApiKey()
        changed.id = key.id
        request = ks.UpdateKeyRequest(key=changed, update_mask=field_mask_pb2.FieldMask(paths=mask))
        return keys.UpdateKey(request, metadata=admin)

    period = await update(["budget.period"], ks.ApiKey(budget=ks.Budget(period=DAY)))
    assert (period.key.budget.amount_micros, period.key.budget.period) == (3_000_000, DAY), "the amount is kept"
    cleared = await update(
        ["tpm", "budget", "allowed_models"], ks.ApiKey(allowed_models=ks.ModelAllowList(models=["alpha"]))
    )
    assert not cleared.key.HasField("tpm") and not cleared.key.HasField("budget")
    assert list(cleared.key.allowed_models.models) == ["alpha"]
    await refused(update(["kind"]), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "update_mask")
    await refused(update([]), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "update_mask")
    await refused(update(["name"]), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", "key.name")

    itself = await keys.GetCurrentKey(ks.GetCurrentKeyRequest(), metadata=bearer(created.secret_key))
    assert itself.key.id == key.id and itself.usage.requests == 0 and not itself.HasField("budget_status")
    rotated = await keys.RotateKey(ks.RotateKeyRequest(key_id=key.id), metadata=admin)
    await refused(
        keys.GetCurrentKey(ks.GetCurrentKeyRequest(), metadata=bearer(created.secret_key)),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_UNAUTHENTICATED",
    )
    revoked = await keys.RevokeKey(ks.RevokeKeyRequest(key_id=key.id), metadata=admin)
    assert revoked.key.state == ks.KeyState.KEY_STATE_REVOKED and revoked.key.HasField("revoke_time")
    message = await refused(
        keys.GetCurrentKey(ks.GetCurrentKeyRequest(), metadata=bearer(rotated.secret_key)),
        grpc.StatusCode.UNAUTHENTICATED,
        "ERROR_REASON_UNAUTHENTICATED",
    )
    assert "revoked" in message
    again = await keys.RevokeKey(ks.RevokeKeyRequest(key_id=key.id), metadata=admin)
    assert again.key.revoke_time == revoked.key.revoke_time, "revocation is final and keeps its time"
    await refused(
        keys.RotateKey(ks.RotateKeyRequest(key_id=key.id), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_REQUEST",
        "key_id",
    )

    lines = [r for r in caplog.records if r.name == "services.policy.admin"]
    assert [(r.action, r.key_id, r.outcome) for r in lines][:2] == [  # type: ignore[attr-defined]
        ("CreateKey", key.id, "ok"),
        ("UpdateKey", key.id, "ok"),
    ]
    assert all(r.management_key_id == core.admin_id for r in lines)  # type: ignore[attr-defined]
    secrets = (created.secret_key, rotated.secret_key, core.admin[0][1].removeprefix("Bearer "))
    assert not any(s in r.getMessage() + repr(vars(r)) for r in caplog.records for s in secrets), "a secret was logged"


async def test_who_may_call(core: Core) -> None:
    keys = core.keys
    inference = await keys.CreateKey(ks.CreateKeyRequest(key=ks.ApiKey(name="i")), metadata=core.admin)
    for metadata in (bearer(inference.secret_key), bearer(API_KEY)):
        await refused(
            keys.ListKeys(ks.ListKeysRequest(), metadata=metadata),
            grpc.StatusCode.PERMISSION_DENIED,
            "ERROR_REASON_PERMISSION_DENIED",
        )
    await refused(keys.GetKey(ks.GetKeyRequest(key_id="x")), grpc.StatusCode.UNAUTHENTICATED,
                  "ERROR_REASON_UNAUTHENTICATED")  # fmt: skip
    message = await refused(
        keys.GetKey(ks.GetKeyRequest(key_id="abcdefghijkl"), metadata=core.admin),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
        "key_id",
    )
    assert "abcdefghijkl" in message
    static = await keys.GetCurrentKey(ks.GetCurrentKeyRequest(), metadata=bearer(API_KEY))
    assert static.key.static_key and static.key.name == "static" and static.HasField("usage")
    manager = await keys.GetCurrentKey(ks.GetCurrentKeyRequest(), metadata=core.admin)
    assert manager.key.kind == ks.KeyKind.KEY_KIND_MANAGEMENT and manager.key.id == core.admin_id


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (ks.ApiKey(name="x", kind=ks.KeyKind.ValueType(7)), "key.kind"),
        (ks.ApiKey(name="x" * 257), "key.name"),
        (ks.ApiKey(name="x", owner="o" * 257), "key.owner"),
        (ks.ApiKey(name="x", rpm=-1), "key.rpm"),
        (ks.ApiKey(name="x", max_concurrent=0), "key.max_concurrent"),
        (ks.ApiKey(name="x", budget=ks.Budget(amount_micros=5)), "key.budget.period"),
        (ks.ApiKey(name="x", budget=ks.Budget(period=MONTH)), "key.budget.amount_micros"),
        (ks.ApiKey(name="x", allowed_models=ks.ModelAllowList()), "key.allowed_models"),
        (ks.ApiKey(name="x", allowed_models=ks.ModelAllowList(models=["alpha", "zeta"])),
         "key.allowed_models.models[1]"),
        (ks.ApiKey(name="x", expire_time=timestamp_pb2.Timestamp(seconds=-10)), "key.expire_time"),
        (ks.ApiKey(name="x", kind=ks.KeyKind.KEY_KIND_MANAGEMENT, tpm=5), "key.tpm"),
    ],
)  # fmt: skip
async def test_create_refuses_each_bad_field_by_its_path(core: Core, key: ks.ApiKey, field: str) -> None:
    call = core.keys.CreateKey(ks.CreateKeyRequest(key=key), metadata=core.admin)
    message = await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", field)
    assert len(message) < 300


async def test_usage_report_arguments(core: Core) -> None:
    now = datetime.now(UTC)
    report = core.keys.GetUsageReport
    day = ks.UsageGrouping.USAGE_GROUPING_DAY
    fine = await report(
        ks.GetUsageReportRequest(start_time=stamp(now - timedelta(days=1)), end_time=stamp(now), group_by=day),
        metadata=core.admin,
    )
    assert list(fine.rows) == []
    for request, field in (
        (ks.GetUsageReportRequest(end_time=stamp(now), group_by=BY_KEY), "start_time"),
        (ks.GetUsageReportRequest(start_time=stamp(now), end_time=stamp(now), group_by=BY_KEY), "end_time"),
        (ks.GetUsageReportRequest(start_time=stamp(now - timedelta(days=1)), end_time=stamp(now)), "group_by"),
    ):
        call = report(request, metadata=core.admin)
        await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_REQUEST", field)


async def test_a_failing_store_is_policy_unavailable_never_internal(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async with fresh_database(postgres_server) as dsn:
        async for core in _core(tmp_path, dsn):
            await core.keys.ListKeys(ks.ListKeysRequest(), metadata=core.admin)  # the admin key is now cached
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("ALTER TABLE usage_records RENAME TO usage_records_gone")
            finally:
                await conn.close()
            now = datetime.now(UTC)
            request = ks.GetUsageReportRequest(
                start_time=stamp(now - timedelta(days=1)), end_time=stamp(now), group_by=BY_KEY
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await core.keys.GetUsageReport(request, metadata=core.admin)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(raised.value)
            assert (info.reason, info.metadata["retry_after"]) == ("ERROR_REASON_POLICY_UNAVAILABLE", "1.000")
            assert "usage_records" not in (raised.value.details() or ""), "the store's error stays in the log"


async def test_reflection_and_health_know_the_service(core: Core) -> None:
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    replies = [
        r async for r in reflection_pb2_grpc.ServerReflectionStub(core.channel).ServerReflectionInfo(iter(requests))
    ]
    assert "modelmax.v1.KeyService" in {s.name for s in replies[0].list_services_response.service}
    health = await health_pb2_grpc.HealthStub(core.channel).Check(
        health_pb2.HealthCheckRequest(service="modelmax.v1.KeyService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
