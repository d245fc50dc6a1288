"""The gateway the metering tests run against, and the usage records it writes.

One `Gateway` is: a fake provider speaking its real wire format (or the embedded model), a real store (a SQLite file
or a PostgreSQL schema) holding one inference key, a real core on that store with no static keys, its real bridge,
and the real `openai` SDK on the bridge with the database key. The fake is scripted to report a chosen usage, and
`usage_records` is read behind the store's back, with plain SQL.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
import yaml

from services.policy import open_store
from services.policy.keys import KeySpec
from services.settings import DEFAULT_CATALOG
from tests.conftest import running_bridge, running_core, write_catalog
from tests.fakes.bedrock import BedrockUpstream, ToolUse, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import GeminiUpstream, serve_gemini
from tests.fakes.openai_upstream import FakeToolCall, OpenAIUpstream, serve_openai_upstream

PROVIDERS = ("bedrock", "gemini", "openai", "local")
# USD per million tokens, which is also micro-USD per token.
PRICE = {"input": 3, "cached_input": 0.3, "output": 15}
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
BEDROCK_CACHE_WRITE = 3  # tokens Bedrock reports written to its prompt cache: part of the prompt, priced as input
RECORD_TIMEOUT = 20.0  # seconds to wait for a record: the writer flushes every 0.5 s, the suite may share the CPUs

# The public name and upstream model of each provider's entry; "<name>-unpriced" is the same deployment, unpriced.
_MODELS = {
    "bedrock": ("deepseek-v3.2", "deepseek.v3.2"),
    "gemini": ("gemini-3-flash-preview", "gemini-3-flash-preview"),
    "openai": ("remote-chat", "fake-model"),
}
Fake = BedrockUpstream | GeminiUpstream | OpenAIUpstream


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts in OpenAI's sense: `cached` is part of `prompt`, `reasoning` part of `completion`."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0


def cost_micros(usage: Usage) -> int:
    """What PRICE makes of `usage`, in micro-USD, rounded half up: computed here with exact fractions."""
    exact = (
        Fraction(usage.prompt - usage.cached) * PRICE["input"]
        + Fraction(usage.cached) * Fraction(str(PRICE["cached_input"]))
        + Fraction(usage.completion) * PRICE["output"]
    )
    return math.floor(exact + Fraction(1, 2))


def prompt_estimate(messages: list[dict[str, str]]) -> int:
    """The gateway's estimate of an uncounted prompt (services.policy.gate), restated for text-only messages: one
    token per four characters, rounded up, plus eight per message for the chat template."""
    chars = sum(len(message["content"]) for message in messages)
    return max(1, math.ceil(chars / 4) + 8 * len(messages))


def usage_of(row: dict[str, Any]) -> Usage:
    return Usage(row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["reasoning_tokens"])


def client_usage(provider: str, usage: Usage) -> dict[str, Any]:
    """`usage` as the OpenAI client sees it (`model_dump(exclude_none=True)`): the breakdowns each provider reports."""
    seen: dict[str, Any] = {
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
    }
    if provider in ("bedrock", "gemini", "openai"):
        seen["prompt_tokens_details"] = {"cached_tokens": usage.cached}
    if provider in ("gemini", "openai"):  # Bedrock reports no reasoning count, the local model no breakdown at all
        seen["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning}
    return seen


class UsageTable:
    """`usage_records` read directly, the way an operator's SQL would; booleans come back as bools on both."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pg: asyncpg.Connection | None = None

    async def aclose(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None

    async def rows(self, caller_request_id: str | None = None) -> list[dict[str, Any]]:
        """Every record, or those of one caller request id, oldest first."""
        where = "" if caller_request_id is None else " WHERE caller_request_id = {}"
        args = () if caller_request_id is None else (caller_request_id,)
        if self._url.startswith("sqlite:///"):
            rows = await asyncio.to_thread(self._sqlite, f"SELECT * FROM usage_records{where.format('?')}", args)
        else:
            if self._pg is None:
                self._pg = await asyncpg.connect(self._url)
            rows = [
                dict(row) for row in await self._pg.fetch(f"SELECT * FROM usage_records{where.format('$1')}", *args)
            ]
        for row in rows:
            for name in ("stream", "cancelled", "estimated"):  # SQLite keeps them as 0 and 1
                row[name] = bool(row[name])
        return sorted(rows, key=lambda row: str(row["started_at"]))

    def _sqlite(self, sql: str, args: tuple[str, ...]) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self._url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql, args)]
        finally:
            conn.close()

    async def record(self, caller_request_id: str, timeout: float = RECORD_TIMEOUT) -> dict[str, Any]:
        """The one record of a request, once the core's writer has flushed it (polled, within `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.rows(caller_request_id)
            if rows:
                assert len(rows) == 1, f"{len(rows)} records for request {caller_request_id}: {rows}"
                return rows[0]
            assert time.monotonic() < deadline, f"no usage record for request {caller_request_id} in {timeout}s"
            await asyncio.sleep(0.05)


@dataclass
class Gateway:
    """Everything one test talks to; see the module docstring."""

    provider: str
    model: str  # the priced public name
    unpriced: str  # the same deployment under an unpriced name
    deployment: str  # the label records carry: "<index>:<provider>:<upstream model>"
    fake: Fake | None  # None: the embedded local model
    client: openai.AsyncOpenAI
    table: UsageTable
    target: str  # the core's gRPC address
    key: str
    key_id: str
    _servers: AsyncExitStack = field(repr=False)
    stopped: bool = False

    # scripting the provider

    def report(self, usage: Usage) -> Usage:
        """Script the fake to report `usage` (in its own wire fields) on its next answers; returns the usage the
        gateway should read from that, in OpenAI's sense (Bedrock has no reasoning count)."""
        fake = self.fake
        if isinstance(fake, BedrockUpstream):
            fake.usage = {
                "inputTokens": usage.prompt - usage.cached - BEDROCK_CACHE_WRITE,
                "cacheReadInputTokens": usage.cached,
                "cacheWriteInputTokens": BEDROCK_CACHE_WRITE,
                "outputTokens": usage.completion,
                "totalTokens": usage.prompt + usage.completion,
            }
            return replace(usage, reasoning=0)
        if isinstance(fake, GeminiUpstream):
            fake.usage = {
                "promptTokenCount": usage.prompt,
                "cachedContentTokenCount": usage.cached,
                "candidatesTokenCount": usage.completion - usage.reasoning,
                "thoughtsTokenCount": usage.reasoning,
                "totalTokenCount": usage.prompt + usage.completion,
            }
            return usage
        if isinstance(fake, OpenAIUpstream):
            fake.usage = {  # type: ignore[dict-item]  # the fake sends whatever JSON it is given
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.prompt + usage.completion,
                "prompt_tokens_details": {"cached_tokens": usage.cached},
                "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
            }
            return usage
        raise AssertionError("the local model reports what it counted: it cannot be scripted")

    def answer_with_a_tool_call(self) -> None:
        """Script the fake to answer with one get_weather(city="Paris") call and no text."""
        fake = self.fake
        if isinstance(fake, BedrockUpstream):
            fake.text, fake.stop_reason = [], "tool_use"
            fake.tool_uses = [ToolUse("tooluse_weather_1", "get_weather", {"city": "Paris"})]
        elif isinstance(fake, GeminiUpstream):
            fake.texts = []
            fake.function_calls = [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"}
            ]
        elif isinstance(fake, OpenAIUpstream):
            fake.chunks, fake.finish_reason = [], "tool_calls"
            fake.tool_calls = [FakeToolCall("call_weather_1", "get_weather", ('{"city": ', '"Paris"}'))]
        else:
            raise AssertionError("the local model takes no tools")

    # requests

    async def chat(self, request_id: str | None = "", **request: Any) -> tuple[Any, str]:
        """A completion through the SDK, with a fresh X-Request-Id ("" ) or the given one (None: none sent, the
        bridge makes one); returns the parsed answer (a stream, for stream=True) and the x-request-id it came with."""
        if request_id == "":
            request_id = f"metering-{uuid.uuid4().hex}"
        headers = {} if request_id is None else {"X-Request-Id": request_id}
        request.setdefault("model", self.model)
        raw = await self.client.chat.completions.with_raw_response.create(extra_headers=headers, **request)
        answered = raw.headers["x-request-id"]
        if request_id is not None:
            assert answered == request_id, "the bridge must return the caller's own X-Request-Id"
        return raw.parse(), answered

    async def stop(self) -> list[dict[str, Any]]:
        """Stop the bridge and the core (whose stop drains the usage writer); returns every record written."""
        if not self.stopped:
            self.stopped = True
            await self._servers.aclose()
        return await self.table.rows()


