"""The fold of a completion's events into CreateCompletion's answer: reasoning as joined text and as blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from services.completion.fold import Fold
from tests.conftest import running_core, write_catalog
from tests.fakes.bedrock import BedrockUpstream, serve_bedrock, use_fake_credentials
from tests.grpc_client import core_channel

STOP = pb.FinishReason.FINISH_REASON_STOP


def thought(choice: int = 0, **fields: object) -> svc.StreamCompletionResponse:
    return svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(choice_index=choice, **fields))  # type: ignore[arg-type]


def finish(choices: int = 1) -> svc.StreamCompletionResponse:
    endings = [svc.ChoiceFinish(index=index, finish_reason=STOP) for index in range(choices)]
    return svc.StreamCompletionResponse(finish=svc.CompletionFinish(choices=endings))


def folded(*events: svc.StreamCompletionResponse) -> svc.CreateCompletionResponse:
    fold = Fold()
    for event in events:
        fold.add(event)
    return fold.result("m")


def test_text_deltas_make_one_block_that_a_signature_closes() -> None:
    [choice] = folded(
        thought(text="First "),
        thought(text="thought."),
        thought(signature="sig-1"),
        thought(redacted=b"\x00\x01"),  # a whole block of its own
        thought(text="Second."),
        thought(signature="sig-2"),
        svc.StreamCompletionResponse(delta=svc.ContentDelta(text="Answer.")),
        finish(),
    ).choices
    assert list(choice.reasoning_blocks) == [
        pb.Reasoning(text="First thought.", signature="sig-1"),
        pb.Reasoning(redacted=b"\x00\x01"),
        pb.Reasoning(text="Second.", signature="sig-2"),
    ]
    assert (choice.reasoning, choice.content) == ("First thought.Second.", "Answer.")


def test_reasoning_without_signatures_is_one_unsigned_block() -> None:
    [choice] = folded(thought(text="Just "), thought(text="text."), finish()).choices
    assert list(choice.reasoning_blocks) == [pb.Reasoning(text="Just text.")]
    assert choice.reasoning == "Just text."
    [plain] = folded(svc.StreamCompletionResponse(delta=svc.ContentDelta(text="hi")), finish()).choices
    assert (plain.reasoning, list(plain.reasoning_blocks)) == ("", [])


def test_text_after_the_last_signature_is_a_block_of_its_own_and_a_lone_signature_one_too() -> None:
    [choice] = folded(
        thought(signature="s0"), thought(text="a"), thought(signature="s1"), thought(text="b"), finish()
    ).choices
    assert list(choice.reasoning_blocks) == [
        pb.Reasoning(signature="s0"),
        pb.Reasoning(text="a", signature="s1"),
        pb.Reasoning(text="b"),
    ]
    assert choice.reasoning == "ab"


def test_each_choice_folds_its_own_blocks_batched_or_not() -> None:
    batch = svc.StreamCompletionResponse(
        batch=svc.EventBatch(events=[thought(1, text="one"), thought(0, text="zero"), thought(1, signature="s")])
    )
    choices = folded(batch, thought(1, redacted=b"r"), finish(2)).choices
    assert list(choices[0].reasoning_blocks) == [pb.Reasoning(text="zero")]
    assert list(choices[1].reasoning_blocks) == [pb.Reasoning(text="one", signature="s"), pb.Reasoning(redacted=b"r")]
    assert (choices[0].reasoning, choices[1].reasoning) == ("zero", "one")


@pytest.fixture
async def bedrock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[BedrockUpstream]:
    use_fake_credentials(monkeypatch, tmp_path)
    async with serve_bedrock() as fake:
        yield fake


async def test_create_completion_returns_bedrocks_reasoning_blocks_to_give_back(
    tmp_path: Path, bedrock: BedrockUpstream
) -> None:
    bedrock.reasoning, bedrock.reasoning_signature = ["The user ", "greets me."], "c2lnbmF0dXJl"
    bedrock.reasoning_redacted = b"\x00opaque"
    options = {"region": "us-east-1", "endpoint_url": bedrock.url, "read_timeout_seconds": 5}
    entry: dict[str, object] = {"name": "deepseek", "provider": "bedrock", "model": "deepseek.v3.2", "options": options}
    params = pb.CompletionParams(model="deepseek", messages=[pb.Message(role=pb.Role.ROLE_USER, content="Hi")])
    async with running_core(write_catalog(tmp_path, [entry])) as core:
        async with core_channel(f"127.0.0.1:{core.port}") as channel:
            stub = svc_grpc.CompletionServiceStub(channel)
            whole = await stub.CreateCompletion(svc.CreateCompletionRequest(params=params), timeout=30)
            events = [e async for e in stub.StreamCompletion(svc.StreamCompletionRequest(params=params), timeout=30)]
    [choice] = whole.choices
    assert list(choice.reasoning_blocks) == [
        pb.Reasoning(text="The user greets me.", signature="c2lnbmF0dXJl"),
        pb.Reasoning(redacted=b"\x00opaque"),
    ]
    assert (choice.reasoning, choice.content) == ("The user greets me.", "Hello, world!")
    # The stream carries the same blocks as deltas: text pieces, the signature that ends them, the redacted block.
    assert [e.reasoning for e in events if e.HasField("reasoning")] == [
        svc.ReasoningDelta(text="The user "),
        svc.ReasoningDelta(text="greets me."),
        svc.ReasoningDelta(signature="c2lnbmF0dXJl"),
        svc.ReasoningDelta(redacted=b"\x00opaque"),
    ]
