"""The bridge relays tool calls and several choices as OpenAI does, read by the real `openai` SDK.

A scripted core (a real grpc.aio server speaking CompletionService) replays fixed events, so these tests pin the
bridge's own side of the contract: what the core must receive, and what the SDK makes of what the core sends.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolUnionParam,
)

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from tests.conftest import API_KEY, running_bridge

START = svc.StreamCompletionResponse(start=svc.CompletionStart(model="m", created=1700000000))
TOOLS: list[ChatCompletionToolUnionParam] = [
    {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}},
]  # fmt: skip
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather and time in Paris?"}]


def tool_call(index: int, arguments: str, call_id: str = "", name: str = "", choice: int = 0) -> Any:
    delta = svc.ToolCallDelta(choice_index=choice, index=index, id=call_id, name=name, arguments=arguments)
    return svc.StreamCompletionResponse(tool_call=delta)


def content(text: str, choice: int = 0) -> Any:
    return svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text, choice_index=choice))


def finish(reason: pb.FinishReason.ValueType, *more: pb.FinishReason.ValueType, usage: pb.Usage | None = None) -> Any:
    choices = [svc.ChoiceFinish(index=index, finish_reason=r) for index, r in enumerate((reason, *more))]
    return svc.StreamCompletionResponse(finish=svc.CompletionFinish(choices=choices, usage=usage))


Context = grpc.aio.ServicerContext[Any, Any]


class ScriptedCore(svc_grpc.CompletionServiceServicer):
    """Answers every call with the scripted events (or response), and keeps the params it was sent."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.error: str | None = None  # fail with INTERNAL after the events
        self.response = svc.CreateCompletionResponse()
        self.received: list[pb.CompletionParams] = []
        self.accepted_batches: list[bool] = []  # accept_batches of every StreamCompletion request

    async def StreamCompletion(self, request: Any, context: Context) -> AsyncIterator[Any]:  # noqa: N802
        self.received.append(request.params)
        self.accepted_batches.append(request.accept_batches)
        for event in self.events:
            yield event
        if self.error:
            await context.abort(grpc.StatusCode.INTERNAL, self.error)

    async def CreateCompletion(self, request: Any, context: Context) -> Any:  # noqa: N802
        self.received.append(request.params)
        return self.response

    async def ListModels(self, request: Any, context: Context) -> Any:  # noqa: N802
        return svc.ListModelsResponse(models=[svc.ModelInfo(id="m", provider="openai", owned_by="x")])


@pytest.fixture
async def core() -> AsyncIterator[ScriptedCore]:
    scripted = ScriptedCore()
    server = grpc.aio.server()
    svc_grpc.add_CompletionServiceServicer_to_server(scripted, server)
    scripted.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    await server.start()
    try:
        yield scripted
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def base_url(core: ScriptedCore) -> AsyncIterator[str]:
    async with running_bridge(f"127.0.0.1:{core.port}") as url:  # type: ignore[attr-defined]
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


async def test_two_parallel_tool_calls_stream_as_openai_does(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    core.events = [
        START,
        tool_call(0, "", call_id="call_a", name="weather"),
        tool_call(0, '{"city": '),
        tool_call(1, '{"tz": "Europe/Paris"}', call_id="call_b", name="time"),
        tool_call(0, '"Paris"}'),
        finish(pb.FinishReason.FINISH_REASON_TOOL_CALLS),
    ]
    stream = await client.chat.completions.create(
        model="m", messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=True, stream=True
    )
    chunks = [chunk async for chunk in stream]
    deltas = [chunk.choices[0].delta.model_dump(exclude_none=True) for chunk in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                         "function": {"name": "weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                         "function": {"name": "time", "arguments": '{"tz": "Europe/Paris"}'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {},
    ]  # fmt: skip
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * 5 + ["tool_calls"]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("call_a", "weather", '{"city": "Paris"}'),
        ("call_b", "time", '{"tz": "Europe/Paris"}'),
    ]
    (params,) = core.received
    assert [tool.name for tool in params.tools] == ["weather", "time"]
    assert params.tools[0].parameters == '{"type":"object","properties":{"city":{"type":"string"}}}'
    assert params.tool_choice == pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED)
    assert params.HasField("parallel_tool_calls") and params.parallel_tool_calls


