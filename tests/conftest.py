"""Real servers on 127.0.0.1 and ephemeral ports: the core (grpc.aio) and the bridge (uvicorn), wired together."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import cast

import grpc
import pytest
import yaml
from starlette.applications import Starlette

from bridge.app import create_app
from bridge.server import uvicorn_config
from bridge.settings import Settings as BridgeSettings
from services.server import CoreServer, start_core
from services.settings import DEFAULT_CATALOG
from services.settings import Settings as CoreSettings
from startup.inprocess import Channel, Handlers
from tests.fakes.serve import TEST_OPTIONS, serve
from tests.policy_stores import backend, pg_dsn, postgres_server, store  # noqa: F401 (fixtures for every test)
from tests.redis_server import redis_server, redis_url  # noqa: F401 (fixtures for every test)

API_KEY = "mm-test-key-0123456789abcdef"

# How a bridge these fixtures start reaches a core they started: "grpc", over a socket (the split mode), or
# "inprocess", through the combined mode's channel (startup/inprocess.py). `make test` runs the e2e suite both ways:
# the split mode is the reference, and any difference is a bug of the in-process transport.
_TRANSPORT = {"name": "grpc"}
_IN_PROCESS: dict[str, Handlers] = {}  # the cores running in this process by target, in the in-process mode


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--transport", choices=("grpc", "inprocess"), default="grpc",
        help="how the fixtures' bridge calls the fixtures' core: over gRPC (default) or in process (combined mode)",
    )  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    _TRANSPORT["name"] = config.getoption("--transport")


def pytest_report_header(config: pytest.Config) -> str:
    return f"bridge -> core transport: {_TRANSPORT['name']}"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No developer or CI credentials leak into a test, and no test sees another's variables.

    botocore looks for credentials in ~/.aws and, failing that, asks the EC2 metadata service on a link-local
    address: neither may be reached from a test, so both are pointed away.
    """
    for name in list(os.environ):
        if name.startswith(("MODELMAX_", "AWS_", "OPENAI_", "GEMINI_", "GOOGLE_")):
            monkeypatch.delenv(name)
    nowhere = tmp_path_factory.getbasetemp() / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@asynccontextmanager
async def running_core(
    catalog_path: str, env: dict[str, str] | None = None, **overrides: object
) -> AsyncIterator[CoreServer]:
    overrides.setdefault("api_keys", (API_KEY,))
    settings = CoreSettings(catalog_path=catalog_path, port=0, **overrides)  # type: ignore[arg-type]
    handlers = Handlers() if _TRANSPORT["name"] == "inprocess" else None
    core = await start_core(settings, env or {}, handlers)
    target = f"127.0.0.1:{core.port}"
    if handlers is not None:
        _IN_PROCESS[target] = handlers
    try:
        yield core
    finally:
        _IN_PROCESS.pop(target, None)
        await core.stop(grace=None)


@asynccontextmanager
async def running_bridge_app(core_target: str, **overrides: object) -> AsyncIterator[tuple[str, Starlette]]:
    """The bridge app under real uvicorn; yields its OpenAI base URL (".../v1") and the app."""
    settings = BridgeSettings(core_target=core_target, **overrides)  # type: ignore[arg-type]
    handlers = _IN_PROCESS.get(core_target)
    channel = None if handlers is None else Channel(handlers, max_send_bytes=settings.max_message_bytes)
    app = create_app(settings, channel=cast(grpc.aio.Channel, channel))
    config = uvicorn_config(app, settings, **TEST_OPTIONS)  # the bridge's own transport, limits and all
    async with app.router.lifespan_context(app), serve(app, config) as url:
        yield f"{url}/v1", app


@asynccontextmanager
async def running_bridge(core_target: str, **overrides: object) -> AsyncIterator[str]:
    """The bridge app under real uvicorn; yields its OpenAI base URL (".../v1")."""
    async with running_bridge_app(core_target, **overrides) as (base_url, _):
        yield base_url


@asynccontextmanager
async def running_gateway(catalog_path: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Core and bridge together; yields the OpenAI base URL."""
    async with running_core(catalog_path, env) as core, running_bridge(f"127.0.0.1:{core.port}") as base_url:
        yield base_url


def write_catalog(tmp_path: Path, models: list[dict[str, object]]) -> str:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return str(path)


@pytest.fixture
async def local_core() -> AsyncIterator[CoreServer]:
    """The core on the default catalog: the embedded SmolLM2 model."""
    async with running_core(DEFAULT_CATALOG) as core:
        yield core


@pytest.fixture
async def gateway_url(local_core: CoreServer) -> AsyncIterator[str]:
    """The OpenAI base URL of a bridge in front of the local-model core."""
    async with running_bridge(f"127.0.0.1:{local_core.port}") as base_url:
        yield base_url


GatewayFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
async def gateway_for() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start a gateway on a given catalog file (and environment); all are stopped at the end of the test."""
    async with AsyncExitStack() as stack:

        async def start(catalog_path: str, env: dict[str, str] | None = None) -> str:
            return await stack.enter_async_context(running_gateway(catalog_path, env))

        yield start
