"""The admin API end to end: the bridge's /v1/key and /v1/admin/* over HTTP, the core's KeyService and a real store.

A management key is made by opening the store directly (as `modelmax keys create --management` does); everything
after that goes through the bridge. The catalog's models point nowhere: managing keys never calls a provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.policy import open_store
from services.policy.keys import KeySpec
from services.policy.store import Store
from services.policy.usage import UsageRecord
from tests.conftest import API_KEY, running_bridge, running_core, write_catalog
from tests.policy_stores import fresh_database

NOWHERE = {"base_url": "http://127.0.0.1:9"}  # the discard port: never called
MODELS: list[dict[str, object]] = [
    {"name": "alpha", "provider": "openai", "model": "a", "options": NOWHERE},
    {"name": "beta", "provider": "openai", "model": "b", "options": NOWHERE},
]


@dataclass
class Admin:
    """A gateway on a store: an HTTP client at the bridge's root, the store itself, and a management key."""

    http: httpx.AsyncClient
    store: Store
    key: str
    key_id: str
    core_target: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def create(self, **body: Any) -> dict[str, Any]:
        reply = await self.http.post("/v1/admin/keys", json={"name": "k", **body}, headers=self.auth())
        assert reply.status_code == 201, reply.text
        assert reply.headers["cache-control"] == "no-store", "the whole key must not be cached on the way"
        created: dict[str, Any] = reply.json()
        return created


async def _admin_gateway(tmp_path: Path, database_url: str) -> AsyncIterator[Admin]:
    store = await open_store(database_url)
    try:
        record, key = await store.create_key(KeySpec(name="admin", kind="management"))
        catalog = write_catalog(tmp_path, MODELS)
        async with running_core(catalog, database_url=database_url) as core:
            target = f"127.0.0.1:{core.port}"
            async with (
                running_bridge(target) as base_url,
                httpx.AsyncClient(base_url=base_url.removesuffix("/v1"), timeout=10) as http,
            ):
                yield Admin(http, store, key, record.id, target)
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def admin_on_both(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Admin]:
    if request.param == "sqlite":
        async for admin in _admin_gateway(tmp_path, f"sqlite:///{tmp_path}/policy.sqlite3"):
            yield admin
        return
    async with fresh_database(request.getfixturevalue("postgres_server")) as dsn:  # the server only when needed
        async for admin in _admin_gateway(tmp_path, dsn):
            yield admin


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    async for made in _admin_gateway(tmp_path, f"sqlite:///{tmp_path}/policy.sqlite3"):
        yield made


