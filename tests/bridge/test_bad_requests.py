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


PNG = "iVBORw0KGgo="  # the 8-byte PNG signature, base64


def user_parts(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def called(*calls: Any) -> list[dict[str, Any]]:
    """A conversation whose messages[1] is an assistant turn with these tool calls."""
    return [*USER, {"role": "assistant", "content": None, "tool_calls": list(calls)}]


def call(**function: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}", **function}}


def tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


def schema(**json_schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, **json_schema}}


# (case id, JSON body or raw bytes, expected status, error type, param)
CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("malformed json", b'{"model": "x", ', 400, "invalid_request_error", None),
    ("nan literal", b'{"model": "smollm2-135m", "messages": [], "temperature": NaN}', 400,
     "invalid_request_error", None),
    ("lone surrogate", b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
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
    ("role not a string", body(messages=[{"role": ["user"], "content": "x"}]), 400, "invalid_request_error",
     "messages[0].role"),
    ("missing role", body(messages=[{"content": "x"}]), 400, "invalid_request_error", "messages[0].role"),
    ("legacy function role", body(messages=[*USER, {"role": "function", "name": "f", "content": "x"}]), 400,
     "invalid_request_error", "messages[1].role"),
    ("missing content", body(messages=[{"role": "user"}]), 400, "invalid_request_error", "messages[0].content"),
    ("content a number", body(messages=[*USER, {"role": "user", "content": 5}]), 400, "invalid_request_error",
     "messages[1].content"),
    # content parts
    ("part not an object", body(messages=user_parts("hi")), 400, "invalid_request_error", "messages[0].content[0]"),
    ("part of unknown type", body(messages=user_parts({"type": "video", "video": "x"})), 400,
     "invalid_request_error", "messages[0].content[0]"),
    ("text part without text", body(messages=user_parts({"type": "text", "text": 3})), 400, "invalid_request_error",
     "messages[0].content[0].text"),
    ("audio part", body(messages=user_parts({"type": "input_audio", "input_audio": {"data": PNG, "format": "wav"}})),
     400, "invalid_request_error", "messages[0].content[0]"),
    ("file part", body(messages=user_parts({"type": "file", "file": {"file_id": "file-1"}})), 400,
     "invalid_request_error", "messages[0].content[0]"),
    ("refusal part in a user message", body(messages=user_parts({"type": "refusal", "refusal": "no"})), 400,
     "invalid_request_error", "messages[0].content[0]"),
    ("image in a system message", body(messages=[{"role": "system", "content": [image(f"data:image/png;base64,{PNG}")]},
     *USER]), 400, "invalid_request_error", "messages[0].content[0]"),
    ("image in an assistant message", body(messages=[*USER, {"role": "assistant", "content": [image("https://x/a.png")]}]),
     400, "invalid_request_error", "messages[1].content[0]"),
    ("image_url a string", body(messages=user_parts({"type": "image_url", "image_url": "https://x/a.png"})), 400,
     "invalid_request_error", "messages[0].content[0].image_url"),
    ("image without url", body(messages=user_parts({"type": "image_url", "image_url": {"detail": "low"}})), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image url not a URL", body(messages=user_parts(image("x"))), 400, "invalid_request_error",
     "messages[0].content[0].image_url.url"),
    ("image url of another scheme", body(messages=user_parts(image("ftp://x/a.png"))), 400, "invalid_request_error",
     "messages[0].content[0].image_url.url"),
    ("image data url not base64", body(messages=user_parts(image("data:image/png,abc"))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image data url of svg", body(messages=user_parts({"type": "text", "text": "see"},
                                                       image(f"data:image/svg+xml;base64,{PNG}"))), 400,
     "invalid_request_error", "messages[0].content[1].image_url.url"),
    ("image data url of a pdf", body(messages=user_parts(image(f"data:application/pdf;base64,{PNG}"))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image base64 invalid", body(messages=user_parts(image("data:image/png;base64,iVBOR*w0K"))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image base64 bad padding", body(messages=user_parts(image("data:image/png;base64,iVBORw0KGgo"))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image base64 with a newline", body(messages=user_parts(image("data:image/png;base64,iVBO\nRw0KGgo="))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.url"),
    ("image base64 empty", body(messages=user_parts(image("data:image/png;base64,"))), 400, "invalid_request_error",
     "messages[0].content[0].image_url.url"),
    ("image detail unknown", body(messages=user_parts(image(f"data:image/png;base64,{PNG}", detail="ultra"))), 400,
     "invalid_request_error", "messages[0].content[0].image_url.detail"),
    # tool calls and tool results in the history
    ("tool_calls not a list", body(messages=called()[:1] + [{"role": "assistant", "tool_calls": {"id": "x"}}]), 400,
     "invalid_request_error", "messages[1].tool_calls"),
    ("tool call not an object", body(messages=called("call_1")), 400, "invalid_request_error",
     "messages[1].tool_calls[0]"),
    ("tool call of another type", body(messages=called({**call(), "type": "custom"})), 400, "invalid_request_error",
     "messages[1].tool_calls[0].type"),
    ("tool call without id", body(messages=called({"type": "function", "function": {"name": "f", "arguments": ""}})),
     400, "invalid_request_error", "messages[1].tool_calls[0].id"),
    ("tool call id not a string", body(messages=called({**call(), "id": 1})), 400, "invalid_request_error",
     "messages[1].tool_calls[0].id"),
    ("tool call without function", body(messages=called({"id": "call_1", "type": "function"})), 400,
     "invalid_request_error", "messages[1].tool_calls[0].function"),
    ("tool call without name", body(messages=called(call(name=None))), 400, "invalid_request_error",
     "messages[1].tool_calls[0].function.name"),
    ("tool call arguments an object", body(messages=called(call(), call(arguments={"a": 1}))), 400,
     "invalid_request_error", "messages[1].tool_calls[1].function.arguments"),
    ("tool call without arguments", body(messages=called(call(arguments=None))), 400, "invalid_request_error",
     "messages[1].tool_calls[0].function.arguments"),
    ("tool_calls on a user message", body(messages=[{"role": "user", "content": "x", "tool_calls": [call()]}]), 400,
     "invalid_request_error", "messages[0].tool_calls"),
    ("legacy function_call message", body(messages=[*USER, {"role": "assistant", "content": None,
                                                            "function_call": {"name": "f", "arguments": "{}"}}]),
     400, "invalid_request_error", "messages[1].function_call"),
    ("tool message without tool_call_id", body(messages=[*called(call()), {"role": "tool", "content": "42"}]), 400,
     "invalid_request_error", "messages[2].tool_call_id"),
    ("tool_call_id not a string", body(messages=[*called(call()), {"role": "tool", "content": "42",
                                                                   "tool_call_id": 1}]), 400,
     "invalid_request_error", "messages[2].tool_call_id"),
    ("tool message without content", body(messages=[*called(call()), {"role": "tool", "tool_call_id": "call_1"}]),
     400, "invalid_request_error", "messages[2].content"),
    ("image in a tool message", body(messages=[*called(call()), {"role": "tool", "tool_call_id": "call_1",
                                                                 "content": [image("https://x/a.png")]}]), 400,
     "invalid_request_error", "messages[2].content[0]"),
    # tools
    ("tools not a list", body(tools={"type": "function"}), 400, "invalid_request_error", "tools"),
    ("tool not an object", body(tools=["f"]), 400, "invalid_request_error", "tools[0]"),
    ("custom tool", body(tools=[tool(), {"type": "custom", "custom": {"name": "g"}}]), 400, "invalid_request_error",
     "tools[1].type"),
    ("tool without type", body(tools=[{"function": {"name": "f"}}]), 400, "invalid_request_error", "tools[0].type"),
    ("tool without function", body(tools=[{"type": "function"}]), 400, "invalid_request_error", "tools[0].function"),
    ("tool without name", body(tools=[tool(name=None)]), 400, "invalid_request_error", "tools[0].function.name"),
    ("tool name not a string", body(tools=[tool(name=7)]), 400, "invalid_request_error", "tools[0].function.name"),
    ("tool description not a string", body(tools=[tool(description=["x"])]), 400, "invalid_request_error",
     "tools[0].function.description"),
    ("tool parameters a string", body(tools=[tool(parameters='{"type": "object"}')]), 400, "invalid_request_error",
     "tools[0].function.parameters"),
    ("tool strict not a bool", body(tools=[tool(strict="yes")]), 400, "invalid_request_error",
     "tools[0].function.strict"),
    ("tool_choice unknown", body(tools=[tool()], tool_choice="any"), 400, "invalid_request_error", "tool_choice"),
    ("tool_choice without name", body(tools=[tool()], tool_choice={"type": "function", "function": {}}), 400,
     "invalid_request_error", "tool_choice"),
    ("tool_choice allowed_tools", body(tools=[tool()], tool_choice={"type": "allowed_tools", "allowed_tools": {}}),
     400, "invalid_request_error", "tool_choice"),
    ("tool_choice a number", body(tools=[tool()], tool_choice=1), 400, "invalid_request_error", "tool_choice"),
    ("parallel_tool_calls not a bool", body(tools=[tool()], parallel_tool_calls="no"), 400, "invalid_request_error",
     "parallel_tool_calls"),
    ("legacy functions", body(functions=[{"name": "f", "parameters": {}}]), 400, "invalid_request_error",
     "functions"),
    ("legacy function_call", body(function_call="auto"), 400, "invalid_request_error", "function_call"),
    # structured output
    ("response_format a string", body(response_format="json"), 400, "invalid_request_error", "response_format"),
    ("response_format of unknown type", body(response_format={"type": "xml"}), 400, "invalid_request_error",
     "response_format.type"),
    ("json_schema missing", body(response_format={"type": "json_schema"}), 400, "invalid_request_error",
     "response_format.json_schema"),
    ("json_schema without name", body(response_format=schema(name=None)), 400, "invalid_request_error",
     "response_format.json_schema.name"),
    ("json_schema name not a string", body(response_format=schema(name=1)), 400, "invalid_request_error",
     "response_format.json_schema.name"),
    ("json_schema schema a string", body(response_format=schema(schema="{}")), 400, "invalid_request_error",
     "response_format.json_schema.schema"),
    ("json_schema strict not a bool", body(response_format=schema(strict=1)), 400, "invalid_request_error",
     "response_format.json_schema.strict"),
    ("json_schema description not a string", body(response_format=schema(description=2)), 400,
     "invalid_request_error", "response_format.json_schema.description"),
    # parameters
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
    ("max_completion_tokens a string", body(max_completion_tokens="10"), 400, "invalid_request_error",
     "max_completion_tokens"),
    ("five stops", body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request_error", "stop"),
    ("stop not strings", body(stop=[1]), 400, "invalid_request_error", "stop"),
    ("stop an object", body(stop={"a": 1}), 400, "invalid_request_error", "stop"),
    ("empty stop", body(stop=""), 400, "invalid_request_error", "stop"),
    ("stream not a bool", body(stream="yes"), 400, "invalid_request_error", "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), 400, "invalid_request_error",
     "stream_options"),
    ("include_usage not a bool", body(stream=True, stream_options={"include_usage": "y"}), 400,
     "invalid_request_error", "stream_options.include_usage"),
    ("n a string", body(n="2"), 400, "invalid_request_error", "n"),
    ("n a float", body(n=1.5), 400, "invalid_request_error", "n"),
    ("seed a float", body(seed=1.5), 400, "invalid_request_error", "seed"),
    ("seed a bool", body(seed=True), 400, "invalid_request_error", "seed"),
    ("seed beyond int64", body(seed=2**63), 400, "invalid_request_error", "seed"),
    ("presence_penalty a string", body(presence_penalty="0.5"), 400, "invalid_request_error", "presence_penalty"),
    ("frequency_penalty a bool", body(frequency_penalty=False), 400, "invalid_request_error", "frequency_penalty"),
    ("user a number", body(user=42), 400, "invalid_request_error", "user"),
    ("logprobs a string", body(logprobs="true"), 400, "invalid_request_error", "logprobs"),
    ("top_logprobs a float", body(top_logprobs=2.5), 400, "invalid_request_error", "top_logprobs"),
    ("reasoning_effort unknown", body(reasoning_effort="extreme"), 400, "invalid_request_error", "reasoning_effort"),
    ("reasoning_effort a number", body(reasoning_effort=3), 400, "invalid_request_error", "reasoning_effort"),
    # fields that would change the answer and are not implemented
    ("logit_bias", body(logit_bias={"50256": -100}), 400, "invalid_request_error", "logit_bias"),
    ("predicted output", body(prediction={"type": "content", "content": "x"}), 400, "invalid_request_error",
     "prediction"),
    ("audio modality", body(modalities=["text", "audio"]), 400, "invalid_request_error", "modalities"),
    ("audio output", body(audio={"voice": "alloy", "format": "wav"}), 400, "invalid_request_error", "audio"),
    ("web search", body(web_search_options={}), 400, "invalid_request_error", "web_search_options"),
    ("verbosity low", body(verbosity="low"), 400, "invalid_request_error", "verbosity"),
    # refused by the core: no local model honours several choices, no provider returns logprobs
    ("n above 1", body(n=2), 400, "invalid_request_error", "n"),
    ("logprobs", body(logprobs=True), 400, "invalid_request_error", "logprobs"),
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
    error: dict[str, Any] = response.json()["error"]
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


async def test_fields_that_cannot_change_the_answer_are_accepted(client: httpx.AsyncClient) -> None:
    """Defaults of the fields ModelMax refuses, fields that never change the answer, and unknown fields."""
    response = await client.post(
        "/chat/completions",
        json=body(user="u-1", logit_bias={}, n=1, response_format={"type": "text"}, modalities=["text"],
                  verbosity="medium", parallel_tool_calls=True, functions=None, function_call=None, prediction=None,
                  store=False, metadata={"k": "v"}, service_tier="auto", prompt_cache_key="p", some_future_field=1),
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
