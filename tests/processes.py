"""The gateway's real entry points as child processes (`python -m services`, `bridge`, `startup.combined`), and free
ports on 127.0.0.1 for them and the servers the fixtures start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def process(module: str, env: dict[str, str], ready_url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m module` with `env` alone (and PATH), once `ready_url` answers 200 (within 20 s); killed at the end
    if it is still running."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, cwd=ROOT, env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            for _ in range(400):
                try:
                    if (await http.get(ready_url)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{module} did not start: {(await child.stderr.read()).decode()}")  # type: ignore[union-attr]
        yield child
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def stop(child: asyncio.subprocess.Process) -> None:
    """SIGTERM, and the exit (its drain) within 20 s."""
    child.send_signal(signal.SIGTERM)
    await asyncio.wait_for(child.wait(), timeout=20)
