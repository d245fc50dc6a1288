"""A real Prometheus for a test: Debian's `prometheus` binary scraping given metrics ports on 127.0.0.1 every second.

The server runs as this process's child on a free port, with its configuration and its storage in the test's
tmp_path, and is stopped when the test ends. A missing binary fails the test, loudly: a skipped check would let a
dashboard query that returns nothing ship unnoticed.

Everything here that waits is async: the core and the bridge a test starts run on the test's event loop, so a
blocking wait would stop them from answering the very scrapes it waits for.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.processes import free_port

INSTALL_HINT = "prometheus is installed by `make tools` (Debian's prometheus package, which also ships promtool)"
SCRAPE_SECONDS = 1
_START_SECONDS = 20.0


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(f"prometheus is not on PATH: {INSTALL_HINT}", pytrace=False)
    return found


@dataclass
class Prometheus:
    """A running server: `url` is its root ("http://127.0.0.1:PORT"), `jobs` the scrape jobs and their targets."""

    url: str
    jobs: Mapping[str, str]
    http: httpx.AsyncClient
    log: Path

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the server's now: the result's series (`metric` labels, `value` [time, text])."""
        response = await self.http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", f"{expr}: {body['data']['resultType']}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's `label_values(match, label)` lists: the label's values on the series `match` selects."""
        response = await self.http.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{label} of {match}: {body}"
        values: list[str] = body["data"]
        return values

    async def scraped_after(self, moment: float, timeout: float = 15.0) -> None:
        """Wait until every job has been scraped successfully by a scrape that started after `moment` (Unix time)."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            # timestamp() of `up` itself: of an expression over it (`up == 1`), it would be the evaluation time.
            last = await self.query("timestamp(up)")
            fresh = {s["metric"].get("job") for s in last if float(s["value"][1]) > moment}
            healthy = {s["metric"].get("job") for s in await self.query("up == 1")}
            if fresh >= set(self.jobs) and healthy >= set(self.jobs):
                return
            await asyncio.sleep(SCRAPE_SECONDS / 4)
        pytest.fail(f"no scrape of {sorted(self.jobs)} after {moment}: {last}\n{self.log.read_text()}")


def _config(jobs: Mapping[str, str]) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_SECONDS}s",
            "scrape_timeout": f"{SCRAPE_SECONDS}s",
            "evaluation_interval": f"{SCRAPE_SECONDS}s",
        },
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
            for job, target in jobs.items()
        ],
    }


@asynccontextmanager
async def running_prometheus(root: Path, jobs: Mapping[str, str]) -> AsyncIterator[Prometheus]:
    """Prometheus scraping each job's target ("127.0.0.1:PORT") every second; ready (its first scrapes done) when
    yielded, killed and waited for at the end."""
    assert all(target.startswith("127.0.0.1:") for target in jobs.values()), jobs
    binary = _prometheus_binary()
    root.mkdir(parents=True, exist_ok=True)
    config, log = root / "prometheus.yml", root / "prometheus.log"
    config.write_text(yaml.safe_dump(_config(jobs)), encoding="utf-8")
    port = free_port()
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    started = time.time()
    with log.open("wb") as output:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            server = Prometheus(f"http://127.0.0.1:{port}", jobs, http, log)
            await _ready(server, process)
            await server.scraped_after(started)
            yield server
    finally:
        process.kill()
        process.wait(timeout=10)


async def _ready(server: Prometheus, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited ({process.returncode}):\n{server.log.read_text()}")
        try:
            if (await server.http.get(f"{server.url}/-/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail(f"prometheus was not ready within {_START_SECONDS}s:\n{server.log.read_text()}")


def finite(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series whose value is a number (histogram_quantile of no traffic, or 0/0, is NaN)."""
    return [s for s in series if math.isfinite(float(s["value"][1]))]


StartPrometheus = Callable[[Mapping[str, str]], Awaitable[Prometheus]]


@pytest.fixture(name="prometheus")
async def prometheus_fixture(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """`prometheus`: start a Prometheus scraping the given jobs' targets ({"core": "127.0.0.1:PORT", ...}); each is
    stopped at the end of the test. A module imports `prometheus_fixture` to use it (the root conftest does not)."""
    async with AsyncExitStack() as stack:

        async def start(jobs: Mapping[str, str]) -> Prometheus:
            return await stack.enter_async_context(running_prometheus(tmp_path / "prometheus", jobs))

        yield start
