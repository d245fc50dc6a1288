"""Traces: the bridge and the core export OTLP spans linked caller -> bridge -> core -> each upstream attempt.

The processes are the real entry points (`python -m services`, `python -m bridge`) configured by OTEL_* variables
only, exporting to an in-process OTLP receiver; the caller is the OpenAI SDK with its own `traceparent`. The batch
processor's delay is a minute, so the spans can only arrive through the drain's flush on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry import trace

from startup import tracing
from tests.conftest import API_KEY, running_bridge, running_core, running_gateway, write_catalog
from tests.fakes.bedrock import serve_bedrock, use_fake_credentials
from tests.fakes.gemini import serve_gemini
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream
from tests.otlp_receiver import Received, ReceivedSpan, otlp_grpc_receiver, otlp_http_receiver
from tests.processes import free_port, process, stop

MODEL = "remote-chat"
UPSTREAM_MODEL = "qwen-upstream"
PROMPT = "the-secret-prompt-4711"
# The caller's own trace: its trace id and the id of its span that calls the gateway.
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
USAGE = {
    "prompt_tokens": 7,
    "completion_tokens": 4,
    "total_tokens": 11,
    "prompt_tokens_details": {"cached_tokens": 3},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


@pytest.fixture(autouse=True)
def no_tracing_left() -> Iterator[None]:
    """An in-process test's tracing never outlives it."""
    yield
    tracing.shutdown()


@pytest.fixture
async def flaky_upstream() -> AsyncIterator[OpenAIUpstream]:
    """Fails its first request with a 503 (the core retries it), then streams an answer with detailed usage."""
    async with serve_openai_upstream(error_status=503, error_times=1, usage=USAGE) as fake:
        yield fake


def otel_env(endpoint: str, protocol: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # only the shutdown's flush exports within the test
    }


