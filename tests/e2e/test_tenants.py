"""Tenants across replicas: budgets under concurrent load, revocation within the cache TTL, and a store outage.

Each "replica" is a real core (with its own key cache and usage writer) and a real bridge in front of it; replicas
share one real PostgreSQL (or one SQLite file), as a fleet does. Requests go through the real `openai` SDK or httpx.
The store outage is a real one: the replicas reach PostgreSQL through a TCP proxy on 127.0.0.1 that the test cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest

from modelmax.v1 import completion_pb2 as pb
from services.policy import open_store
from services.policy.gate import prompt_bound
from services.policy.keys import Budget, KeySpec
from services.policy.store import Store
from tests.conftest import running_bridge, running_core, write_catalog
from tests.fakes.openai_upstream import DEFAULT_USAGE, OpenAIUpstream, serve_openai_upstream

MODEL = "priced"
# One micro-USD per token, in and out: a request's cost in micro-USD is its token count.
PRICE = {"input": 1, "output": 1}
MESSAGES = [{"role": "user", "content": "Hello?"}]
MAX_TOKENS = 5


def catalog(tmp_path: Path, upstream: OpenAIUpstream) -> str:
    entry = {
        "name": MODEL,
        "provider": "openai",
        "model": "fake-model",
        "options": {"base_url": upstream.url, "timeout_seconds": 10},
        "price": PRICE,
    }
    return write_catalog(tmp_path, [entry])


@asynccontextmanager
async def replica(catalog_path: str, database_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """One core (on the shared store, no static keys) and its bridge; yields an httpx client on the bridge."""
    async with (
        running_core(catalog_path, database_url=database_url, api_keys=(), **settings) as core,
        running_bridge(f"127.0.0.1:{core.port}") as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=30) as http,
    ):
        yield http


def chat(key: str) -> dict[str, Any]:
    return {
        "url": "/chat/completions",
        "json": {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS},
        "headers": {"Authorization": f"Bearer {key}"},
    }


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    return str(request.getfixturevalue("pg_dsn"))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = await open_store(url)
    try:
        yield store
    finally:
        await store.close()


async def wait_for(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# ---- budgets ---------------------------------------------------------------------------------------------------


async def settled(store: Store, record: Any, timeout: float = 5.0) -> None:
    """Waits until no reservation of the key is held. A completion's hold is settled by a task started as its answer
    goes out (off the request path, Policy.meter in services/policy/gate.py), so the next request, sent at once,
    can still find it held: on a nearly spent budget, a 429 a moment too early, never a spend past it."""
    deadline = time.monotonic() + timeout
    while (await store.budget_state(record.id, record.budget.window_start(datetime.now(UTC)))).held_micros:
        assert time.monotonic() < deadline, "a reservation was never settled"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_a_budget_is_never_passed_by_more_than_one_reservation_across_two_replicas(
    tmp_path: Path, upstream: OpenAIUpstream, database_url: str
) -> None:
    """40 concurrent requests over two replicas against a budget of about 9 requests, then more one at a time until
    refused: the spend never passes the budget by more than one reservation, the budget is usable to its end, the
    requests past it are 429 insufficient_quota, and the upstream served only the admitted ones."""
    upstream.chunk_delay = 0.02  # each request in flight for a while, so that admissions overlap
    budget = 100  # micro-USD; each request costs 7 + 4 = 11 (the fake's usage)
    cost = DEFAULT_USAGE["prompt_tokens"] + DEFAULT_USAGE["completion_tokens"]
    reservation = prompt_bound_of(MESSAGES) + MAX_TOKENS  # what each admission holds, at 1 micro-USD a token
    async with opened(database_url) as store:
        record, key = await store.create_key(KeySpec("budgeted", budget=Budget(budget, "day")))
    path = catalog(tmp_path, upstream)
    async with replica(path, database_url) as a, replica(path, database_url) as b:
        replies = await asyncio.gather(*((a if i % 2 else b).post(**chat(key)) for i in range(40)))
        statuses = [reply.status_code for reply in replies]
        assert set(statuses) == {200, 429}, statuses
        burst = statuses.count(200)
        assert burst * cost <= budget + reservation, (burst, cost, reservation)
        later = []
        async with opened(database_url) as store:
            for i in range(20):  # one at a time, each once the last one's hold is settled: nothing else held
                await settled(store, record)
                later.append(await (a, b)[i % 2].post(**chat(key)))
        statuses += [reply.status_code for reply in later]
        replies += later
    served = statuses.count(200)
    assert budget <= served * cost <= budget + reservation, (served, cost, reservation)  # used to its end, never past
    assert statuses[40:] == [200] * (served - burst) + [429] * (60 - 40 - (served - burst))
    for reply in replies:
        if reply.status_code == 429:
            error = reply.json()["error"]
            assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
            assert reply.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == served  # a refused request never reached the upstream
    async with opened(database_url) as store:
        state = await store.budget_state(record.id, record.budget.window_start(datetime.now(UTC)))  # type: ignore[union-attr]
        assert (state.spent_micros, state.held_micros) == (served * cost, 0)  # every reservation settled


async def test_an_exhausted_budget_is_not_retried_by_the_openai_sdk(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    async with opened(url) as store:
        _, key = await store.create_key(KeySpec("tiny", budget=Budget(1, "total")))
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    async with replica(catalog(tmp_path, upstream), url) as http:
        base_url = str(http.base_url).rstrip("/")
        async with (
            httpx.AsyncClient(event_hooks={"request": [count]}) as transport,
            openai.AsyncOpenAI(base_url=base_url, api_key=key, http_client=transport, max_retries=3) as sdk,
        ):
            first = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
            assert first.usage is not None and first.usage.total_tokens == 11  # admitted: something was left
            with pytest.raises(openai.RateLimitError) as refused:
                await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    assert refused.value.code == "insufficient_quota"
    assert len(sent) == 2  # max_retries=3, yet the refusal was sent once: x-should-retry: false


async def test_a_key_with_a_budget_cannot_use_an_unpriced_model(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    entry = {"name": "free-ish", "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
    async with opened(url) as store:
        _, budgeted = await store.create_key(KeySpec("budgeted", budget=Budget(1_000_000, "month")))
        _, plain = await store.create_key(KeySpec("plain"))
    async with replica(write_catalog(tmp_path, [entry]), url) as http:
        body = {"model": "free-ish", "messages": MESSAGES}
        refused = await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {budgeted}"})
        served = await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {plain}"})
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("permission_denied", "model") and "no price" in error["message"]
    assert served.status_code == 200 and len(upstream.requests) == 1


async def test_allowed_models_filter_the_list_and_refuse_the_rest(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    url = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    models = [
        {"name": name, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
        for name in ("alpha", "beta")
    ]
    async with opened(url) as store:
        _, key = await store.create_key(KeySpec("only-alpha", allowed_models=frozenset({"alpha"})))
    auth = {"Authorization": f"Bearer {key}"}
    async with replica(write_catalog(tmp_path, models), url) as http:
        listed = await http.get("/models", headers=auth)
        one = await http.get("/models/beta", headers=auth)
        refused = await http.post("/chat/completions", json={"model": "beta", "messages": MESSAGES}, headers=auth)
        unknown = await http.post("/chat/completions", json={"model": "gamma", "messages": MESSAGES}, headers=auth)
        served = await http.post("/chat/completions", json={"model": "alpha", "messages": MESSAGES}, headers=auth)
    assert [model["id"] for model in listed.json()["data"]] == ["alpha"]
    assert one.status_code == 404  # a model the key may not use is not there, as far as the key can tell
    for reply in (refused, unknown):  # never a silent fallback, and no word on whether "gamma" exists
        assert reply.status_code == 403, reply.text
        assert (reply.json()["error"]["code"], reply.json()["error"]["param"]) == ("permission_denied", "model")
    assert served.status_code == 200 and len(upstream.requests) == 1


# ---- revocation ------------------------------------------------------------------------------------------------


async def test_revocation_reaches_every_replica_within_the_cache_ttl(
    tmp_path: Path, upstream: OpenAIUpstream, pg_dsn: str
) -> None:
    """Revoked through replica A's admin API: A refuses the key at once, B within its key cache TTL."""
    ttl = 1.0
    async with opened(pg_dsn) as store:
        record, key = await store.create_key(KeySpec("doomed"))
        _, admin = await store.create_key(KeySpec("admin", kind="management"))
    path = catalog(tmp_path, upstream)
    async with (
        replica(path, pg_dsn, key_cache_ttl_seconds=ttl) as a,
        replica(path, pg_dsn, key_cache_ttl_seconds=ttl) as b,
    ):
        for http in (a, b):  # both replicas have the key cached
            assert (await http.post(**chat(key))).status_code == 200
        revoked = await a.delete(f"/admin/keys/{record.id}", headers={"Authorization": f"Bearer {admin}"})
        assert revoked.status_code == 200, revoked.text
        started = time.monotonic()
        assert (await a.post(**chat(key))).status_code == 401  # the replica that revoked it: at once
        while (reply := await b.post(**chat(key))).status_code == 200:
            assert time.monotonic() - started < ttl + 0.5, "replica B still serves the revoked key past its TTL"
            await asyncio.sleep(0.05)
        assert reply.status_code == 401, reply.text
        assert reply.json()["error"]["message"] == "This API key has been revoked."


