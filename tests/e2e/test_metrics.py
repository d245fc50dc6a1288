"""Metrics, request ids and logs, driven by real requests and read back from both /metrics expositions."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.policy.gate import static_key_id
from services.server import CoreServer
from services.settings import Settings as CoreSettings
from services.settings import SettingsError
from tests.conftest import API_KEY, running_bridge_app, running_core, write_catalog
from tests.fakes.openai_upstream import DEFAULT_USAGE, OpenAIUpstream, serve_openai_upstream

MODEL = "remote-chat"
SECRET_PROMPT = "the-secret-prompt-4711"
MESSAGES = [{"role": "user", "content": SECRET_PROMPT}]


class Gateway:
    def __init__(self, core: CoreServer, base_url: str, bridge_metrics_port: int) -> None:
        self.core, self.base_url, self.bridge_metrics_port = core, base_url, bridge_metrics_port

    async def scrape(self) -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=5) as http:
            core = (await http.get(f"http://127.0.0.1:{self.core.metrics_port}/metrics")).text
            bridge = (await http.get(f"http://127.0.0.1:{self.bridge_metrics_port}/metrics")).text
        return core, bridge


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with serve_openai_upstream() as fake:
        yield fake


@pytest.fixture
async def gateway(tmp_path: Path, upstream: OpenAIUpstream) -> AsyncIterator[Gateway]:
    entry = {"name": MODEL, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
    catalog = write_catalog(tmp_path, [entry])
    async with running_core(catalog, metrics_port=0) as core:
        async with running_bridge_app(f"127.0.0.1:{core.port}", metrics_port=0) as (base_url, app):
            yield Gateway(core, base_url, app.state.metrics_port)


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_what_was_served(gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0) as client:
        for _ in range(3):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        for _ in range(2):
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            async for _chunk in stream:
                pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    core_text, bridge_text = await gateway.scrape()
    core, bridge = samples(core_text), samples(bridge_text)
    served = {"model": MODEL, "provider": "openai"}
    # The GenAI conventions' attributes: the public name requested, the upstream model that answered.
    genai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": MODEL,
        "gen_ai_response_model": "fake-model",
    }

    assert value(core, "modelmax_core_requests_total", **served, status="ok") == 5
    assert value(core, "modelmax_core_requests_total", model="unknown", provider="none", status="model_not_found") == 1
    assert value(core, "modelmax_core_requests_total", **served, status="invalid_request") == 1
    # error_type is "" on success (which Prometheus stores as no label at all), the status word on a failure.
    ok = {**genai, "error_type": ""}
    assert value(core, "gen_ai_server_request_duration_seconds_count", **ok) == 5
    assert value(core, "gen_ai_server_request_duration_seconds_bucket", **ok, le="+Inf") == 5
    # Refused before any deployment was tried: no response model.
    refused = {**genai, "gen_ai_response_model": "", "error_type": "invalid_request"}
    assert value(core, "gen_ai_server_request_duration_seconds_count", **refused) == 1
    unknown = {**refused, "gen_ai_provider_name": "none", "gen_ai_request_model": "unknown"}
    assert (
        value(core, "gen_ai_server_request_duration_seconds_count", **unknown | {"error_type": "model_not_found"}) == 1
    )
    # Token totals are the sums of what the upstream reported for each of the five completions.
    assert value(core, "gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="input") == (
        5 * DEFAULT_USAGE["prompt_tokens"]
    )
    assert value(core, "gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="output") == (
        5 * DEFAULT_USAGE["completion_tokens"]
    )
    assert value(core, "gen_ai_client_token_usage_count", **genai, gen_ai_token_type="output") == 5
    assert value(core, "gen_ai_server_time_to_first_token_seconds_count", **ok) == 5
    assert value(core, "modelmax_core_overhead_seconds_count", **served) == 6  # the 5 served and the invalid one
    assert value(core, "modelmax_core_inflight_streams", **served) == 0
    for old in ("token_type", "status"):  # the pre-conventions labels are gone from the gen_ai_* metrics
        assert not any(name.startswith("gen_ai_") and old in dict(labels) for name, labels in core), old

    assert value(bridge, "modelmax_bridge_requests_total", model=MODEL, status="200") == 5
    assert value(bridge, "modelmax_bridge_requests_total", model="unknown", status="404") == 1
    assert value(bridge, "modelmax_bridge_requests_total", model=MODEL, status="400") == 1
    assert value(bridge, "modelmax_bridge_request_duration_seconds_count", model=MODEL, stream="true") == 2
    assert value(bridge, "modelmax_bridge_time_to_first_chunk_seconds_count", model=MODEL) == 2
    assert value(bridge, "modelmax_bridge_inflight_streams", model=MODEL) == 0
    assert "no-such-model" not in core_text + bridge_text, "label values are bounded to catalog names"


async def test_per_key_counters_name_the_key_id_never_the_key(gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0) as client:
        for _ in range(2):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key="mm-not-a-key-0123456789", max_retries=0) as other:
        with pytest.raises(openai.AuthenticationError):
            await other.chat.completions.create(model=MODEL, messages=MESSAGES)
    core_text, _ = await gateway.scrape()
    core = samples(core_text)
    key = {"key_id": static_key_id(API_KEY), "gen_ai_request_model": MODEL}
    assert value(core, "modelmax_core_key_requests_total", **key, error_type="") == 2
    assert value(core, "modelmax_core_key_requests_total", **key, error_type="invalid_request") == 1
    assert value(core, "modelmax_core_key_tokens_total", **key, gen_ai_token_type="input") == (
        2 * DEFAULT_USAGE["prompt_tokens"]
    )
    assert value(core, "modelmax_core_key_tokens_total", **key, gen_ai_token_type="output") == (
        2 * DEFAULT_USAGE["completion_tokens"]
    )
    # A refused credential has no key id: it is counted in the requests, not per key.
    key_ids = {dict(labels)["key_id"] for name, labels in core if name.startswith("modelmax_core_key_")}
    assert key_ids == {static_key_id(API_KEY)}
    assert API_KEY not in core_text


async def test_key_labels_can_be_turned_off(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    entry = {"name": MODEL, "provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}}
    async with running_core(write_catalog(tmp_path, [entry]), metrics_port=0, metrics_key_labels=False) as core:
        async with running_bridge_app(f"127.0.0.1:{core.port}", metrics_port=0) as (base_url, app):
            async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            core_text, _ = await Gateway(core, base_url, app.state.metrics_port).scrape()
    assert value(samples(core_text), "modelmax_core_requests_total", model=MODEL, provider="openai", status="ok") == 1
    assert "modelmax_core_key_" not in core_text and "key_id" not in core_text


async def test_deployment_state_shows_a_cooldown_as_it_happens(tmp_path: Path, upstream: OpenAIUpstream) -> None:
    async with serve_openai_upstream(error_status=503) as down:
        deployments = [
            {"provider": "openai", "model": "down-model", "options": {"base_url": down.url}},
            {"provider": "openai", "model": "fake-model", "options": {"base_url": upstream.url}},
        ]
        entry = {"name": MODEL, "deployments": deployments, "retry": {"attempts": 1}, "cooldown": {"failures": 1}}
        async with running_core(write_catalog(tmp_path, [entry]), metrics_port=0) as core:
            async with running_bridge_app(f"127.0.0.1:{core.port}", metrics_port=0) as (base_url, app):
                gateway = Gateway(core, base_url, app.state.metrics_port)
                before = samples((await gateway.scrape())[0])
                async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES)  # served by the fallback
                after = samples((await gateway.scrape())[0])

    def states(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], deployment: str) -> tuple[float, ...]:
        """(healthy, cooling_down) of one deployment: each series is always there, 1 for the state it is in."""
        labels = {"gen_ai_request_model": MODEL, "gen_ai_provider_name": "openai", "deployment": deployment}
        name = "modelmax_core_deployment_state"
        return tuple(scraped[(name, frozenset({**labels, "state": s}.items()))] for s in ("healthy", "cooling_down"))

    down_deployment, served_deployment = "0:openai:down-model", "1:openai:fake-model"
    assert states(before, down_deployment) == states(before, served_deployment) == (1, 0)
    assert states(after, down_deployment) == (0, 1), "one failure (cooldown.failures: 1) sends it to cool down"
    assert states(after, served_deployment) == (1, 0)


def test_key_labels_setting_is_on_unless_turned_off() -> None:
    assert CoreSettings.from_env({}).metrics_key_labels is True
    assert CoreSettings.from_env({"MODELMAX_METRICS_KEY_LABELS": "false"}).metrics_key_labels is False
    assert CoreSettings.from_env({"MODELMAX_METRICS_KEY_LABELS": "on"}).metrics_key_labels is True
    with pytest.raises(SettingsError, match="MODELMAX_METRICS_KEY_LABELS"):
        CoreSettings.from_env({"MODELMAX_METRICS_KEY_LABELS": "sometimes"})


async def test_both_processes_export_process_metrics_and_build_info_and_no_created_series(gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    for component, text in zip(("core", "bridge"), await gateway.scrape(), strict=True):
        scraped = samples(text)
        build = {"component": component, "version": version("modelmax"), "python_version": platform.python_version()}
        assert value(scraped, "modelmax_build_info", **build) == 1, component
        assert value(scraped, "process_resident_memory_bytes") > 0, component
        assert value(scraped, "process_cpu_seconds_total") > 0, component
        assert any(name == "python_info" for name, _ in scraped), component
        assert not [name for name, _ in scraped if name.endswith("_created")], component


async def test_request_id_and_overhead_headers_and_one_log_line(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = {"model": MODEL, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {API_KEY}", "x-request-id": "trace-abc-123"}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
        plain = await http.post("/chat/completions", json=body, headers=headers)
        streamed = await http.post("/chat/completions", json={**body, "stream": True}, headers=headers)
        failed = await http.post("/chat/completions", json={**body, "model": "nope"}, headers=headers)
        generated = await http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert plain.headers["x-request-id"] == streamed.headers["x-request-id"] == failed.headers["x-request-id"]
    assert plain.headers["x-request-id"] == "trace-abc-123"
    assert len(generated.headers["x-request-id"]) == 32
    assert float(plain.headers["x-modelmax-overhead-ms"]) >= 0
    core_lines = [r for r in caplog.records if r.name == "services.requests" and r.request_id == "trace-abc-123"]
    bridge_lines = [r for r in caplog.records if r.name == "bridge.requests" and r.request_id == "trace-abc-123"]
    assert len(core_lines) == 3 and len(bridge_lines) == 3, "one line per request in each process"
    assert {r.status for r in bridge_lines} == {200, 404}
    assert all(r.prompt_tokens == DEFAULT_USAGE["prompt_tokens"] for r in core_lines if r.status == "ok")
    for record in caplog.records:  # prompts, completions and keys never reach the logs
        rendered = record.getMessage() + repr(vars(record))
        assert SECRET_PROMPT not in rendered and API_KEY not in rendered and "Hello, world" not in rendered


async def test_promtool_finds_both_expositions_clean(gateway: Gateway) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (make tools)"
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    for exposition in await gateway.scrape():
        result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
