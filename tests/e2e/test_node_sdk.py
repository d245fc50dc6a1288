"""The official `openai` Node SDK (tests/node, installed by `make test`) against the gateway: plain and streaming."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import API_KEY

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


async def test_node_sdk_plain_and_streaming(gateway_url: str) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("node and tests/node/node_modules are required: run `make test`, which installs them")
    process = await asyncio.create_subprocess_exec(
        node, "chat.mjs", cwd=NODE_DIR,
        env={"MODELMAX_API_KEY": API_KEY, "MODELMAX_BASE_URL": gateway_url, "PATH": str(Path(node).parent)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["plain"] and result["plain"] == result["streamed"]  # temperature 0: the same tokens both ways
    assert result["plainFinish"] in ("stop", "length") and result["streamFinish"] == result["plainFinish"]
    assert result["chunks"] >= 4
    assert result["streamUsage"]["total_tokens"] == result["plainUsage"]["total_tokens"]
    assert result["plainUsage"]["prompt_tokens"] > 10
