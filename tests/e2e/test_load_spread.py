"""One bridge in front of a fleet of real cores behind one DNS name: calls spread over all of them, and a core added
later gets traffic once the others' connections age out.

As with a headless Service: each core listens on its own loopback address (127.0.0.2, .3, ...) and the same port, and
a fake DNS server (tests/fakes/dns.py) answers the name with those addresses. The bridge's target names that server
(`dns://127.0.0.1:<dns port>/cores.test:<port>`), so gRPC's own c-ares resolver does the resolving, as in a cluster.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.server import CoreServer, start_core
from services.settings import Settings as CoreSettings
from tests.conftest import API_KEY, running_bridge, write_catalog
from tests.fakes.dns import FakeDns, serve_dns
from tests.fakes.openai_upstream import serve_openai_upstream

MODEL = "remote"
NAME = "cores.test"
ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
LATER = "127.0.0.5"
AGE_SECONDS = 1.0  # the cores' max connection age: short, so the test sees re-resolution within seconds


def served(core: CoreServer) -> float:
    """Completions this core served (its own modelmax_core_requests_total, every outcome)."""
    return sum(
        sample.value
        for family in core.metrics.registry.collect()
        if family.name == "modelmax_core_requests"
        for sample in family.samples
        if sample.name == "modelmax_core_requests_total"
    )


def _free_port(addresses: list[str]) -> int:
    """A port free on every one of `addresses`: a DNS answer carries no port, so all cores share one."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        try:
            for address in addresses:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port


@dataclass
class CoreFleet:
    """Cores on loopback addresses sharing `port`, the fake DNS naming them, and a bridge dialing the name."""

    base_url: str  # the bridge's OpenAI base URL
    dns: FakeDns
    cores: dict[str, CoreServer]  # by address
    catalog: str
    port: int
    stack: AsyncExitStack

    async def add(self, address: str) -> CoreServer:
        """Start a core on `address` (the fleet's port) and add it to the DNS answer."""
        core = await self.stack.enter_async_context(_core(self.catalog, address, self.port))
        self.cores[address] = core
        self.dns.addresses.append(address)
        return core


@asynccontextmanager
async def _core(catalog: str, host: str, port: int) -> AsyncIterator[CoreServer]:
    settings = CoreSettings(
        catalog_path=catalog, host=host, port=port, api_keys=(API_KEY,), max_connection_age_seconds=AGE_SECONDS
    )
    core = await start_core(settings, {})
    try:
        yield core
    finally:
        await core.stop(grace=None)


@asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncIterator[CoreFleet]:
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(serve_openai_upstream())
        entry: dict[str, object] = {
            "name": MODEL,
            "provider": "openai",
            "model": "fake-model",
            "options": {"base_url": upstream.url},
        }
        catalog = write_catalog(tmp_path, [entry])
        port = _free_port([*ADDRESSES, LATER])
        dns = await stack.enter_async_context(serve_dns(NAME, []))
        group = CoreFleet("", dns, {}, catalog, port, stack)
        for address in ADDRESSES:
            await group.add(address)
        group.base_url = await stack.enter_async_context(running_bridge(f"dns://127.0.0.1:{dns.port}/{NAME}:{port}"))
        yield group


async def complete(http: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 5}
    response = await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=30)


async def test_calls_spread_over_every_core_the_name_resolves_to(tmp_path: Path) -> None:
    async with fleet(tmp_path) as group, client(group.base_url) as http:
        for _ in range(30):
            await complete(http)
        counts = {address: served(core) for address, core in group.cores.items()}
    assert sum(counts.values()) == 30
    # Round robin: 10 each. The old pick_first sent all 30 to one core.
    assert all(count >= 5 for count in counts.values()), counts


async def test_a_core_added_later_gets_traffic(tmp_path: Path) -> None:
    async with fleet(tmp_path) as group, client(group.base_url) as http:
        for _ in range(6):
            await complete(http)
        queries = group.dns.queries
        later = await group.add(LATER)
        # The cores' connections age out (GOAWAY after AGE_SECONDS), the bridge re-resolves (at most every 5 s) and
        # finds the new address. Without a connection age nothing ever makes it look again.
        deadline = asyncio.get_running_loop().time() + 20
        while served(later) == 0:
            assert asyncio.get_running_loop().time() < deadline, "the added core got no call in 20 s"
            await complete(http)
            await asyncio.sleep(0.1)
        assert group.dns.queries > queries
        before = {address: served(core) for address, core in group.cores.items()}
        for _ in range(20):
            await complete(http)
        after = {address: served(core) - before[address] for address, core in group.cores.items()}
    assert all(count >= 2 for count in after.values()), after  # all four share the calls now (5 each)
