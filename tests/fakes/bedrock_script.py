"""A fake Bedrock Runtime whose every answer is decided from the request it answers: a model played by a function.

tests/fakes/bedrock.py plays one fixed script, set by the test between requests. A client that runs a whole agent
loop on its own (a Node program, Claude Code) gives the test no such moment, so here a `policy` looks at each
Converse / ConverseStream request (its messages, its tool results) and returns the `Turn` to answer with: text,
tool calls or both. Requests are recorded as they arrived, next to the turn each one got. The wire format (the
event-stream frames, `ToolUse` and its streamed input pieces) is bedrock.py's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.bedrock import EVENT_STREAM, ToolUse, answer_events, frame
from tests.fakes.serve import serve

REQUEST_ID = "22222222-3333-4444-5555-666666666666"


@dataclass(frozen=True, slots=True)
class Turn:
    """One assistant message: a text block (one streamed delta per piece), then a block per tool call."""

    text: list[str] = field(default_factory=list)
    tool_uses: list[ToolUse] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"inputTokens": 7, "outputTokens": 4, "totalTokens": 11})
    stop_reason: str | None = None  # None: "tool_use" when there are tool calls, else "end_turn"

    @property
    def stop(self) -> str:
        return self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")

    def converse(self) -> dict[str, Any]:
        """The Converse response body."""
        content: list[dict[str, Any]] = [{"text": "".join(self.text)}] if self.text else []
        content += [{"toolUse": {"toolUseId": t.tool_use_id, "name": t.name, "input": t.input}} for t in self.tool_uses]
        return {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": self.stop,
            "usage": self.usage,
            "metrics": {"latencyMs": 42},
        }

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The ConverseStream events, in the order the live service sends them."""
        events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
        events += answer_events(self.text, self.tool_uses)
        events.append(("messageStop", {"stopReason": self.stop}))
        events.append(("metadata", {"usage": self.usage, "metrics": {"latencyMs": 42}}))
        return events


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as the fake saw it, and the turn it answered with."""

    model_id: str
    operation: str  # "converse" or "converse-stream"
    body: dict[str, Any]
    headers: dict[str, str]
    turn: Turn

    @property
    def tool_names(self) -> list[str]:
        """The names of the tools the request offered the model, in order."""
        tools = self.body.get("toolConfig", {}).get("tools", [])
        return [tool["toolSpec"]["name"] for tool in tools if "toolSpec" in tool]

    @property
    def last_user_blocks(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages", [])
        return messages[-1]["content"] if messages and messages[-1]["role"] == "user" else []

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """The toolResult blocks of the last user message (what the client sends back after running tools)."""
        return [block["toolResult"] for block in self.last_user_blocks if "toolResult" in block]


Policy = Callable[[Exchange], Turn]


def result_text(tool_result: dict[str, Any]) -> str:
    """A toolResult's content as one string: its text blocks joined, JSON blocks as compact JSON."""
    parts = []
    for block in tool_result.get("content", []):
        if "text" in block:
            parts.append(block["text"])
        elif "json" in block:
            parts.append(json.dumps(block["json"], separators=(",", ":")))
    return "".join(parts)


def user_text(exchange: Exchange) -> str:
    """All text of the request's user messages, joined by newlines."""
    return "\n".join(
        block["text"]
        for message in exchange.body.get("messages", [])
        if message["role"] == "user"
        for block in message["content"]
        if "text" in block
    )


@dataclass
class ScriptedBedrock:
    """The fake: `policy` answers each request; `exchanges` records them in arrival order."""

    policy: Policy
    url: str = ""  # "http://127.0.0.1:PORT", set once serving
    exchanges: list[Exchange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a policy that raised: its error (the request got a 400)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/model/{model_id:path}/converse", self._answer, methods=["POST"]),
                Route("/model/{model_id:path}/converse-stream", self._answer, methods=["POST"]),
            ]
        )

    async def _answer(self, request: Request) -> Response:
        operation = request.url.path.rsplit("/", 1)[-1]
        body = await request.json()
        seen = Exchange(request.path_params["model_id"], operation, body, dict(request.headers), Turn())
        try:
            turn = self.policy(seen)
        except Exception as exc:  # a policy bug must show in the test, not as a hung client
            self.errors.append(f"{type(exc).__name__}: {exc}")
            headers = {"x-amzn-ErrorType": "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"}
            return JSONResponse({"message": f"fake policy failed: {exc}"}, status_code=400, headers=headers)
        self.exchanges.append(Exchange(seen.model_id, operation, body, seen.headers, turn))
        headers = {"x-amzn-RequestId": REQUEST_ID}
        if operation == "converse":
            return JSONResponse(turn.converse(), headers=headers)
        return StreamingResponse(_frames(turn), media_type=EVENT_STREAM, headers=headers)


async def _frames(turn: Turn) -> AsyncIterator[bytes]:
    for name, payload in turn.events():
        yield frame(name, payload)


@asynccontextmanager
async def serve_scripted_bedrock(policy: Policy) -> AsyncIterator[ScriptedBedrock]:
    """A fake Bedrock Runtime answering every request with `policy(exchange)`, until exit."""
    upstream = ScriptedBedrock(policy)
    async with serve(upstream.app()) as root:
        upstream.url = root
        yield upstream