# ---- a store outage --------------------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 to PostgreSQL that a test can cut (every connection dropped, new ones refused)
    and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


@asynccontextmanager
async def proxied(dsn: str) -> AsyncIterator[tuple[Proxy, str]]:
    parts = urlsplit(dsn)
    proxy = Proxy(parts.port or 5432)
    await proxy.start()
    try:
        yield proxy, urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.cut()


async def usage_count(dsn: str, key_id: str) -> int:
    async with opened(dsn) as store:
        rows = await store.usage_report(datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC), "key")
    return sum(row.requests for row in rows if row.group == key_id)


async def test_a_store_outage_fail_open_serves_known_keys_and_writes_their_usage_when_it_is_back(
    tmp_path: Path, upstream: OpenAIUpstream, pg_dsn: str
) -> None:
    async with opened(pg_dsn) as store:
        record, key = await store.create_key(KeySpec("known"))
        _, stranger = await store.create_key(KeySpec("never-seen"))
    async with AsyncExitStack() as stack:
        proxy, via_proxy = await stack.enter_async_context(proxied(pg_dsn))
        http = await stack.enter_async_context(
            replica(catalog(tmp_path, upstream), via_proxy, key_cache_ttl_seconds=0.3)
        )
        assert (await http.post(**chat(key))).status_code == 200  # cached now
        await wait_for(lambda: _has(pg_dsn, record.id, 1))  # and metered
        await proxy.cut()
        await asyncio.sleep(0.5)  # past the TTL: the cached record is stale
        started = time.monotonic()
        served = await http.post(**chat(key))
        assert served.status_code == 200, served.text  # fail-open: a key this replica knows keeps working
        assert time.monotonic() - started < 5, "the outage must not make requests wait on the store"
        unknown = await http.post(**chat(stranger))
        assert unknown.status_code == 503, unknown.text  # never a 401: the key may well be fine
        assert unknown.json()["error"]["code"] == "policy_unavailable"
        assert unknown.headers["retry-after"] == "1"
        await proxy.start()  # the store is back: the buffered record is written
        await wait_for(lambda: _has(pg_dsn, record.id, 2))


