"""The Anthropic dialect's pure parts: a Messages request to CompletionParams, the core's field paths back to the
request's, rate-limit headers, and the SSE event sequence of a stream (checked with the SDK's own accumulator)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from bridge.anthropic.errors import AnthropicError, anthropic_limits, request_path
from bridge.anthropic.messages.request import parse_messages_request
from bridge.anthropic.messages.sse import BlockEncoder
from bridge.auth import api_key_or_bearer
from bridge.dialect import Refusal, Refused
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

R = pb.Role
DROP = object()  # a field left out of the request


def parse(**body: Any) -> Any:
    body.setdefault("model", "m")
    body.setdefault("max_tokens", 100)
    return parse_messages_request(json.dumps(body).encode())


def refusal(**body: Any) -> str:
    with pytest.raises(AnthropicError) as error:
        parse(**body)
    assert error.value.status == 400 and error.value.type == "invalid_request_error"
    return error.value.message


def test_a_user_turn_with_tool_results_becomes_tool_messages_then_the_text() -> None:
    parsed = parse(
        system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "AAEC"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "down", "is_error": True},
                {"type": "text", "text": "And?"},
            ]},
        ],
    )  # fmt: skip
    messages = parsed.params.messages
    assert [m.role for m in messages] == [R.ROLE_SYSTEM, R.ROLE_USER, R.ROLE_ASSISTANT, R.ROLE_TOOL, R.ROLE_TOOL,
                                          R.ROLE_USER]  # fmt: skip
    assert [p.text for p in messages[0].parts] == ["A", "B"]
    assistant = messages[2]
    assert assistant.content == "Checking."
    assert [(r.text, r.signature, r.redacted) for r in assistant.reasoning] == [("hm", "sig", b""), ("", "", b"\0\1\2")]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [("t1", "w", {"city": "Paris"})]
    assert [(m.tool_call_id, m.content, m.is_error) for m in messages[3:5]] == [
        ("t1", "18C", False),
        ("t2", "down", True),
    ]
    assert messages[5].content == "And?"
    # the core's paths name the request's fields
    assert request_path("messages[4].content", parsed.field_names) == "messages.2.content.1.content"
    assert request_path("messages[2].tool_calls[0].name", parsed.field_names) == "messages.1.content.3.name"
    assert request_path("messages[0].parts[1]", parsed.field_names) == "system.1"


def test_parameters_map_to_the_proto() -> None:
    parsed = parse(
        max_tokens=5000, temperature=0.2, top_p=0.5, top_k=40, stop_sequences=["X", "Y"], stream=True,
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}},
               {"name": "later", "input_schema": {"type": "object"}, "defer_loading": True}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048}, metadata={"user_id": "u1"},
        output_config={"effort": "high"},
    )  # fmt: skip
    params = parsed.params
    assert parsed.stream and parsed.show_thinking
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (5000, 0.2, 0.5, 40)
    assert list(params.stop_sequences) == ["X", "Y"]
    assert [(t.name, t.description, t.parameters) for t in params.tools] == [("f", "d", '{"type":"object"}')]
    assert params.tool_choice.mode == pb.ToolChoiceMode.TOOL_CHOICE_MODE_REQUIRED
    assert params.HasField("parallel_tool_calls") and not params.parallel_tool_calls
    assert params.reasoning_budget_tokens == 2048 and params.user == "u1"
    assert not params.HasField("response_format")  # effort is advisory: nothing is asked of the provider
    assert request_path("reasoning_budget_tokens", parsed.field_names) == "thinking.budget_tokens"


def test_a_tool_reference_loads_a_deferred_tool() -> None:
    parsed = parse(
        tools=[{"name": "later", "input_schema": {"type": "object"}, "defer_loading": True}],
        messages=[
            {"role": "user", "content": "find"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "s", "name": "ToolSearch", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "s",
                                          "content": [{"type": "tool_reference", "tool_name": "later"}]}]},
        ],
    )  # fmt: skip
    assert [t.name for t in parsed.params.tools] == ["later"]


def test_thinking_disabled_and_omitted() -> None:
    assert parse(messages=[{"role": "user", "content": "x"}], thinking={"type": "disabled"}).params.reasoning_effort \
        == pb.ReasoningEffort.REASONING_EFFORT_NONE  # fmt: skip
    omitted = parse(messages=[{"role": "user", "content": "x"}], thinking={"type": "adaptive", "display": "omitted"})
    assert not omitted.show_thinking and not omitted.params.HasField("reasoning_budget_tokens")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": DROP, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Input should be a valid"),
        ({"messages": "hi"}, "messages: "),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content: "),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
            "image/bmp", "data": "AA=="}}]}]}, "messages.0.content.0.source.media_type: "),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type":
            "image/png", "data": "!!"}}]}]}, "messages.0.content.0.source.data: "),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": []}]}]},
         "messages.0.content.0.input: "),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "a"}]}]},
         "messages.0.content.0.type: 'tool_result' blocks are not supported by ModelMax in assistant messages"),
        ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 100}},
         "thinking.budget_tokens: Input should be between 1024"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}}, "tool_choice: "),
        ({"messages": [{"role": "user", "content": "x"}], "mcp_servers": [{"url": "http://127.0.0.1:1"}]},
         "mcp_servers: "),
        ({"messages": [{"role": "user", "content": "x"}],
          "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "context_management.edits.0: "),
    ],
    ids=["no max_tokens", "max_tokens type", "messages type", "content type", "image type", "image data",
         "tool input", "tool_result from assistant", "small budget", "tool_choice", "mcp", "context edit"],
)  # fmt: skip
def test_malformed_requests_are_400s_naming_the_field(body: dict[str, Any], message: str) -> None:
    full = {"model": "m", "max_tokens": 100, **body}
    raw = json.dumps({key: value for key, value in full.items() if value is not DROP}).encode()
    with pytest.raises(AnthropicError) as error:
        parse_messages_request(raw)
    assert error.value.status == 400 and error.value.type == "invalid_request_error"
    assert error.value.message.startswith(message), error.value.message


def test_a_lone_surrogate_is_a_400() -> None:
    raw = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"\\ud800"}]}'
    with pytest.raises(AnthropicError) as error:
        parse_messages_request(raw)
    assert error.value.status == 400


def test_not_json_and_not_an_object() -> None:
    for body in (b"{", b"[]", b"NaN"):
        with pytest.raises(AnthropicError) as error:
            parse_messages_request(body)
        assert error.value.status == 400


def test_rate_limit_values_become_anthropic_headers() -> None:
    before = datetime.now(UTC).timestamp()
    headers = anthropic_limits({"x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "19",
                                "x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "250ms"})  # fmt: skip
    assert headers["anthropic-ratelimit-requests-limit"] == "20"
    assert headers["anthropic-ratelimit-requests-remaining"] == "19"
    reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert before + 359 <= reset <= before + 362
    assert "anthropic-ratelimit-tokens-reset" in headers


_EVENT = TypeAdapter(RawMessageStreamEvent)


def _accumulate(stream: bytes) -> Any:
    """The SDK's own MessageStream accumulation over our SSE bytes."""
    snapshot = None
    buffers: dict[int, bytes] = {}
    for block in stream.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        if payload["type"] == "ping":
            continue
        snapshot = accumulate_event(event=_EVENT.validate_python(payload), current_snapshot=snapshot, json_bufs=buffers)
    return snapshot


