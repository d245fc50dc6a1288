"""The official `@anthropic-ai/sdk` Node SDK (tests/node, installed by `make test`) against the gateway's Messages
API: a two-step tool loop on a Bedrock model, plain (`messages.create`) and streamed (`messages.stream` and its
`finalMessage()`), run by tests/node/messages.mjs end to end. The fake Bedrock model calls the tool, then answers
from the tool result it finds in the next request, so the answer proves the result made the round trip."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import ToolUse, use_fake_credentials
from tests.fakes.bedrock_script import Exchange, Turn, result_text, serve_scripted_bedrock

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
TOOL_USE_ID = "tooluse_weather_7Qx2"
FIRST_USAGE = {"inputTokens": 31, "outputTokens": 12, "totalTokens": 43}
FINAL_USAGE = {"inputTokens": 58, "outputTokens": 9, "totalTokens": 67}


async def node(script: str, base_url: str, home: Path, *args: str) -> Any:
    """Run a script of tests/node with the SDK pointed at `base_url`; its last stdout line, as JSON."""
    binary = shutil.which("node")
    if binary is None or not (NODE_DIR / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        pytest.fail("node and tests/node/node_modules are required: run `make test`, which installs them")
    process = await asyncio.create_subprocess_exec(
        binary, script, *args, cwd=NODE_DIR,
        env={"MODELMAX_API_KEY": API_KEY, "MODELMAX_BASE_URL": base_url, "PATH": str(Path(binary).parent),
             "HOME": str(home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout.decode().strip().splitlines()[-1])


def weather_model(exchange: Exchange) -> Turn:
    """Call get_weather for Paris; once the result is back, answer with the temperature it carries."""
    if exchange.tool_results:
        (result,) = exchange.tool_results
        weather = json.loads(result_text(result))
        return Turn(text=["It is ", f"{weather['celsius']} °C", f" in {weather['city']}."], usage=FINAL_USAGE)
    call = ToolUse(TOOL_USE_ID, "get_weather", {"city": "Paris"}, pieces=['{"ci', 'ty": "Pa', 'ris"}'])
    return Turn(text=["Let me check."], tool_uses=[call], usage=FIRST_USAGE)


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message's content blocks without an empty `citations` (a text block may carry null or [])."""
    for block in message["content"]:
        assert not block.get("citations"), block
    return [{k: v for k, v in block.items() if k != "citations"} for block in message["content"]]


@pytest.mark.parametrize("mode", ["plain", "stream"])
async def test_anthropic_node_sdk_tool_loop_on_bedrock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_for: Callable[..., Awaitable[str]], mode: str
) -> None:
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_scripted_bedrock(weather_model) as bedrock:
        catalog: list[dict[str, object]] = [{"name": "deepseek-v3.2", "provider": "bedrock", "model": "deepseek.v3.2",
                    "options": {"region": "us-east-1", "endpoint_url": bedrock.url}}]  # fmt: skip
        openai_base = await gateway_for(write_catalog(tmp_path, catalog))
        base_url = openai_base.removesuffix("/v1")  # the Anthropic SDK appends /v1/messages itself
        result = await node("messages.mjs", base_url, tmp_path, mode, "deepseek-v3.2")

    assert bedrock.errors == []
    first, final = result["first"], result["final"]
    # The first turn: the model's text, then its tool call, whole (streamed: assembled from input_json_delta).
    assert first["type"] == "message" and first["role"] == "assistant" and first["id"].startswith("msg_")
    assert first["stop_reason"] == "tool_use" and first["stop_sequence"] is None
    assert blocks(first) == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": TOOL_USE_ID, "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert first["model"] == "deepseek-v3.2"
    assert (first["usage"]["input_tokens"], first["usage"]["output_tokens"]) == (31, 12)
    # The final turn: the answer the fake composed from the tool result the SDK sent back.
    assert final["stop_reason"] == "end_turn" and final["stop_sequence"] is None
    assert blocks(final) == [{"type": "text", "text": "It is 18 °C in Paris."}]
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (58, 9)
    for usage in (first["usage"], final["usage"]):
        assert usage.get("cache_creation_input_tokens") in (0, None)
        assert usage.get("cache_read_input_tokens") in (0, None)
    assert first["id"] != final["id"]
    if mode == "stream":
        for events in (result["firstEvents"], result["finalEvents"]):
            assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
        assert result["firstEvents"].count("content_block_start") == 2
        assert result["finalEvents"].count("content_block_start") == 1

    # What Bedrock received: the same operation per mode, and in the second turn the whole history, with the
    # tool result answering the fake's own toolUseId.
    operation = "converse-stream" if mode == "stream" else "converse"
    assert [(e.model_id, e.operation) for e in bedrock.exchanges] == [("deepseek.v3.2", operation)] * 2
    assert [spec["toolSpec"]["name"] for spec in bedrock.exchanges[0].body["toolConfig"]["tools"]] == ["get_weather"]
    assert bedrock.exchanges[0].body["system"] == [{"text": "Use the tools."}]
    history = bedrock.exchanges[1].body["messages"]
    assert [message["role"] for message in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == [{"text": "Is it warm in Paris?"}]
    assert history[1]["content"] == [
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": TOOL_USE_ID, "name": "get_weather", "input": {"city": "Paris"}}},
    ]
    (block,) = history[2]["content"]
    assert block["toolResult"]["toolUseId"] == TOOL_USE_ID
    assert json.loads(result_text(block["toolResult"])) == {"city": "Paris", "celsius": 18}
    assert block["toolResult"].get("status", "success") == "success"
