"""The combined mode as a process (`python -m startup.combined`, what `modelmax run --combined` starts): both HTTP
dialects and the core's gRPC port in one process, a stream in flight drained on SIGTERM, and every usage record
written before it exits. (The e2e suite itself also runs with the in-process transport: `--transport=inprocess`.)"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import grpc
import openai
import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.policy import open_store
from services.policy.keys import KeySpec
from startup.cli import main as modelmax
from tests.conftest import write_catalog
from tests.e2e.test_shutdown import MODEL, assert_complete, read_stream_then_terminate
from tests.fakes.openai_upstream import DEFAULT_USAGE, OpenAIUpstream, serve_openai_upstream
from tests.grpc_client import core_channel
from tests.processes import ROOT, free_port, process


def combined_env(tmp_path: Path, upstream: OpenAIUpstream, database: str) -> tuple[dict[str, str], int, int]:
    entry = {"name": MODEL, "provider": "openai", "model": "m", "options": {"base_url": upstream.url}}
    core_port, bridge_port = free_port(), free_port()
    env = {"MODELMAX_CATALOG": write_catalog(tmp_path, [entry]), "MODELMAX_DATABASE_URL": database,
           "MODELMAX_CORE_PORT": str(core_port), "MODELMAX_BRIDGE_PORT": str(bridge_port),
           "MODELMAX_CORE_METRICS_PORT": "off", "MODELMAX_BRIDGE_METRICS_PORT": "off",
           "MODELMAX_CORE_SHUTDOWN_GRACE_SECONDS": "10", "MODELMAX_BRIDGE_SHUTDOWN_GRACE_SECONDS": "10"}  # fmt: skip
    return env, core_port, bridge_port


async def new_key(database: str) -> tuple[str, str]:
    store = await open_store(database)
    try:
        record, key = await store.create_key(KeySpec("combined"))
    finally:
        await store.close()
    return record.id, key


async def test_one_process_serves_both_dialects_and_the_grpc_port_and_meters_all(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    key_id, key = await new_key(database)
    async with serve_openai_upstream() as upstream:
        env, core_port, bridge_port = combined_env(tmp_path, upstream, database)
        root = f"http://127.0.0.1:{bridge_port}"
        async with process("startup.combined", env, f"{root}/readyz") as gateway:
            async with openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0) as client:
                answer = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "Hello, world!"
            async with anthropic.AsyncAnthropic(base_url=root, api_key=key, max_retries=0) as claude:
                message = await claude.messages.create(
                    model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                )
            assert message.content[0].type == "text" and message.content[0].text == "Hello, world!"
            params = pb.CompletionParams(model=MODEL, messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
            async with core_channel(f"127.0.0.1:{core_port}", key=key) as channel:  # an internal caller, unchanged
                reply = await svc_grpc.CompletionServiceStub(channel).CreateCompletion(
                    svc.CreateCompletionRequest(params=params)
                )
            assert reply.choices[0].content == "Hello, world!"
            async with core_channel(f"127.0.0.1:{core_port}", key="mm-no-such-key-0123456789abcdef") as channel:
                try:
                    await svc_grpc.CompletionServiceStub(channel).CreateCompletion(
                        svc.CreateCompletionRequest(params=params)
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    raise AssertionError("a call without a valid key was served")
            gateway.send_signal(signal.SIGTERM)  # at once: the records are still in the writer's buffer
            assert await asyncio.wait_for(gateway.wait(), timeout=15) in (0, -signal.SIGTERM)
    assert len(upstream.requests) == 3
    store = await open_store(database)
    try:
        [row] = await store.usage_report(datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC), "key")
    finally:
        await store.close()
    assert (row.group, row.requests) == (key_id, 3)  # the HTTP callers' and the gRPC caller's, alike
    assert row.prompt_tokens == 3 * DEFAULT_USAGE["prompt_tokens"]


async def test_sigterm_drains_the_stream_in_flight_then_exits(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    _, key = await new_key(database)
    async with serve_openai_upstream(chunks=[f"part{i} " for i in range(15)], chunk_delay=0.1) as upstream:
        env, _, bridge_port = combined_env(tmp_path, upstream, database)
        root = f"http://127.0.0.1:{bridge_port}"
        async with process("startup.combined", env, f"{root}/readyz") as gateway:
            started = time.monotonic()
            events, refused = await read_stream_then_terminate(f"{root}/v1", gateway, key=key)
            code = await asyncio.wait_for(gateway.wait(), timeout=15)
    assert_complete(events)
    assert refused in (0, 503), "a draining gateway takes no new work"
    assert code in (0, -signal.SIGTERM) and time.monotonic() - started < 10


def test_modelmax_run_combined_is_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        modelmax(["run", "--help"])
    assert "--combined" in capsys.readouterr().out


async def test_an_unusable_setting_stops_the_combined_process_with_its_name() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "startup.combined", env={"PATH": os.environ["PATH"], "MODELMAX_BRIDGE_PORT": "http"},
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode == 1 and b"MODELMAX_BRIDGE_PORT" in err, err
