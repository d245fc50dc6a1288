"""Keys and usage on both real backends: create, get, list, update, revoke, rotate, and the usage report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.policy import open_store
from services.policy.keys import Budget, KeySpec, hash_key, parse_key
from services.policy.postgres import PostgresStore
from services.policy.sqlite import SQLiteStore
from services.policy.store import KeyChanges, KeyNotFound, KeyRevoked, Store
from services.policy.usage import UsageRecord
from tests.policy_stores import Backend

DAY1 = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
DAY2 = datetime(2026, 5, 2, 23, 59, 59, 999999, tzinfo=UTC)


async def test_create_returns_the_secret_once_and_stores_only_its_hash(backend: Backend, store: Store) -> None:
    record, whole = await store.create_key(KeySpec("ci", owner="team-a"))
    parsed = parse_key(whole)
    assert parsed is not None and parsed.key_id == record.id
    [row] = await backend.raw(f"SELECT * FROM api_keys WHERE id = '{record.id}'")
    assert row["secret_hash"] == hash_key(whole)
    for column, value in row.items():  # no column holds the secret, or the whole key, in any form
        assert parsed.secret not in str(value), column
    assert await store.get_key(record.id) == record
    assert await store.find_by_hash(hash_key(whole)) == record
    assert await store.find_by_hash(hash_key(whole + "x")) is None
    assert await store.get_key("aaaaaaaaaaaa") is None


async def test_every_field_round_trips(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    spec = KeySpec(
        "batch",
        owner="customer-42",
        expires_at=datetime(2027, 1, 1, 12, tzinfo=plus_two),
        allowed_models=frozenset({"claude-sonnet", "gemini-flash"}),
        budget=Budget(25_000_000, "month"),
        rpm=60,
        tpm=100_000,
        max_concurrent=4,
    )
    record, _ = await store.create_key(spec)
    got = await store.get_key(record.id)
    assert got == record
    assert got is not None and got.expires_at == datetime(2027, 1, 1, 10, tzinfo=UTC)  # the same instant, in UTC
    assert got.allowed_models == frozenset({"claude-sonnet", "gemini-flash"})
    empty, _ = await store.create_key(KeySpec("nothing", allowed_models=frozenset()))
    assert (await store.get_key(empty.id)).allowed_models == frozenset()  # type: ignore[union-attr]
    admin, _ = await store.create_key(KeySpec("admin", kind="management"))
    assert (await store.get_key(admin.id)) == admin and admin.kind == "management"


def test_a_management_key_takes_no_models_budget_or_limits() -> None:
    for extra in ({"allowed_models": frozenset({"m"})}, {"budget": Budget(1, "day")}, {"rpm": 1}):
        with pytest.raises(ValueError, match="management key"):
            KeySpec("admin", kind="management", **extra)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 1 and"):
        KeySpec("big", rpm=2**31)


async def test_list_filters_by_owner_and_revocation(store: Store) -> None:
    a, _ = await store.create_key(KeySpec("a", owner="x"))
    b, _ = await store.create_key(KeySpec("b", owner="x"))
    c, _ = await store.create_key(KeySpec("c", owner="y"))
    await store.revoke_key(b.id)
    assert [k.id for k in await store.list_keys()] == [a.id, b.id, c.id]
    assert [k.id for k in await store.list_keys(owner="x")] == [a.id, b.id]
    assert [k.id for k in await store.list_keys(owner="x", include_revoked=False)] == [a.id]
    assert await store.list_keys(owner="nobody") == []


async def test_update_changes_only_the_fields_given(store: Store) -> None:
    record, whole = await store.create_key(KeySpec("old", owner="o", rpm=10, budget=Budget(5, "day")))
    updated = await store.update_key(
        record.id, KeyChanges(name="new", allowed_models=frozenset({"m"}), budget=None, tpm=500)
    )
    assert (updated.name, updated.owner, updated.rpm, updated.tpm) == ("new", "o", 10, 500)
    assert updated.budget is None and updated.allowed_models == frozenset({"m"})
    assert updated.secret_hash == hash_key(whole)
    assert await store.get_key(record.id) == updated
    cleared = await store.update_key(record.id, KeyChanges(rpm=None, allowed_models=None))
    assert cleared.rpm is None and cleared.allowed_models is None and cleared.tpm == 500
    with pytest.raises(KeyNotFound):
        await store.update_key("aaaaaaaaaaaa", KeyChanges(name="x"))
    with pytest.raises(ValueError):
        await store.update_key(record.id, KeyChanges(rpm=-1))
    assert await store.get_key(record.id) == cleared  # the refused change left nothing behind


async def test_revoke_is_final_and_idempotent(store: Store) -> None:
    record, _ = await store.create_key(KeySpec("k"))
    revoked = await store.revoke_key(record.id)
    assert revoked.revoked_at is not None and not revoked.is_active(datetime.now(UTC))
    again = await store.revoke_key(record.id)
    assert again.revoked_at == revoked.revoked_at
    with pytest.raises(KeyRevoked):
        await store.update_key(record.id, KeyChanges(name="back"))
    with pytest.raises(KeyRevoked):
        await store.rotate_key(record.id)
    with pytest.raises(KeyNotFound):
        await store.revoke_key("aaaaaaaaaaaa")


async def test_rotate_keeps_the_id_and_retires_the_old_secret(store: Store) -> None:
    record, old = await store.create_key(KeySpec("k", owner="o", rpm=5))
    rotated, new = await store.rotate_key(record.id)
    assert new != old and parse_key(new) is not None and parse_key(new).key_id == record.id  # type: ignore[union-attr]
    assert rotated.id == record.id and rotated.rpm == 5 and rotated.created_at == record.created_at
    assert await store.find_by_hash(hash_key(old)) is None
    assert await store.find_by_hash(hash_key(new)) == rotated
    assert (await store.get_key(record.id)).secret_hash == hash_key(new)  # type: ignore[union-attr]


def _usage(request_id: str, key: str, model: str, at: datetime, cost: int | None, tokens: int = 10) -> UsageRecord:
    return UsageRecord(
        request_id, key, model, f"{model}-us", "bedrock", at, tokens, 1, 2 * tokens, 3, cost, stream=True
    )


async def test_usage_report_groups_by_key_model_and_day(store: Store) -> None:
    await store.record_usage(
        [
            _usage("r1", "key-a", "sonnet", DAY1, 100),
            _usage("r2", "key-a", "local", DAY1, None),
            _usage("r3", "key-b", "sonnet", DAY2, 250, tokens=20),
            _usage("r4", "key-b", "local", DAY2 + timedelta(microseconds=1), None),  # May 3rd: outside the range
        ]
    )
    start, end = datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 3, tzinfo=UTC)
    by_key = await store.usage_report(start, end, "key")
    assert [(r.group, r.requests, r.prompt_tokens, r.cost_micros, r.unpriced_requests) for r in by_key] == [
        ("key-a", 2, 20, 100, 1),
        ("key-b", 1, 20, 250, 0),
    ]
    by_model = await store.usage_report(start, end, "model")
    assert [(r.group, r.requests, r.completion_tokens, r.cost_micros) for r in by_model] == [
        ("local", 1, 20, None),  # only unpriced requests: the cost is unknown, not 0
        ("sonnet", 2, 60, 350),
    ]
    by_day = await store.usage_report(start, end + timedelta(days=1), "day")
    assert [(r.group, r.requests, r.cached_tokens, r.reasoning_tokens) for r in by_day] == [
        ("2026-05-01", 2, 2, 6),
        ("2026-05-02", 1, 1, 3),
        ("2026-05-03", 1, 1, 3),
    ]
    assert await store.usage_report(end + timedelta(days=5), end + timedelta(days=6), "key") == []
    only_b = await store.usage_report(start, end + timedelta(days=1), "model", key_id="key-b")
    assert [(r.group, r.requests, r.cost_micros) for r in only_b] == [("local", 1, None), ("sonnet", 1, 250)]


async def test_record_usage_stores_every_field_and_skips_a_repeated_request_id(backend: Backend, store: Store) -> None:
    first = UsageRecord(
        "req-1", "key-a", "sonnet", "sonnet-eu", "bedrock", DAY1, 100, 40, 30, 10, 1234, "ERROR_REASON_RATE_LIMITED",
        stream=True, cancelled=True, estimated=True, duration_s=1.5, first_token_s=0.25,
    )  # fmt: skip
    await store.record_usage([first])
    await store.record_usage([first, _usage("req-2", "key-a", "sonnet", DAY1, 5)])  # a retried batch
    rows = await backend.raw("SELECT * FROM usage_records ORDER BY request_id")
    assert [r["request_id"] for r in rows] == ["req-1", "req-2"]
    row = rows[0]
    assert (row["deployment"], row["provider"], row["status"]) == ("sonnet-eu", "bedrock", "ERROR_REASON_RATE_LIMITED")
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
        100, 40, 30, 10,
    )  # fmt: skip
    assert (bool(row["stream"]), bool(row["cancelled"]), bool(row["estimated"])) == (True, True, True)
    assert (row["cost_micros"], row["duration_s"], row["first_token_s"]) == (1234, 1.5, 0.25)


async def test_spent_sums_priced_usage_since_a_time(store: Store) -> None:
    await store.record_usage(
        [
            _usage("r1", "key-a", "sonnet", DAY1, 100),
            _usage("r2", "key-a", "sonnet", DAY2, 40),
            _usage("r3", "key-a", "local", DAY2, None),
            _usage("r4", "key-b", "sonnet", DAY2, 1000),
        ]
    )
    assert await store.spent("key-a", DAY1) == 140
    assert await store.spent("key-a", DAY1 + timedelta(microseconds=1)) == 40
    assert await store.spent("key-c", DAY1) == 0


async def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, pg_dsn: str) -> None:
    sqlite_store = await open_store(f"sqlite:///{tmp_path}/nested/policy.db")
    postgres_store = await open_store(pg_dsn)
    try:
        assert isinstance(sqlite_store, SQLiteStore) and (tmp_path / "nested" / "policy.db").exists()
        assert isinstance(postgres_store, PostgresStore)
    finally:
        await sqlite_store.close()
        await postgres_store.close()
    with pytest.raises(ValueError, match="mysql"):
        await open_store("mysql://user:secret@host/db")
