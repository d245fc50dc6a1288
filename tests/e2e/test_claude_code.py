"""Claude Code itself (`claude -p`, the CLI from tests/node, installed by `make test`) on the gateway's Messages API,
with a Bedrock model behind it: the gateway has to take Claude Code's real requests (a dozen tools, some deferred,
adaptive thinking, effort, context management, metadata, betas, `?beta=true`) and stream answers it accepts.

A scripted fake Bedrock plays the model. Asked to find a secret, it calls Claude Code's `Read` tool on the file;
when the tool result comes back, it reads the secret out of that result and answers with it, so the secret in
Claude Code's printed answer proves the file's content went Claude Code -> gateway -> Bedrock and back.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import ToolUse, use_fake_credentials
from tests.fakes.bedrock_script import (
    Exchange,
    Policy,
    ScriptedBedrock,
    Turn,
    result_text,
    serve_scripted_bedrock,
    user_text,
)
from tests.fakes.serve import serve

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
CLAUDE = NODE_DIR / "node_modules" / ".bin" / "claude"
MODEL = "deepseek-v3.2"
TIMEOUT_SECONDS = 120
READ_ID = "tooluse_read_4Fz9"
SECRET_LINE = re.compile(r"The secret word is: (\w+)")
TASK_MARKER = "Find the secret word"
HOP_BY_HOP = ("content-length", "transfer-encoding", "connection")
# Read without a permission prompt (none could be answered under -p), no session files, the result as one JSON line.
FLAGS = ["--allowedTools", "Read", "--no-session-persistence", "--output-format", "json"]


def catalog(bedrock: ScriptedBedrock) -> list[dict[str, Any]]:
    return [{"name": MODEL, "provider": "bedrock", "model": "deepseek.v3.2",
             "options": {"region": "us-east-1", "endpoint_url": bedrock.url}}]  # fmt: skip


async def claude(prompt: str, bridge_url: str, home: Path, cwd: Path) -> tuple[int, str, str]:
    """Run `claude -p prompt` non-interactively against the bridge; (exit code, stdout, stderr)."""
    binary = shutil.which("node")
    if binary is None or not CLAUDE.exists():
        pytest.fail("node and tests/node/node_modules (Claude Code) are required: run `make test`, which installs them")
    env = {
        "HOME": str(home),
        "PATH": f"{Path(binary).parent}:/usr/bin:/bin",
        "ANTHROPIC_BASE_URL": bridge_url,  # no /v1: Claude Code appends /v1/messages
        "ANTHROPIC_AUTH_TOKEN": API_KEY,  # sent as Authorization: Bearer
        "ANTHROPIC_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    process = await asyncio.create_subprocess_exec(
        str(CLAUDE), "-p", prompt, *FLAGS, cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"claude -p did not finish within {TIMEOUT_SECONDS} s")
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def secret_finder(file_path: Path) -> Policy:
    """The model's side of the task: Read the file, then answer with the secret found in the tool result.

    Any other request Claude Code makes (none is expected with nonessential traffic off) gets a short text answer.
    """

    def policy(exchange: Exchange) -> Turn:
        if exchange.tool_results:
            found = SECRET_LINE.search("\n".join(result_text(result) for result in exchange.tool_results))
            if found is None:
                return Turn(text=["The file held no secret."])
            return Turn(text=["The secret word is ", found.group(1), "."], usage=usage(exchange))
        if "Read" in exchange.tool_names and TASK_MARKER in user_text(exchange):
            call = ToolUse(READ_ID, "Read", {"file_path": str(file_path)})
            return Turn(text=["I will read the file."], tool_uses=[call], usage=usage(exchange))
        return Turn(text=["OK."])

    return policy


def usage(exchange: Exchange) -> dict[str, int]:
    """Plausible usage: a token per 4 bytes of request, a few out."""
    prompt = len(json.dumps(exchange.body)) // 4
    return {"inputTokens": prompt, "outputTokens": 12, "totalTokens": prompt + 12}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request Claude Code sent, and the gateway's status for it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class Recorder:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)


@asynccontextmanager
async def recording_proxy(target: str) -> AsyncIterator[Recorder]:
    """A transparent HTTP proxy in front of `target` that records what Claude Code sends, streaming answers through."""
    recorder = Recorder()
    client = httpx.AsyncClient(base_url=target, timeout=TIMEOUT_SECONDS)

    async def forward(request: Request) -> StreamingResponse:
        raw = await request.body()
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "content-length")}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        outgoing = client.build_request(request.method, path, headers=headers, content=raw)
        upstream = await client.send(outgoing, stream=True)
        body = json.loads(raw) if raw else None
        recorder.seen.append(Seen(request.method, path, dict(request.headers), body, upstream.status_code))
        passed = {k: v for k, v in upstream.headers.items() if k not in HOP_BY_HOP}
        return StreamingResponse(upstream.aiter_raw(), upstream.status_code, passed,
                                 background=BackgroundTask(upstream.aclose))  # fmt: skip

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "HEAD"])])
    async with client, serve(app) as url:
        recorder.url = url
        yield recorder


def dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """Claude Code's own HOME and its working directory, both fresh; fake AWS credentials for the core."""
    use_fake_credentials(monkeypatch, tmp_path)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def agent_requests(bedrock: ScriptedBedrock) -> list[Exchange]:
    """The requests of the main agent loop: those that offer Claude Code's tools."""
    return [e for e in bedrock.exchanges if "Read" in e.tool_names]