def assert_error(reply: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    return error


async def test_create_list_get_patch_rotate_revoke(admin_on_both: Admin) -> None:
    gw = admin_on_both
    http = gw.http
    created = await gw.create(name="alice", owner="team-a", models=["alpha"], budget_usd="5.00", rpm=60)
    key_id, key = created["id"], created["key"]
    assert key.startswith(f"mm-{key_id}-")
    assert {k: created[k] for k in ("object", "name", "owner", "kind", "status", "models", "rpm", "tpm")} == {
        "object": "api_key", "name": "alice", "owner": "team-a", "kind": "inference", "status": "active",
        "models": ["alpha"], "rpm": 60, "tpm": None,
    }  # fmt: skip
    assert created["budget"] == {"amount_usd": "5.00", "amount_micros": 5_000_000, "period": "month"}
    assert created["created_at"].endswith("Z") and created["expires_at"] is None and created["revoked_at"] is None

    listed = await http.get("/v1/admin/keys", headers=gw.auth())
    assert listed.status_code == 200 and listed.json()["object"] == "list"
    assert [k["id"] for k in listed.json()["data"]] == [gw.key_id, key_id]  # oldest first
    assert all("key" not in k and "secret_hash" not in k for k in listed.json()["data"])
    mine = await http.get("/v1/admin/keys", params={"owner": "team-a"}, headers=gw.auth())
    assert [k["id"] for k in mine.json()["data"]] == [key_id]

    one = await http.get(f"/v1/admin/keys/{key_id}", headers=gw.auth())
    assert one.status_code == 200 and one.json() == {k: v for k, v in created.items() if k != "key"}

    itself = await http.get("/v1/key", headers=gw.auth(key))
    assert itself.status_code == 200, itself.text
    data = itself.json()["data"]
    assert (data["id"], data["name"], data["static"], data["budget"]["amount_micros"]) == (key_id, "alice", False, 5e6)
    assert (data["spent_micros"], data["held_micros"], data["remaining_micros"]) == (0, 0, 5_000_000)
    assert data["limit_remaining"] == "5.00" and data["usage"]["requests"] == 0 and data["usage"]["period"] == "month"

    patched = await http.patch(
        f"/v1/admin/keys/{key_id}",
        json={"name": "alice-2", "models": None, "budget_usd": None, "max_concurrent": 2, "rpm": None},
        headers=gw.auth(),
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert (body["name"], body["models"], body["budget"], body["max_concurrent"], body["rpm"]) == (
        "alice-2", None, None, 2, None
    )  # fmt: skip
    assert body["owner"] == "team-a", "a field the body does not name is kept"
    no_budget = await http.patch(f"/v1/admin/keys/{key_id}", json={"period": "day"}, headers=gw.auth())
    assert_error(no_budget, 400, None, "period")

    rotated = await http.post(f"/v1/admin/keys/{key_id}/rotate", headers=gw.auth())
    assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store", rotated.text
    new_key = rotated.json()["key"]
    assert new_key != key and new_key.startswith(f"mm-{key_id}-") and rotated.json()["id"] == key_id
    assert_error(await http.get("/v1/key", headers=gw.auth(key)), 401, "invalid_api_key")
    assert (await http.get("/v1/key", headers=gw.auth(new_key))).status_code == 200

    revoked = await http.delete(f"/v1/admin/keys/{key_id}", headers=gw.auth())
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"]
    gone = assert_error(await http.get("/v1/key", headers=gw.auth(new_key)), 401, "invalid_api_key")
    assert "revoked" in gone["message"]
    again = await http.patch(f"/v1/admin/keys/{key_id}", json={"name": "x"}, headers=gw.auth())
    assert "revoked" in assert_error(again, 400, None, "id")["message"]
    assert_error(await http.post(f"/v1/admin/keys/{key_id}/rotate", headers=gw.auth()), 400, None, "id")
    active = await http.get("/v1/admin/keys", headers=gw.auth())
    assert [k["id"] for k in active.json()["data"]] == [gw.key_id]
    every = await http.get("/v1/admin/keys", params={"include_revoked": "true"}, headers=gw.auth())
    assert [k["status"] for k in every.json()["data"]] == ["active", "revoked"]


async def test_budget_parts_and_expiry_change_separately(admin: Admin) -> None:
    created = await admin.create(budget_micros=2_500_000, period="day")
    path = f"/v1/admin/keys/{created['id']}"
    amount = await admin.http.patch(path, json={"budget_usd": 7}, headers=admin.auth())
    assert amount.json()["budget"] == {"amount_usd": "7.00", "amount_micros": 7_000_000, "period": "day"}
    period = await admin.http.patch(path, json={"period": "total"}, headers=admin.auth())
    assert period.json()["budget"] == {"amount_usd": "7.00", "amount_micros": 7_000_000, "period": "total"}
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    expiring = await admin.http.patch(path, json={"expires_at": later.isoformat()}, headers=admin.auth())
    assert expiring.json()["expires_at"] == later.isoformat().replace("+00:00", "Z")
    forever = await admin.http.patch(path, json={"expires_at": None}, headers=admin.auth())
    assert forever.json()["expires_at"] is None


async def test_who_may_call_what(admin: Admin) -> None:
    http = admin.http
    inference = (await admin.create(models=["alpha"]))["key"]
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}

    denied = await http.post("/v1/chat/completions", json=chat, headers=admin.auth())
    assert "management key" in assert_error(denied, 403, "permission_denied")["message"]
    for key in (inference, API_KEY):  # a stored inference key, and the settings' static key
        for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"), ("GET", "/v1/admin/usage")):
            body = {"name": "x"} if method == "POST" else None
            reply = await http.request(method, path, json=body, headers=admin.auth(key))
            assert_error(reply, 403, "permission_denied")
    assert_error(await http.get("/v1/admin/keys"), 401, "missing_api_key")
    assert_error(await http.get("/v1/admin/keys", headers=admin.auth("mm-nope")), 401, "invalid_api_key")

    manager = (await http.get("/v1/key", headers=admin.auth())).json()["data"]  # either kind inspects itself
    assert (manager["id"], manager["kind"], manager["models"], manager["budget"]) == (
        admin.key_id, "management", None, None
    )  # fmt: skip
    static = (await http.get("/v1/key", headers=admin.auth(API_KEY))).json()["data"]
    assert static["static"] is True and static["name"] == "static" and static["id"].startswith("static-")
    assert static["usage"]["requests"] == 0 and static["remaining_micros"] is None


async def test_unknown_ids_and_paths(admin: Admin) -> None:
    http, auth = admin.http, admin.auth()
    for method, path in (
        ("GET", "/v1/admin/keys/abcdefghijkl"),
        ("PATCH", "/v1/admin/keys/abcdefghijkl"),
        ("DELETE", "/v1/admin/keys/abcdefghijkl"),
        ("POST", "/v1/admin/keys/abcdefghijkl/rotate"),
    ):
        body = {"name": "x"} if method == "PATCH" else None
        error = assert_error(await http.request(method, path, json=body, headers=auth), 404, "key_not_found", "id")
        assert "abcdefghijkl" in error["message"]
    key_only = assert_error(await http.post("/v1/admin/keys/abcdefghijkl", headers=auth), 405, None)
    assert "POST" in key_only["message"]
    rotate_only = await http.get("/v1/admin/keys/abcdefghijkl/rotate", headers=auth)
    assert_error(rotate_only, 405, None)
    assert rotate_only.headers["allow"] == "POST"
    for path in ("/v1/admin/keys/abcdefghijkl/other", "/v1/admin/keys/", "/v1/admin/keys/a/rotate/x"):
        assert_error(await http.get(path, headers=auth), 404, None)
    with_body = await http.post("/v1/admin/keys/abcdefghijkl/rotate", content=b'{"x": 1}', headers=auth)
    assert_error(with_body, 400, None)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"name": "a", "name": "b"}', "name"),
        (b"{}", "name"),
        (b'{"name": 5}', "name"),
        (b'{"name": "x", "colour": "red"}', "colour"),
        (b'{"name": "x", "rpm": "60"}', "rpm"),
        (b'{"name": "x", "rpm": true}', "rpm"),
        (b'{"name": "x", "rpm": 0}', "rpm"),
        (b'{"name": "x", "tpm": 99999999999}', "tpm"),
        (b'{"name": "x", "models": "alpha"}', "models"),
        (b'{"name": "x", "models": ["alpha", 3]}', "models[1]"),
        (b'{"name": "x", "models": ["alpha", "nope"]}', "models[1]"),
        (b'{"name": "x", "models": []}', "models"),
        (b'{"name": "x", "budget_usd": 0}', "budget_usd"),
        (b'{"name": "x", "budget_usd": "-1"}', "budget_usd"),
        (b'{"name": "x", "budget_usd": "0.0000001"}', "budget_usd"),
        (b'{"name": "x", "budget_usd": "lots"}', "budget_usd"),
        (b'{"name": "x", "budget_micros": 0}', "budget_micros"),
        (b'{"name": "x", "budget_micros": 1.5}', "budget_micros"),
        (b'{"name": "x", "budget_micros": 1, "budget_usd": 1}', "budget_micros"),
        (b'{"name": "x", "budget_usd": 1, "period": "week"}', "period"),
        (b'{"name": "x", "period": "day"}', "period"),
        (b'{"name": "x", "expires_at": "tomorrow"}', "expires_at"),
        (b'{"name": "x", "expires_at": "2001-01-01T00:00:00Z"}', "expires_at"),
        (b'{"name": "x", "kind": "root"}', "kind"),
        (b'{"name": "x", "kind": "management", "models": ["alpha"]}', "models"),
        (b'{"name": "x", "kind": "management", "budget_usd": 1}', "budget_usd"),
        (b'{"name": "   "}', "name"),
    ],
)
async def test_malformed_create_bodies_are_400_naming_the_param(admin: Admin, body: bytes, param: str | None) -> None:
    headers = {**admin.auth(), "content-type": "application/json"}
    reply = await admin.http.post("/v1/admin/keys", content=body, headers=headers)
    error = assert_error(reply, 400, None, param)
    if param is not None:
        assert f"'{param.partition('[')[0]}" in error["message"] or param in error["message"], error