def test_the_stream_encoding_accumulates_to_the_message() -> None:
    encoder = BlockEncoder("msg_1", svc.CompletionStart(model="m"), show_thinking=True)
    E = svc.StreamCompletionResponse
    events = [
        E(reasoning=svc.ReasoningDelta(text="Let me ")), E(reasoning=svc.ReasoningDelta(text="think.")),
        E(reasoning=svc.ReasoningDelta(signature="sig")),
        E(delta=svc.ContentDelta(text="Hi ")), E(delta=svc.ContentDelta(text="there.")),
        E(tool_call=svc.ToolCallDelta(index=0, id="t1", name="f", arguments='{"a":')),
        E(tool_call=svc.ToolCallDelta(index=0, arguments="1}")),
        E(tool_call=svc.ToolCallDelta(index=1, id="t2", name="g", arguments="{}")),
    ]  # fmt: skip
    stream = encoder.message_start() + b"".join(encoder.encode(e, e.WhichOneof("event")) for e in events)
    usage = pb.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cached_tokens=4)
    finish = svc.CompletionFinish(
        usage=usage, choices=[svc.ChoiceFinish(finish_reason=pb.FinishReason.FINISH_REASON_TOOL_CALLS)]
    )
    stream += encoder.finish(finish)
    message = _accumulate(stream)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert (message.content[0].thinking, message.content[0].signature) == ("Let me think.", "sig")
    assert message.content[1].text == "Hi there."
    assert [(b.id, b.name, b.input) for b in message.content[2:]] == [("t1", "f", {"a": 1}), ("t2", "g", {})]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (6, 4, 5)


def test_a_known_stop_sequence_and_a_finish_without_a_reason() -> None:
    encoder = BlockEncoder("msg_1", svc.CompletionStart(model="m"), show_thinking=True)
    stop = svc.ChoiceFinish(finish_reason=pb.FinishReason.FINISH_REASON_STOP, stop_sequence="END")
    message = _accumulate(
        encoder.message_start() + encoder.text("a") + encoder.finish(svc.CompletionFinish(choices=[stop]))
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    with pytest.raises(AnthropicError):
        encoder.finish(svc.CompletionFinish(choices=[svc.ChoiceFinish()]))


def test_the_credential_is_an_api_key_or_a_bearer_and_never_two_different_ones() -> None:
    key, other = b"mm-test-key-0123456789abcdef", b"mm-test-key-fedcba9876543210"
    by_api_key = api_key_or_bearer([(b"x-api-key", key)])
    assert by_api_key == api_key_or_bearer([(b"authorization", b"Bearer " + key)])
    assert by_api_key == api_key_or_bearer([(b"x-api-key", key), (b"authorization", b"Bearer " + key)])
    for headers in ([(b"x-api-key", key), (b"authorization", b"Bearer " + other)], [(b"x-api-key", key)] * 2):
        with pytest.raises(Refused) as refused:
            api_key_or_bearer(headers)
        assert refused.value.refusal == Refusal.DUPLICATE_HEADER
    with pytest.raises(Refused) as missing:
        api_key_or_bearer([])
    assert missing.value.refusal == Refusal.MISSING_KEY


def test_count_tokens_takes_no_max_tokens() -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
    assert not parse_messages_request(raw, count=True).params.HasField("max_tokens")
    with pytest.raises(AnthropicError):
        parse_messages_request(raw)
