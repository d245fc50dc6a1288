"""The shipped Grafana dashboard, proven: a real Prometheus scrapes a real core and bridge that served traffic through
the fakes, and every panel's query (and every template variable) returns data with the labels the panel shows."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, running_bridge_app, running_core, write_catalog
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.prometheus_server import StartPrometheus, finite, prometheus_fixture  # noqa: F401 (`prometheus`)

DASHBOARD = Path(__file__).parents[2] / "helm" / "modelmax" / "dashboards" / "modelmax.json"
MESSAGES = [{"role": "user", "content": "hi"}]
# What stands for Grafana's $__rate_interval: a window that holds both rounds of traffic, so every counter and
# histogram has increased inside it (Grafana would pick a few scrape intervals over its own query step).
RATE_WINDOW = "1m"
_FAST_RETRY = {"initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.01}


@dataclass
class Upstreams:
    good: OpenAIUpstream
    flaky: OpenAIUpstream  # a 503, then answers: a retry of the same deployment
    down: OpenAIUpstream  # always 503: a fallback when another deployment follows, else an upstream error


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    async with (
        serve_openai_upstream() as good,
        serve_openai_upstream(error_status=503, error_times=1) as flaky,
        serve_openai_upstream(error_status=503) as down,
    ):
        yield Upstreams(good, flaky, down)


def catalog(tmp_path: Path, up: Upstreams) -> str:
    def deployment(fake: OpenAIUpstream) -> dict[str, Any]:
        return {"provider": "openai", "model": "fake-model", "options": {"base_url": fake.url}}

    models: list[dict[str, object]] = [
        {"name": "chat", **deployment(up.good)},
        {"name": "flaky", **deployment(up.flaky), "retry": {"attempts": 2, **_FAST_RETRY}},
        {"name": "fallback", "deployments": [deployment(up.down), deployment(up.good)], "retry": {"attempts": 1}},
        {"name": "broken", **deployment(up.down), "retry": {"attempts": 1}},
    ]
    return write_catalog(tmp_path, models)


async def drive(base_url: str, up: Upstreams) -> None:
    """One round of traffic: a stream, a success, a retry, a fallback and an upstream error, all with one key."""
    up.flaky.requests.clear()  # its one 503 again in this round: `error_times` counts the requests it has seen
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        async for _chunk in stream:
            pass
        for model in ("chat", "flaky", "fallback"):
            await client.chat.completions.create(model=model, messages=MESSAGES)
        with pytest.raises(openai.InternalServerError):  # 503: the only deployment is down
            await client.chat.completions.create(model="broken", messages=MESSAGES)


async def settled(*metrics_ports: int) -> None:
    """Wait until no stream is in flight in either process: a stream is recorded (in the same step as its in-flight
    gauge goes down) just after its last byte, which its client may have read already."""
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(200):
            texts = [(await http.get(f"http://127.0.0.1:{port}/metrics")).text for port in metrics_ports]
            inflight = [
                sample.value
                for text in texts
                for family in text_string_to_metric_families(text)
                if family.name.endswith("_inflight_streams")
                for sample in family.samples
            ]
            if not any(inflight):
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"streams still in flight: {inflight}")


def grafana_variables(board: dict[str, Any]) -> dict[str, str]:
    """Every template variable as "All" (a regex matching every value, empty included), and $__rate_interval."""
    values = {v["name"]: ".*" for v in board["templating"]["list"] if v["type"] == "query"}
    return {"__rate_interval": RATE_WINDOW, **values}


def filled(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def shown_labels(target: dict[str, Any]) -> set[str]:
    """The labels a target's series must carry: its groupings (`by (...)`, less `le`) and its legend's names."""
    grouped = {g.strip() for grouping in re.findall(r"\bby \(([^)]*)\)", target["expr"]) for g in grouping.split(",")}
    return (grouped - {"le", ""}) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


async def test_every_panel_query_returns_data_with_the_labels_it_shows(
    tmp_path: Path, upstreams: Upstreams, prometheus: StartPrometheus
) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = grafana_variables(board)
    async with running_core(catalog(tmp_path, upstreams), metrics_port=0) as core:
        async with running_bridge_app(f"127.0.0.1:{core.port}", metrics_port=0) as (base_url, app):
            server = await prometheus(
                {"core": f"127.0.0.1:{core.metrics_port}", "bridge": f"127.0.0.1:{app.state.metrics_port}"}
            )
            for _ in range(2):  # the second round's increases are what rate() over the window sees
                await drive(base_url, upstreams)
                await settled(core.metrics_port, app.state.metrics_port)
                await server.scraped_after(time.time())
            assert len(upstreams.flaky.requests) == 2 and upstreams.down.requests, "a retry and a fallback happened"

            problems = []
            targets = [(p["title"], t) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
            assert len(targets) > 30
            for title, target in targets:
                expr = filled(target["expr"], variables)
                series = await server.query(expr)
                if not finite(series):
                    problems.append(f"{title}: no data from {expr} ({series})")
                    continue
                # Both rounds of traffic fed every counter and histogram: a rate over them is above zero somewhere.
                if "rate(" in expr and not any(float(s["value"][1]) > 0 for s in finite(series)):
                    problems.append(f"{title}: only zeros from {expr} ({series})")
                wanted = shown_labels(target)
                missing = [s["metric"] for s in series if not wanted <= set(s["metric"])]
                if missing:
                    problems.append(f"{title}: series without {sorted(wanted)}: {missing}")
            listed: dict[str, set[str]] = {}
            for variable in board["templating"]["list"]:
                if variable["type"] != "query":
                    continue
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
                assert match, variable["query"]["query"]
                listed[variable["name"]] = set(await server.label_values(match[2], filled(match[1], variables)))
    assert problems == [], "\n".join(problems)
    # The filters list what was served (no Kubernetes here, so no namespace label: an empty list, and ".*" works).
    assert listed == {"namespace": set(), "model": {"chat", "flaky", "fallback", "broken"}, "provider": {"openai"}}