async def test_malformed_patches_and_queries(admin: Admin) -> None:
    http, auth = admin.http, admin.auth()
    path = f"/v1/admin/keys/{(await admin.create())['id']}"
    for body, param in (
        ({}, None),
        ({"kind": "management"}, "kind"),
        ({"name": None}, "name"),
        ({"budget_micros": 5}, "budget_micros"),  # the key has no budget to change part of
        ({"budget_usd": None, "period": "day"}, "period"),
        ({"budget_usd": 5, "period": None}, "period"),
        ({"expires_at": 5}, "expires_at"),
    ):
        assert_error(await http.patch(path, json=body, headers=auth), 400, None, param)
    for query, param in (
        ({"include_revoked": "yes"}, "include_revoked"),
        ({"ownr": "x"}, "ownr"),
    ):
        assert_error(await http.get("/v1/admin/keys", params=query, headers=auth), 400, None, param)
    for query, param in (
        ({"group_by": "week"}, "group_by"),
        ({"from": "2026-13-01"}, "from"),
        ({"from": "2026-06-02", "to": "2026-06-01"}, "to"),
        ({"from": "1960-01-01", "to": "2026-06-01"}, "from"),
        ({"since": "2026-06-01"}, "since"),
    ):
        assert_error(await http.get("/v1/admin/usage", params=query, headers=auth), 400, None, param)
    assert (await http.patch(path, content=b"{}", headers=auth)).status_code == 415  # the body must say it is JSON


