"""The bridge's health endpoints: /healthz says the process is alive, /readyz that the core is reachable."""

from __future__ import annotations

import socket

import httpx

from services.server import CoreServer
from tests.conftest import running_bridge


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_ready_when_the_core_serves(local_core: CoreServer) -> None:
    async with running_bridge(f"127.0.0.1:{local_core.port}") as base_url:
        root = base_url.removesuffix("/v1")
        async with httpx.AsyncClient(timeout=5) as http:
            alive = await http.get(f"{root}/healthz")
            ready = await http.get(f"{root}/readyz")
    assert alive.status_code == 200 and ready.status_code == 200
    assert ready.json() == {"status": "ok"}


async def test_alive_but_not_ready_without_a_core() -> None:
    async with running_bridge(f"127.0.0.1:{closed_port()}") as base_url:
        root = base_url.removesuffix("/v1")
        async with httpx.AsyncClient(timeout=5) as http:
            alive = await http.get(f"{root}/healthz")
            ready = await http.get(f"{root}/readyz")
    assert alive.status_code == 200
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"


async def test_not_ready_while_the_core_drains(local_core: CoreServer) -> None:
    async with running_bridge(f"127.0.0.1:{local_core.port}") as base_url:
        root = base_url.removesuffix("/v1")
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{root}/readyz")).status_code == 200
            await local_core.stop(grace=None)  # health goes NOT_SERVING, then the server stops
            ready = await http.get(f"{root}/readyz")
    assert ready.status_code == 503