async def test_an_agent_loop_sends_the_sdks_own_message_back(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    """Call, tool results, final answer: the assistant message the SDK parsed goes back as the SDK serialises it."""
    core.response = svc.CreateCompletionResponse(
        model="m", created=1, choices=[svc.Choice(reasoning="Two tools.",
        finish_reason=pb.FinishReason.FINISH_REASON_TOOL_CALLS,
        tool_calls=[pb.ToolCall(id="call_a", name="weather", arguments='{"city":"Paris"}'),
                    pb.ToolCall(id="call_b", name="time", arguments="{}")])],
    )  # fmt: skip
    first = await client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS)
    history: list[Any] = [
        *QUESTION,
        first.choices[0].message,  # a pydantic model, with refusal/audio/function_call nulls and reasoning_content
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "12:00"}]},
    ]
    core.response = svc.CreateCompletionResponse(
        model="m", created=1,
        choices=[svc.Choice(content="18C and noon.", finish_reason=pb.FinishReason.FINISH_REASON_STOP)],
    )  # fmt: skip
    answer = await client.chat.completions.create(model="m", messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == "18C and noon."
    assert answer.choices[0].message.tool_calls is None
    assert list(core.received[1].messages) == [
        pb.Message(role=pb.Role.ROLE_USER, content="Weather and time in Paris?"),
        pb.Message(role=pb.Role.ROLE_ASSISTANT, tool_calls=[
            pb.ToolCall(id="call_a", name="weather", arguments='{"city":"Paris"}'),
            pb.ToolCall(id="call_b", name="time", arguments="{}")]),
        pb.Message(role=pb.Role.ROLE_TOOL, content="18C", tool_call_id="call_a"),
        pb.Message(role=pb.Role.ROLE_TOOL, content="12:00", tool_call_id="call_b"),
    ]  # fmt: skip


async def test_tool_calls_without_streaming(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    core.response = svc.CreateCompletionResponse(
        model="m", created=1, choices=[svc.Choice(finish_reason=pb.FinishReason.FINISH_REASON_TOOL_CALLS,
        tool_calls=[pb.ToolCall(id="call_a", name="weather", arguments='{"city":"Paris"}'),
                    pb.ToolCall(id="call_b", name="time", arguments="{}")])],
        usage=pb.Usage(prompt_tokens=20, completion_tokens=9, total_tokens=29),
    )  # fmt: skip
    answer = await client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = [
        call for call in choice.message.tool_calls or [] if isinstance(call, ChatCompletionMessageFunctionToolCall)
    ]
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "function", "weather", '{"city":"Paris"}'),
        ("call_b", "function", "time", "{}"),
    ]


async def test_several_choices_stream_with_their_indexes(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    core.events = [
        START,
        content("Hel", choice=0),
        content("Bon", choice=1),
        content("lo", choice=0),
        tool_call(0, "{}", call_id="call_c", name="time", choice=1),
        finish(pb.FinishReason.FINISH_REASON_STOP, pb.FinishReason.FINISH_REASON_TOOL_CALLS,
               usage=pb.Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)),
    ]  # fmt: skip
    stream = await client.chat.completions.create(
        model="m", messages=QUESTION, n=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices] == [
        (0, None), (1, None), (0, None), (1, None), (0, None), (1, None), (0, "stop"), (1, "tool_calls"),
    ]  # fmt: skip
    assert chunks[0].choices[0].delta.role == chunks[1].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    first, second = state.get_final_completion().choices
    assert first.message.content == "Hello" and first.finish_reason == "stop"
    assert second.message.content == "Bon" and second.finish_reason == "tool_calls"
    assert [c.id for c in second.message.tool_calls or []] == ["call_c"]
    assert core.received[0].choice_count == 2


