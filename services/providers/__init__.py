"""The Provider protocol, and the registry that builds one provider per catalog entry."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import Catalog, CatalogEntry, MissingSecret
from services.errors import GatewayError

log = logging.getLogger(__name__)

# The optional features of a request, by the OpenAI parameter that asks for each. A provider declares the ones it
# honours in `supported`; the core refuses any other one a request uses with a 400 naming it, before dispatch,
# never silently dropping it.
FEATURES = (
    "tools",  # tools, tool_choice, tool calls and tool results in the history
    "parallel_tool_calls",  # parallel_tool_calls=false (true is every tool-calling provider's default)
    "response_format",  # json_object / json_schema
    "n",  # more than one choice
    "seed",
    "presence_penalty",  # non-zero (zero is the default: honoured everywhere)
    "frequency_penalty",  # non-zero
    "logprobs",  # logprobs=true or top_logprobs
    "reasoning_effort",
    "images",  # image content parts
    "top_k",
    "reasoning_budget_tokens",  # an explicit thinking budget (Anthropic's thinking.budget_tokens)
)

# Provider kind (the catalog's `provider:`) -> the module that implements it. Imported only when a catalog
# entry uses it, so a gateway without local models never loads llama.cpp.
_MODULES = {
    "local": "services.providers.local",
    "openai": "services.providers.openai",
    "bedrock": "services.providers.bedrock",
    "gemini": "services.providers.gemini",
}


class Provider(Protocol):
    """Serves one catalog entry.

    `stream` yields `delta` (and `reasoning`, `tool_call`) events, then exactly one `finish` event carrying usage.
    Events that became ready together (parsed from one network read) may be yielded as one `batch` event: only
    deltas, reasonings and tool calls, in order, never empty, never the finish. The core relays a batch as one
    gRPC message to callers that accept batches and unpacks it for the others. `stream` raises GatewayError for
    failures the caller should see. Cancellation arrives as CancelledError and must stop the upstream work.

    The finish carries one ChoiceFinish per choice the request asked for, in index order; `stop_sequence` is set
    only when the provider knows which of the request's stop sequences ended that choice.

    A provider that can count a prompt's tokens itself also implements TokenCounter (`count_tokens`); the core's
    CountTokens answers the others with its own estimate, marked as one.
    """

    supported: frozenset[str]
    """The optional features (names from FEATURES) this provider honours. The core checks every request against it
    once, before dispatch, and refuses any other feature the request uses; `stream` never sees such a request."""

    server_address: str
    """The upstream's host, resolved once from the entry's options (`server.address` of each attempt's span, and the
    client duration's label, which tells two regions of one model apart); "" for an engine in this process."""

    server_port: int | None
    """The upstream's port; None for an engine in this process."""

    def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        """The completion as events. `incremental=False` says the caller only wants the whole answer (the core's
        CreateCompletion), so a provider may make one non-streaming upstream call and yield its result as events."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """The optional part of a Provider: counting a prompt's tokens the way the upstream counts them."""

    async def count_tokens(self, params: pb.CompletionParams) -> int:
        """The input tokens a completion of `params` would use: the same conversation, system prompt and tools the
        provider would send. Raises GatewayError like `stream` (never falls back to an estimate)."""
        ...


class Backend(Protocol):
    """One provider kind: owns what its providers share (clients, loaded models), created once at start-up."""

    async def provider_for(self, entry: CatalogEntry) -> Provider:
        """Check the entry's options and return its provider; raise CatalogError on a bad entry.

        Async so a backend can open its clients here, once, at start-up (aioboto3 clients are entered this way).
        """
        ...

    async def aclose(self) -> None: ...


class ProviderRegistry:
    """The catalog, and the provider of each of its deployments: `providers[name][i]` serves
    `entry.routes()[i]` of the entry called `name` (the core's dispatch pairs them into its Deployments)."""

    def __init__(self, catalog: Catalog, providers: Mapping[str, tuple[Provider, ...]]) -> None:
        self.catalog = catalog
        self.providers = dict(providers)


async def build_registry(catalog: Catalog, env: Mapping[str, str], stack: AsyncExitStack) -> ProviderRegistry:
    """Create every backend the catalog needs, once, and one provider per deployment. `stack` closes the backends."""
    backends: dict[str, Backend] = {}
    providers: dict[str, tuple[Provider, ...]] = {}
    for entry in catalog.entries:
        made: list[Provider] = []
        for deployment in entry.routes():
            module_name = _MODULES.get(deployment.provider)
            if module_name is None:
                raise deployment.problem(f"unknown provider {deployment.provider!r}; known: {sorted(_MODULES)}")
            backend = backends.get(deployment.provider)
            if backend is None:
                module = importlib.import_module(module_name)
                backend = module.create_backend(env)
                stack.push_async_callback(backend.aclose)
                backends[deployment.provider] = backend
            try:
                provider: Provider = await backend.provider_for(deployment)
            except MissingSecret as exc:
                # A machine without this provider's credentials still serves every other model; this one answers
                # each request with an error that says what to set, instead of the whole gateway refusing to start.
                log.warning("%s; requests for %r will fail until it is set", exc, entry.name)
                provider = UnavailableProvider(entry.name, str(exc).partition(": ")[2])
            made.append(provider)
        providers[entry.name] = tuple(made)
    return ProviderRegistry(catalog, providers)


def origin(url: str) -> tuple[str, int | None]:
    """The host and port an http(s) URL connects to (the scheme's port when it names none): a provider's
    `server_address` and `server_port`."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.hostname or "", port


class UnavailableProvider:
    """Stands in for an entry whose credentials are missing: every request fails with UPSTREAM_AUTH."""

    server_address = ""  # it never calls anything
    server_port: int | None = None

    # Every feature: a request fails with the credentials error, never with a refusal the real provider might not make.
    supported = frozenset(FEATURES)

    def __init__(self, name: str, problem: str) -> None:
        self._message = f"ModelMax has no credentials for '{name}': {problem}."

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        raise GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_AUTH, self._message)
        yield  # an async generator, like every provider

    async def count_tokens(self, params: pb.CompletionParams) -> int:
        """The credentials error too: an estimate would hide that this entry cannot serve."""
        raise GatewayError(pb.ErrorReason.ERROR_REASON_UPSTREAM_AUTH, self._message)
