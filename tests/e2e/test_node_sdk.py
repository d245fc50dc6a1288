"""The official `openai` Node SDK (tests/node, installed by `make test`) against the gateway: plain and streaming,
and a tool-calling loop on the Bedrock and Gemini models."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import ToolUse, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import serve_gemini

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"


async def node(script: str, base_url: str, *args: str) -> Any:
    """Run a script of tests/node with the SDK pointed at `base_url`; its last stdout line, as JSON."""
    binary = shutil.which("node")
    if binary is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("node and tests/node/node_modules are required: run `make test`, which installs them")
    process = await asyncio.create_subprocess_exec(
        binary, script, *args, cwd=NODE_DIR,
        env={"MODELMAX_API_KEY": API_KEY, "MODELMAX_BASE_URL": base_url, "PATH": str(Path(binary).parent)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def test_node_sdk_plain_and_streaming(gateway_url: str) -> None:
    result = await node("chat.mjs", gateway_url)
    assert result["plain"] and result["plain"] == result["streamed"]  # temperature 0: the same tokens both ways
    assert result["plainFinish"] in ("stop", "length") and result["streamFinish"] == result["plainFinish"]
    assert result["chunks"] >= 4
    assert result["streamUsage"]["total_tokens"] == result["plainUsage"]["total_tokens"]
    assert result["plainUsage"]["prompt_tokens"] > 10


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_node_sdk_tool_loop_on_bedrock_and_gemini(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_for: Callable[..., Awaitable[str]], stream: bool
) -> None:
    """Two parallel calls, the results sent back, the answer: the SDK assembles the same turns on both providers."""
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as bedrock, serve_gemini(api_key=GEMINI_KEY) as gemini:
        catalog = [
            {"name": "deepseek-v3.2", "provider": "bedrock", "model": "deepseek.v3.2",
             "options": {"region": "us-east-1", "endpoint_url": bedrock.url}},
            {"name": "gemini-3-flash-preview", "provider": "gemini", "model": "gemini-3-flash-preview",
             "options": {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url}},
        ]  # fmt: skip
        base_url = await gateway_for(write_catalog(tmp_path, catalog), {"GEMINI_API_KEY": GEMINI_KEY})
        bedrock.text, bedrock.stop_reason = [], "tool_use"
        bedrock.tool_uses = [ToolUse("tooluse_p", "get_weather", {"city": "Paris"}),
                             ToolUse("tooluse_t", "get_weather", {"city": "Tokyo"})]  # fmt: skip
        gemini.texts, gemini.calls_in_one_chunk = [], True
        gemini.function_calls = [{"functionCall": {"name": "get_weather", "args": {"city": city}}}
                                 for city in ("Paris", "Tokyo")]  # fmt: skip
        question = [{"role": "user", "content": "Paris or Tokyo?"}]
        first: dict[str, Any] = {}
        for model in ("deepseek-v3.2", "gemini-3-flash-preview"):
            request = {"model": model, "messages": question, "tools": TOOLS, "stream": stream}
            first[model] = await node("turn.mjs", base_url, json.dumps(request))

        bedrock.text, bedrock.stop_reason, bedrock.tool_uses = ["Warmer in Tokyo."], "end_turn", []
        gemini.texts, gemini.function_calls = ["Warmer in Tokyo."], []
        final: dict[str, Any] = {}
        for model, turn in first.items():
            results = [{"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"celsius": celsius})}
                       for call, celsius in zip(turn["message"]["tool_calls"], (18, 25), strict=True)]  # fmt: skip
            history = [*question, turn["message"], *results]
            request = {"model": model, "messages": history, "tools": TOOLS, "stream": stream}
            final[model] = await node("turn.mjs", base_url, json.dumps(request))

    for model, turn in first.items():
        assert turn["finish_reason"] == "tool_calls", model
        calls = turn["message"]["tool_calls"]
        assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("function", "get_weather", {"city": "Paris"}),
            ("function", "get_weather", {"city": "Tokyo"}),
        ], model
        assert all(c["id"] for c in calls) and len({c["id"] for c in calls}) == 2, model
    assert {model: (t["message"]["content"], t["finish_reason"]) for model, t in final.items()} == {
        "deepseek-v3.2": ("Warmer in Tokyo.", "stop"),
        "gemini-3-flash-preview": ("Warmer in Tokyo.", "stop"),
    }
    # The results the Node program sent back reached each provider answering the right calls.
    assert [b["toolResult"]["toolUseId"] for b in bedrock.requests[-1].body["messages"][2]["content"]] == [
        "tooluse_p",
        "tooluse_t",
    ]
    responses = [p["functionResponse"] for p in gemini.requests[-1].body["contents"][2]["parts"]]
    assert [(r["name"], r["response"]) for r in responses] == [("get_weather", {"celsius": 18}),
                                                                ("get_weather", {"celsius": 25})]  # fmt: skip