async def test_several_choices_without_streaming(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    core.response = svc.CreateCompletionResponse(
        model="m", created=1,
        choices=[svc.Choice(index=0, content="Hello", finish_reason=pb.FinishReason.FINISH_REASON_STOP),
                 svc.Choice(index=1, content="Bonjour", finish_reason=pb.FinishReason.FINISH_REASON_LENGTH)],
    )  # fmt: skip
    answer = await client.chat.completions.create(model="m", messages=QUESTION, n=2, seed=42)
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [
        (0, "Hello", "stop"),
        (1, "Bonjour", "length"),
    ]
    assert core.received[0].choice_count == 2 and core.received[0].seed == 42


async def test_an_error_after_a_tool_call_piece_is_an_error_event(
    core: ScriptedCore, client: openai.AsyncOpenAI
) -> None:
    """A stream cut mid-call ends with an error the SDK raises, never a finish_reason the core did not send."""
    core.events = [START, tool_call(0, '{"ci', call_id="call_a", name="weather")]
    core.error = "upstream went away"
    stream = await client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, stream=True)
    seen: list[Any] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2 and seen[1].choices[0].delta.tool_calls[0].id == "call_a"
    assert all(chunk.choices[0].finish_reason is None for chunk in seen)


def batch(*events: Any) -> Any:
    return svc.StreamCompletionResponse(batch=svc.EventBatch(events=events))


def reasoning(text: str, choice: int = 0) -> Any:
    return svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=text, choice_index=choice))


@pytest.mark.parametrize("error", [None, "upstream went away"])
async def test_a_batch_is_relayed_as_the_bytes_of_its_events(
    core: ScriptedCore, base_url: str, error: str | None
) -> None:
    """The SSE body is byte for byte what the same events one message each give, an error event after it included."""
    middle = [reasoning("Hmm."), content("Hel"), content("Bon", choice=1), tool_call(0, "{}", call_id="call_c",
              name="time", choice=1), content("lo")]  # fmt: skip
    usage = pb.Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
    ending = [] if error else [finish(pb.FinishReason.FINISH_REASON_STOP, pb.FinishReason.FINISH_REASON_TOOL_CALLS,
                                      usage=usage)]  # fmt: skip
    core.error = error
    body = {"model": "m", "messages": QUESTION, "n": 2, "stream": True, "stream_options": {"include_usage": True}}

    async def relayed(events: list[Any]) -> bytes:
        core.events = [START, *events, *ending]
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {API_KEY}"}) as http:
            response = await http.post(f"{base_url}/chat/completions", json=body)
        assert response.status_code == 200
        (completion_id,) = set(re.findall(rb'"id":"(chatcmpl-[^"]*)"', response.content))  # one id, every chunk
        return response.content.replace(completion_id, b"chatcmpl-X")  # the bridge mints a new one per request

    single = await relayed(middle)
    batched = await relayed([batch(*middle[:2]), batch(*middle[2:])])
    mixed = await relayed([middle[0], batch(*middle[1:4]), middle[4]])
    assert batched == single == mixed
    assert single.count(b"data: ") == 2 + 5 + (0 if error else 3) + (1 if error else 0) + 1  # roles, pieces, ...
    assert single.endswith(b"data: [DONE]\n\n") and (b'"error"' in single) == bool(error)
    assert core.accepted_batches == [True, True, True]  # the bridge takes batches


async def test_the_bridge_mints_one_openai_id_per_completion(core: ScriptedCore, client: openai.AsyncOpenAI) -> None:
    """`chatcmpl-<uuid4 hex>`, the same on every chunk of a stream, a new one for every completion."""
    core.response = svc.CreateCompletionResponse(
        model="m", created=1, choices=[svc.Choice(content="hi", finish_reason=pb.FinishReason.FINISH_REASON_STOP)]
    )
    core.events = [START, content("hi"), finish(pb.FinishReason.FINISH_REASON_STOP)]
    whole = [await client.chat.completions.create(model="m", messages=QUESTION) for _ in range(2)]
    streams = [await client.chat.completions.create(model="m", messages=QUESTION, stream=True) for _ in range(2)]
    streamed = [{chunk.id async for chunk in stream} for stream in streams]
    assert all(len(ids) == 1 for ids in streamed)
    ids = [completion.id for completion in whole] + [ids.pop() for ids in streamed]
    assert all(re.fullmatch(r"chatcmpl-[0-9a-f]{32}", completion_id) for completion_id in ids), ids
    assert len(set(ids)) == 4
