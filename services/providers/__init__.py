"""The Provider protocol, and the registry that builds one provider per catalog entry."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from typing import Protocol

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import Catalog, CatalogEntry
from services.errors import GatewayError

# Provider kind (the catalog's `provider:`) -> the module that implements it. Imported only when a catalog
# entry uses it, so a gateway without local models never loads llama.cpp.
_MODULES = {
    "local": "services.providers.local",
    "openai": "services.providers.openai_compatible",
}


class Provider(Protocol):
    """Serves one catalog entry.

    `stream` yields `delta` events, then exactly one `finish` event carrying usage. It raises GatewayError for
    failures the caller should see. Cancellation arrives as CancelledError and must stop the upstream work.
    """

    def stream(self, params: pb.CompletionParams) -> AsyncIterator[svc.StreamCompletionResponse]: ...


class Backend(Protocol):
    """One provider kind: owns what its providers share (clients, loaded models), created once at start-up."""

    def provider_for(self, entry: CatalogEntry) -> Provider:
        """Check the entry's options and return its provider; raise CatalogError on a bad entry."""
        ...

    async def aclose(self) -> None: ...


class ProviderRegistry:
    """Public model name -> provider, plus the catalog for listing."""

    def __init__(self, catalog: Catalog, providers: Mapping[str, Provider]) -> None:
        self.catalog = catalog
        self._providers = dict(providers)

    def for_model(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is None:
            raise GatewayError(
                pb.ErrorReason.ERROR_REASON_MODEL_NOT_FOUND,
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
            )
        return provider


async def build_registry(catalog: Catalog, env: Mapping[str, str], stack: AsyncExitStack) -> ProviderRegistry:
    """Create every backend the catalog needs, once, and one provider per entry. `stack` closes the backends."""
    backends: dict[str, Backend] = {}
    providers: dict[str, Provider] = {}
    for entry in catalog.entries:
        module_name = _MODULES.get(entry.provider)
        if module_name is None:
            raise entry.problem(f"unknown provider {entry.provider!r}; known: {sorted(_MODULES)}")
        backend = backends.get(entry.provider)
        if backend is None:
            module = importlib.import_module(module_name)
            backend = module.create_backend(env)
            stack.push_async_callback(backend.aclose)
            backends[entry.provider] = backend
        providers[entry.name] = backend.provider_for(entry)
    return ProviderRegistry(catalog, providers)