def _entries(provider: str, fake: Fake | None) -> tuple[list[dict[str, Any]], str]:
    """The catalog entries (priced, then unpriced) for `provider`, and the upstream model."""
    if provider == "local":
        [entry] = [e for e in yaml.safe_load(Path(DEFAULT_CATALOG).read_text())["models"] if e["provider"] == "local"]
        name, upstream_model = entry["name"], entry["model"]
        base = {k: v for k, v in entry.items() if k != "price"}  # priced and unpriced here, whatever the default
    else:
        assert fake is not None
        name, upstream_model = _MODELS[provider]
        options: dict[str, Any]
        if provider == "bedrock":
            options = {"region": "us-east-1", "endpoint_url": fake.url, "read_timeout_seconds": 10}
        elif provider == "gemini":
            options = {"api_key_env": "GEMINI_API_KEY", "base_url": fake.url, "timeout_seconds": 10}
        else:
            options = {"base_url": fake.url, "api_key_env": "UPSTREAM_KEY", "timeout_seconds": 10}
        base = {"name": name, "provider": provider, "model": upstream_model, "options": options}
    priced = {**base, "price": PRICE}
    unpriced = {**base, "name": f"{name}-unpriced"}
    return [priced, unpriced], upstream_model


@asynccontextmanager
async def _fake(provider: str) -> AsyncIterator[Fake | None]:
    if provider == "bedrock":
        async with serve_bedrock() as bedrock:
            yield bedrock
    elif provider == "gemini":
        async with serve_gemini(api_key=GEMINI_KEY) as gemini:
            yield gemini
    elif provider == "openai":
        async with serve_openai_upstream(api_key=UPSTREAM_KEY) as upstream:
            yield upstream
    else:
        yield None