async def test_claude_code_reads_a_file_through_the_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_for: Callable[..., Awaitable[str]]
) -> None:
    home, work = dirs(monkeypatch, tmp_path)
    secret = "zebra" + uuid.uuid4().hex[:10]
    notes = work / "notes.txt"
    content = f"Meeting notes, kept short.\nThe secret word is: {secret}\nNothing else here.\n"
    notes.write_text(content)

    async with serve_scripted_bedrock(secret_finder(notes)) as bedrock:
        bridge_url = (await gateway_for(write_catalog(tmp_path, catalog(bedrock)))).removesuffix("/v1")
        task = f"{TASK_MARKER} in the file notes.txt: read it with your Read tool and reply with the word only."
        code, stdout, stderr = await claude(task, bridge_url, home, work)

    report = f"exit {code}\nstdout: {stdout}\nstderr: {stderr}\nexchanges: {[e.turn for e in bedrock.exchanges]}"
    assert bedrock.errors == [], report
    assert code == 0, report
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["is_error"] is False and result["subtype"] == "success", report
    assert secret in result["result"], report
    assert result["num_turns"] >= 2, report  # the Read call and the answer

    loop = agent_requests(bedrock)
    assert len(loop) == 2, report
    assert all(e.model_id == "deepseek.v3.2" and e.operation == "converse-stream" for e in loop), report
    first, second = loop
    # The model saw Claude Code's tools, Read among them with its own schema, and its system prompt.
    (read_spec,) = [t["toolSpec"] for t in first.body["toolConfig"]["tools"] if t["toolSpec"]["name"] == "Read"]
    assert "file_path" in read_spec["inputSchema"]["json"]["properties"], read_spec
    assert first.tool_results == [] and TASK_MARKER in user_text(first)
    assert first.body.get("system"), "Claude Code's system prompt reaches the model"
    # The second request carries the Read call as the model made it and Claude Code's result for it.
    answers = [message for message in second.body["messages"] if message["role"] == "assistant"]
    calls = [block["toolUse"] for message in answers for block in message["content"] if "toolUse" in block]
    assert calls == [{"toolUseId": READ_ID, "name": "Read", "input": {"file_path": str(notes)}}], report
    (tool_result,) = second.tool_results
    assert tool_result["toolUseId"] == READ_ID and tool_result.get("status", "success") == "success", tool_result
    text = result_text(tool_result)
    for line in content.splitlines():
        assert line in text, text  # Claude Code numbers the lines; each one arrives whole
    # The fake called Read once; anything else Claude Code asked (nothing, with nonessential traffic off) got text.
    assert [e for e in bedrock.exchanges if e.turn.tool_uses] == [first], report


async def test_claude_code_plain_prompt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_for: Callable[..., Awaitable[str]]
) -> None:
    home, work = dirs(monkeypatch, tmp_path)
    answer = ["Pong from ", "the fake ", "Bedrock model."]

    async with serve_scripted_bedrock(lambda exchange: Turn(text=answer)) as bedrock:
        bridge_url = (await gateway_for(write_catalog(tmp_path, catalog(bedrock)))).removesuffix("/v1")
        # Claude Code goes through a recording proxy here, to show what it sent that the gateway accepted.
        async with recording_proxy(bridge_url) as proxy:
            code, stdout, stderr = await claude("Say pong.", proxy.url, home, work)

    report = f"exit {code}\nstdout: {stdout}\nstderr: {stderr}\nseen: {[(r.path, r.status) for r in proxy.seen]}"
    assert bedrock.errors == [], report
    assert code == 0, report
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["is_error"] is False and result["result"] == "".join(answer), report
    asked = [e for e in bedrock.exchanges if "Say pong." in user_text(e)]
    assert len(asked) == 1 and asked[0].operation == "converse-stream", report

    # Every request Claude Code made was answered with a success; the prompt's was one streamed Messages call.
    assert proxy.seen and all(r.status == 200 for r in proxy.seen), report
    (call,) = [r for r in proxy.seen if r.path.startswith("/v1/messages") and "Say pong." in json.dumps(r.body)]
    assert call.method == "POST" and call.path == "/v1/messages?beta=true", report
    assert call.headers["authorization"] == f"Bearer {API_KEY}" and call.headers["anthropic-version"] == "2023-06-01"
    assert "claude-code-20250219" in call.headers["anthropic-beta"].split(",")
    body = call.body
    assert body["model"] == MODEL and body["stream"] is True
    # What the gateway is meant to take from Claude Code: adaptive thinking, effort, context management, metadata,
    # and tools of which some are deferred (Anthropic's tool search); the deferred ones never reach the model.
    assert body["thinking"]["type"] == "adaptive", body.get("thinking")
    assert "effort" in body.get("output_config", {}), body.get("output_config")
    assert "context_management" in body and "user_id" in body["metadata"]
    deferred = {tool["name"] for tool in body["tools"] if tool.get("defer_loading") is True}
    offered = [tool["name"] for tool in body["tools"] if tool.get("defer_loading") is not True]
    assert deferred and "Read" in offered, body["tools"]
    assert asked[0].tool_names == offered, (asked[0].tool_names, offered, deferred)