def _usage(n: int, key_id: str, model: str, when: datetime, cost: int | None) -> UsageRecord:
    return UsageRecord(
        f"req-{key_id}-{model}-{n}", key_id, model, f"{model}-0", "openai", when, prompt_tokens=100 + n,
        cached_tokens=10, completion_tokens=20, reasoning_tokens=5, cost_micros=cost,
    )  # fmt: skip


async def test_usage_report_keeps_unpriced_costs_null(admin: Admin) -> None:
    priced = await admin.create(name="priced", budget_usd="1.00")
    unpriced = await admin.create(name="unpriced")
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    this_month = max(month, now - timedelta(seconds=5))
    await admin.store.record_usage(
        [
            _usage(1, priced["id"], "alpha", this_month, 1_000),
            _usage(2, priced["id"], "alpha", this_month, 2_500),
            _usage(3, unpriced["id"], "beta", this_month, None),
            _usage(4, unpriced["id"], "beta", this_month, None),
            _usage(5, priced["id"], "alpha", month - timedelta(days=1), 9_999),  # last month: not by default
        ]
    )
    by_key = await admin.http.get("/v1/admin/usage", headers=admin.auth())
    assert by_key.status_code == 200, by_key.text
    report = by_key.json()
    assert (report["object"], report["group_by"]) == ("list", "key")
    assert report["from"] == month.isoformat().replace("+00:00", "Z")
    rows = {row["group"]: row for row in report["data"]}
    assert rows[priced["id"]] == {
        "group": priced["id"], "requests": 2, "prompt_tokens": 203, "cached_tokens": 20, "completion_tokens": 40,
        "reasoning_tokens": 10, "cost_micros": 3_500, "cost_usd": "0.0035", "unpriced_requests": 0,
    }  # fmt: skip
    assert (rows[unpriced["id"]]["cost_micros"], rows[unpriced["id"]]["cost_usd"]) == (None, None)
    assert rows[unpriced["id"]]["unpriced_requests"] == 2 and rows[unpriced["id"]]["requests"] == 2

    days = await admin.http.get(
        "/v1/admin/usage",
        params={"from": (month - timedelta(days=1)).date().isoformat(), "to": (now + timedelta(days=1)).isoformat(),
                "group_by": "model"},
        headers=admin.auth(),
    )  # fmt: skip
    models = {row["group"]: row for row in days.json()["data"]}
    assert (models["alpha"]["requests"], models["alpha"]["cost_micros"]) == (3, 13_499)
    assert (models["beta"]["cost_micros"], models["beta"]["unpriced_requests"]) == (None, 2)

    mine = (await admin.http.get("/v1/key", headers=admin.auth(priced["key"]))).json()["data"]
    assert (mine["usage"]["requests"], mine["usage"]["cost_micros"], mine["usage"]["cost_usd"]) == (2, 3_500, "0.0035")
    theirs = (await admin.http.get("/v1/key", headers=admin.auth(unpriced["key"]))).json()["data"]
    assert (theirs["usage"]["requests"], theirs["usage"]["cost_micros"], theirs["usage"]["cost_usd"]) == (2, None, None)


async def test_a_static_key_inspects_itself_without_a_store(tmp_path: Path) -> None:
    async with running_core(write_catalog(tmp_path, MODELS)) as core, running_bridge(f"127.0.0.1:{core.port}") as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            itself = await http.get("/key")
            listed = await http.get("/admin/keys")
    assert itself.status_code == 200, itself.text
    data = itself.json()["data"]
    assert (data["static"], data["kind"], data["models"], data["usage"], data["limit_remaining"]) == (
        True, "inference", None, None, None
    )  # fmt: skip
    assert_error(listed, 403, "permission_denied")