async def test_a_store_outage_fail_closed_refuses_what_it_cannot_check(
    tmp_path: Path, upstream: OpenAIUpstream, pg_dsn: str
) -> None:
    async with opened(pg_dsn) as store:
        _, key = await store.create_key(KeySpec("known"))
    async with AsyncExitStack() as stack:
        proxy, via_proxy = await stack.enter_async_context(proxied(pg_dsn))
        http = await stack.enter_async_context(
            replica(catalog(tmp_path, upstream), via_proxy, key_cache_ttl_seconds=0.3, policy_fail_closed=True)
        )
        assert (await http.post(**chat(key))).status_code == 200
        await proxy.cut()
        await asyncio.sleep(0.5)
        refused = await http.post(**chat(key))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "policy_unavailable"
        requests_before = len(upstream.requests)
        await proxy.start()
        assert (await http.post(**chat(key))).status_code == 200  # back: served again
        assert len(upstream.requests) == requests_before + 1


# ---- helpers -----------------------------------------------------------------------------------------------------


def prompt_bound_of(messages: list[dict[str, str]]) -> int:
    params = pb.CompletionParams(
        model=MODEL, messages=[pb.Message(role=pb.Role.ROLE_USER, content=m["content"]) for m in messages]
    )
    return prompt_bound(params)


async def _has(dsn: str, key_id: str, count: int) -> bool:
    return await usage_count(dsn, key_id) >= count
