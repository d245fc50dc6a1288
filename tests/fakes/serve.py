"""Serving an ASGI app with real uvicorn on 127.0.0.1 and an ephemeral port, for fakes and disconnect tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.types import ASGIApp

_SHUTDOWN_SECONDS = 2.0  # grace for open streams before uvicorn is told to stop waiting for them


# How every test server runs: on 127.0.0.1 and an ephemeral port, quietly, its lifespan run by the test.
TEST_OPTIONS: dict[str, object] = {
    "host": "127.0.0.1",
    "port": 0,
    "log_level": "warning",
    "lifespan": "off",
    # A stream still open at exit (a test that failed mid-stream) is cancelled after this, not waited for.
    "timeout_graceful_shutdown": _SHUTDOWN_SECONDS,
}


@asynccontextmanager
async def serve(app: ASGIApp, config: uvicorn.Config | None = None) -> AsyncIterator[str]:
    """Run `app` (with `config`, made with TEST_OPTIONS, if given) until the block exits; yields its root URL,
    "http://127.0.0.1:PORT".

    Real uvicorn, because httpx.ASGITransport buffers whole bodies and so shows neither streaming nor disconnects.
    """
    config = config or uvicorn.Config(app, **TEST_OPTIONS)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():  # it could not start (port, config): surface uvicorn's own error
                await task
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=_SHUTDOWN_SECONDS + 1.0)
        except TimeoutError:
            server.force_exit = True
            await task