@asynccontextmanager
async def metered_gateway(
    provider: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: KeySpec | None = None
) -> AsyncIterator[Gateway]:
    """A Gateway for `provider` on the store at `database_url`, its key made from `key` (default: no limits);
    everything is stopped on exit."""
    if provider == "bedrock":
        use_fake_credentials(monkeypatch, tmp_path)
    env = {"GEMINI_API_KEY": GEMINI_KEY, "UPSTREAM_KEY": UPSTREAM_KEY}
    async with AsyncExitStack() as stack:
        fake = await stack.enter_async_context(_fake(provider))
        store = await open_store(database_url)
        try:
            record, whole_key = await store.create_key(key or KeySpec(name="metering"))
        finally:
            await store.close()
        table = UsageTable(database_url)
        stack.push_async_callback(table.aclose)
        entries, upstream_model = _entries(provider, fake)
        servers = await stack.enter_async_context(AsyncExitStack())
        core = await servers.enter_async_context(
            running_core(write_catalog(tmp_path, entries), env, database_url=database_url, api_keys=())
        )
        target = f"127.0.0.1:{core.port}"
        base_url = await servers.enter_async_context(running_bridge(target))
        client = await servers.enter_async_context(
            openai.AsyncOpenAI(base_url=base_url, api_key=whole_key, max_retries=0, timeout=60)
        )
        yield Gateway(
            provider=provider,
            model=entries[0]["name"],
            unpriced=entries[1]["name"],
            deployment=f"0:{provider}:{upstream_model}",
            fake=fake,
            client=client,
            table=table,
            target=target,
            key=whole_key,
            key_id=record.id,
            _servers=servers,
        )
