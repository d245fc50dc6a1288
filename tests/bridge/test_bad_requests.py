"""Every malformed request gets an OpenAI-shaped error with the right 4xx status and `param`, never a 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.server import CoreServer
from tests.conftest import API_KEY, running_bridge

MODEL = "smollm2-135m"
USER = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 1, **fields}


# (case id, JSON body or raw bytes, expected status, error type, param)
CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("malformed json", b'{"model": "x", ', 400, "invalid_request_error", None),
    ("nan literal", b'{"model": "smollm2-135m", "messages": [], "temperature": NaN}', 400,
     "invalid_request_error", None),
    ("body is a list", [], 400, "invalid_request_error", None),
    ("missing model", {"messages": USER}, 400, "invalid_request_error", "model"),
    ("model not a string", body(model=7), 400, "invalid_request_error", "model"),
    ("missing messages", {"model": MODEL}, 400, "invalid_request_error", "messages"),
    ("messages not a list", body(messages="hi"), 400, "invalid_request_error", "messages"),
    ("empty messages", body(messages=[]), 400, "invalid_request_error", "messages"),
    ("message not an object", body(messages=["hi"]), 400, "invalid_request_error", "messages[0]"),
    ("bad role", body(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_request_error",
     "messages[0].role"),
    ("missing role", body(messages=[{"content": "x"}]), 400, "invalid_request_error", "messages[0].role"),
    ("tool role", body(messages=[{"role": "tool", "content": "x", "tool_call_id": "a"}]), 400,
     "invalid_request_error", "messages[0].role"),
    ("missing content", body(messages=[{"role": "user"}]), 400, "invalid_request_error", "messages[0].content"),
    ("content a number", body(messages=[*USER, {"role": "user", "content": 5}]), 400, "invalid_request_error",
     "messages[1].content"),
    ("image part", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "invalid_request_error", "messages[0].content[0]"),
    ("temperature a string", body(temperature="hot"), 400, "invalid_request_error", "temperature"),
    ("temperature a bool", body(temperature=True), 400, "invalid_request_error", "temperature"),
    ("temperature above 2", body(temperature=2.5), 400, "invalid_request_error", "temperature"),
    ("temperature negative", body(temperature=-0.1), 400, "invalid_request_error", "temperature"),
    ("top_p above 1", body(top_p=1.5), 400, "invalid_request_error", "top_p"),
    ("top_p a string", body(top_p="0.5"), 400, "invalid_request_error", "top_p"),
    ("max_tokens zero", body(max_tokens=0), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens negative", body(max_tokens=-3), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens a float", body(max_tokens=1.5), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens a string", body(max_tokens="10"), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens huge", body(max_tokens=10**12), 400, "invalid_request_error", "max_tokens"),
    ("five stops", body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error", "stop"),
    ("stop not strings", body(stop=[1]), 400, "invalid_request_error", "stop"),
    ("stop an object", body(stop={"a": 1}), 400, "invalid_request_error", "stop"),
    ("empty stop", body(stop=""), 400, "invalid_request_error", "stop"),
    ("stream not a bool", body(stream="yes"), 400, "invalid_request_error", "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400, "invalid_request_error",
     "stream_options"),
    ("include_usage not a bool", body(stream=True, stream_options={"include_usage": "y"}), 400,
     "invalid_request_error", "stream_options.include_usage"),
    ("n above 1", body(n=2), 400, "invalid_request_error", "n"),
    ("tools", body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "invalid_request_error", "tools"),
    ("json schema output", body(response_format={"type": "json_object"}), 400, "invalid_request_error",
     "response_format"),
    ("unknown model", body(model="nope"), 404, "invalid_request_error", "model"),
    ("unknown model, streaming", body(model="nope", stream=True), 404, "invalid_request_error", "model"),
]  # fmt: skip


@pytest.fixture
async def client(local_core: CoreServer) -> AsyncIterator[httpx.AsyncClient]:
    async with running_bridge(f"127.0.0.1:{local_core.port}", max_body_bytes=64 * 1024) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            yield http


def assert_openai_error(response: httpx.Response, status: int, kind: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(("payload", "status", "kind", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_request(client: httpx.AsyncClient, payload: Any, status: int, kind: str, param: str | None) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = await client.post(
        "/chat/completions", content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_openai_error(response, status, kind, param)


async def test_unknown_model_has_code_model_not_found(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=body(model="nope"), headers=AUTH)
    assert assert_openai_error(response, 404, "invalid_request_error", "model")["code"] == "model_not_found"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {API_KEY}"},
     {"Authorization": "Bearer"}, {"Authorization": f"Bearer {API_KEY}x"}],
    ids=["no header", "wrong key", "wrong scheme", "empty bearer", "key plus a character"],
)  # fmt: skip
async def test_missing_or_wrong_key_is_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for request in (
        client.post("/chat/completions", json=body(), headers=headers),
        client.get("/models", headers=headers),
    ):
        assert_openai_error(await request, 401, "invalid_request_error", None)


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/chat/completions", content=json.dumps(body()), headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert_openai_error(response, 415, "invalid_request_error", None)


async def test_oversize_body_is_413_with_or_without_content_length(client: httpx.AsyncClient) -> None:
    huge = json.dumps(body(messages=[{"role": "user", "content": "x" * 100_000}])).encode()
    declared = await client.post(
        "/chat/completions", content=huge, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_openai_error(declared, 413, "invalid_request_error", None)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(huge), 8192):
            yield huge[start : start + 8192]

    streamed = await client.post(
        "/chat/completions", content=chunked(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_openai_error(streamed, 413, "invalid_request_error", None)


async def test_unknown_path_and_method_are_openai_errors(client: httpx.AsyncClient) -> None:
    assert_openai_error(await client.get("/chat/completions", headers=AUTH), 405, "invalid_request_error", None)
    assert_openai_error(await client.get("/nothing-here", headers=AUTH), 404, "invalid_request_error", None)


async def test_fields_not_supported_yet_are_accepted_and_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/chat/completions",
        json=body(user="u-1", seed=7, presence_penalty=0.1, logit_bias={}, n=1, tool_choice="none",
                  response_format={"type": "text"}, some_future_field={"x": 1}),
        headers=AUTH,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


async def test_developer_role_and_text_parts_are_accepted(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    response = await client.post("/chat/completions", json=body(messages=messages), headers=AUTH)
    assert response.status_code == 200, response.text