async def ask(base_url: str, *, traceparent: str | None = TRACEPARENT) -> str:
    headers = {"traceparent": traceparent} if traceparent else {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def only(spans: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(spans) == 1, spans
    return spans[0]


def assert_linked(received: Received, upstream: OpenAIUpstream, *, core_service: str, bridge_service: str) -> None:
    """caller -> bridge SERVER -> core SERVER -> two CLIENT attempts (a 503, then the answer), GenAI attributes."""
    assert {span.trace_id for span in received.spans} == {TRACE_ID}, received.spans
    bridge = only(received.named("POST /v1/chat/completions"))
    assert (bridge.service, bridge.kind, bridge.parent_span_id) == (bridge_service, "server", CALLER_SPAN)
    assert bridge.attributes["http.response.status_code"] == 200
    assert bridge.attributes["http.route"] == "/v1/chat/completions" and not bridge.error
    core = only(received.named("modelmax.v1.CompletionService/StreamCompletion"))
    assert (core.service, core.kind, core.parent_span_id) == (core_service, "server", bridge.span_id)
    assert core.attributes["gen_ai.request.model"] == MODEL and core.attributes["modelmax.attempts"] == 2
    attempts = received.named(f"chat {UPSTREAM_MODEL}")
    assert len(attempts) == 2, received.spans
    failed, served = sorted(attempts, key=lambda span: not span.error)
    port = int(upstream.url.split(":")[2].split("/")[0])
    for attempt in attempts:
        assert (attempt.service, attempt.kind, attempt.parent_span_id) == (core_service, "client", core.span_id)
        assert attempt.attributes["gen_ai.operation.name"] == "chat"
        assert attempt.attributes["gen_ai.provider.name"] == "openai"
        assert attempt.attributes["gen_ai.request.model"] == MODEL
        assert attempt.attributes["gen_ai.response.model"] == UPSTREAM_MODEL
        assert (attempt.attributes["server.address"], attempt.attributes["server.port"]) == ("127.0.0.1", port)
    assert failed.error and failed.attributes["error.type"] == "upstream_unavailable"
    assert "gen_ai.usage.input_tokens" not in failed.attributes
    assert not served.error and "error.type" not in served.attributes
    assert served.attributes["gen_ai.usage.input_tokens"] == 7
    assert served.attributes["gen_ai.usage.output_tokens"] == 4
    assert served.attributes["gen_ai.usage.cache_read.input_tokens"] == 3
    assert served.attributes["gen_ai.usage.reasoning.output_tokens"] == 2
    assert served.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    # Each upstream request carried the trace context of its own attempt's span, in the caller's trace.
    sent = [request.headers.get("traceparent", "") for request in upstream.requests]
    assert sent == [f"00-{TRACE_ID}-{failed.span_id}-01", f"00-{TRACE_ID}-{served.span_id}-01"]
    # Content is not recorded unless the operator opts in: not the prompt, not the answer.
    values = [str(value) for span in received.spans for value in span.attributes.values()]
    assert not [value for value in values if PROMPT in value or "world" in value]


async def test_spans_of_a_retried_stream_arrive_linked_over_otlp_grpc(
    tmp_path: Path, flaky_upstream: OpenAIUpstream
) -> None:
    entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": flaky_upstream.url}}
    core_port, core_metrics, bridge_port = free_port(), free_port(), free_port()
    async with otlp_grpc_receiver() as (endpoint, received):
        otel = otel_env(endpoint, "grpc")
        core_env = {**otel, "MODELMAX_CATALOG": write_catalog(tmp_path, [entry]), "MODELMAX_API_KEY": API_KEY,
                    "MODELMAX_CORE_PORT": str(core_port), "MODELMAX_CORE_METRICS_PORT": str(core_metrics)}  # fmt: skip
        bridge_env = {**otel, "MODELMAX_CORE_TARGET": f"127.0.0.1:{core_port}",
                      "MODELMAX_BRIDGE_PORT": str(bridge_port), "MODELMAX_BRIDGE_METRICS_PORT": "off"}  # fmt: skip
        async with process("services", core_env, f"http://127.0.0.1:{core_metrics}/metrics") as core:
            async with process("bridge", bridge_env, f"http://127.0.0.1:{bridge_port}/readyz") as bridge:
                assert await ask(f"http://127.0.0.1:{bridge_port}/v1") == "Hello, world!"
                await asyncio.sleep(0.2)
                assert received.spans == [], "the batch processor holds them until the drain"
                await stop(bridge)
                await stop(core)
    assert_linked(received, flaky_upstream, core_service="modelmax-core", bridge_service="modelmax-bridge")


async def test_spans_arrive_over_otlp_http_in_one_process(
    tmp_path: Path, flaky_upstream: OpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core and bridge in one process share its tracing (as `configure` is called by each entry point)."""
    entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": flaky_upstream.url}}
    async with otlp_http_receiver() as (endpoint, received):
        for name, value in {**otel_env(endpoint, "http/protobuf"), "OTEL_SERVICE_NAME": "gateway-under-test"}.items():
            monkeypatch.setenv(name, value)
        assert tracing.configure("modelmax-core") is tracing.current is not None
        async with running_gateway(write_catalog(tmp_path, [entry])) as base_url:
            assert await ask(base_url) == "Hello, world!"
        await asyncio.to_thread(tracing.shutdown)  # the drain's flush
    assert tracing.current is None
    assert_linked(received, flaky_upstream, core_service="gateway-under-test", bridge_service="gateway-under-test")


async def test_an_operator_who_opts_in_gets_the_messages_on_the_attempt_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true: the conventions' JSON messages, on the attempt spans
    only (never the bridge's or the core's server span), a whole answer and a streamed one alike."""
    async with serve_openai_upstream(chunks=["Hel", "lo, ", "world!"]) as upstream:
        entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": upstream.url}}
        async with otlp_http_receiver() as (endpoint, received):
            env = {**otel_env(endpoint, "http/protobuf"), tracing.CAPTURE_CONTENT: "true"}
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            tracing.configure("modelmax-core")
            async with running_gateway(write_catalog(tmp_path, [entry])) as base_url:
                assert await ask(base_url) == "Hello, world!"
                async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                    whole = await client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
                    )
                assert whole.choices[0].message.content == "Hello, world!"
            await asyncio.to_thread(tracing.shutdown)
    attempts = received.named(f"chat {UPSTREAM_MODEL}")
    assert len(attempts) == 2
    for attempt in attempts:
        assert json.loads(str(attempt.attributes["gen_ai.output.messages"])) == [
            {"role": "assistant", "parts": [{"type": "text", "content": "Hello, world!"}], "finish_reason": "stop"}
        ]
        assert json.loads(str(attempt.attributes["gen_ai.input.messages"])) == [
            {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
        ]
    instructions = [a.attributes.get("gen_ai.system_instructions") for a in attempts]
    assert sorted(map(str, instructions)) == ["None", json.dumps([{"type": "text", "content": "Be brief."}])]
    others = [span for span in received.spans if span not in attempts]
    assert len(others) == 4 and not [str(v) for span in others for v in span.attributes.values() if PROMPT in str(v)]


async def test_a_caller_that_leaves_mid_stream_ends_every_span_as_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_openai_upstream(chunks=[f"part{i} " for i in range(50)], chunk_delay=0.05) as upstream:
        entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": upstream.url}}
        async with otlp_http_receiver() as (endpoint, received):
            for name, value in otel_env(endpoint, "http/protobuf").items():
                monkeypatch.setenv(name, value)
            tracing.configure("modelmax-core")
            async with running_gateway(write_catalog(tmp_path, [entry])) as base_url:
                body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
                async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                    auth = {"authorization": f"Bearer {API_KEY}", "traceparent": TRACEPARENT}
                    async with http.stream("POST", "/chat/completions", json=body, headers=auth) as response:
                        assert response.status_code == 200
                        await anext(response.aiter_lines())
                await asyncio.wait_for(upstream.disconnected.wait(), timeout=5)
                await asyncio.sleep(0.2)  # the core's handler unwinds after the upstream connection is dropped
            await asyncio.to_thread(tracing.shutdown)
    attempt = only(received.named(f"chat {UPSTREAM_MODEL}"))
    core = only(received.named("modelmax.v1.CompletionService/StreamCompletion"))
    bridge = only(received.named("POST /v1/chat/completions"))
    assert attempt.error and attempt.attributes["error.type"] == "cancelled"
    assert "gen_ai.usage.output_tokens" not in attempt.attributes
    assert core.error and core.attributes["error.type"] == "cancelled"
    assert (attempt.parent_span_id, core.parent_span_id, bridge.parent_span_id) == (
        core.span_id, bridge.span_id, CALLER_SPAN
    )  # fmt: skip


async def test_bedrock_and_gemini_requests_carry_their_attempt_s_trace_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through botocore's before-send event and aiohttp's request hook: no SDK internals patched."""
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as bedrock, serve_gemini(api_key="AIza-test") as gemini:
        catalog = [
            {"name": "on-bedrock", "provider": "bedrock", "model": "deepseek.v3.2",
             "options": {"region": "us-east-1", "endpoint_url": bedrock.url}},
            {"name": "on-gemini", "provider": "gemini", "model": "gemini-3-flash-preview",
             "options": {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url}},
        ]  # fmt: skip
        async with otlp_http_receiver() as (endpoint, received):
            for name, value in otel_env(endpoint, "http/protobuf").items():
                monkeypatch.setenv(name, value)
            tracing.configure("modelmax-core")
            async with running_gateway(write_catalog(tmp_path, catalog), {"GEMINI_API_KEY": "AIza-test"}) as base_url:
                async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
                    for model in ("on-bedrock", "on-gemini"):
                        stream = await client.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True,
                            extra_headers={"traceparent": TRACEPARENT},
                        )  # fmt: skip
                        assert [chunk async for chunk in stream]
            await asyncio.to_thread(tracing.shutdown)
    for fake, span_name, provider in (
        (bedrock, "chat deepseek.v3.2", "aws.bedrock"),
        (gemini, "chat gemini-3-flash-preview", "gcp.gemini"),
    ):
        attempt = only(received.named(span_name))
        assert attempt.attributes["gen_ai.provider.name"] == provider
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert [request.headers.get("traceparent") for request in fake.requests] == [
            f"00-{TRACE_ID}-{attempt.span_id}-01"
        ]


async def test_with_tracing_off_nothing_is_exported_and_no_provider_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_openai_upstream() as upstream, otlp_http_receiver() as (endpoint, received):
        entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": upstream.url}}
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # an endpoint alone would turn it on
        assert tracing.configure("modelmax-core") is None and tracing.current is None
        async with running_gateway(write_catalog(tmp_path, [entry])) as base_url:
            assert await ask(base_url) == "Hello, world!"
        tracing.shutdown()
        await asyncio.sleep(0.1)
    assert received.spans == []
    assert "traceparent" not in upstream.requests[0].headers, "the caller's context is not passed on either"
    # Nothing was installed as the API's global provider: it is still the API's proxy for a provider never set.
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"


async def test_each_attempt_is_one_client_duration_observation_with_its_server_address(
    tmp_path: Path, flaky_upstream: OpenAIUpstream
) -> None:
    """Recorded whether tracing is on or off (here off): the 503 and the served retry, told apart by error_type."""
    entry = {"name": MODEL, "provider": "openai", "model": UPSTREAM_MODEL, "options": {"base_url": flaky_upstream.url}}
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with running_bridge(f"127.0.0.1:{core.port}") as base_url:
            assert await ask(base_url) == "Hello, world!"
        registry = core.metrics.registry
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": MODEL,
              "gen_ai_response_model": UPSTREAM_MODEL, "server_address": "127.0.0.1"}  # fmt: skip
    count = "gen_ai_client_operation_duration_seconds_count"
    assert registry.get_sample_value(count, {**labels, "error_type": "upstream_unavailable"}) == 1
    assert registry.get_sample_value(count, {**labels, "error_type": ""}) == 1


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_which_variables_turn_tracing_on(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


def test_an_unknown_otlp_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        tracing.configure("modelmax-core")
    assert tracing.current is None
