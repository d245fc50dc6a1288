"""The bridge's pure translations: request to proto, and chunk bytes and completions exactly in OpenAI's shape."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from bridge.openai.chat.request import parse_chat_request
from bridge.openai.chat.sse import ChunkEncoder
from bridge.openai.chat.translate import completion_json, to_params, usage_json
from bridge.openai.errors import OpenAIError
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

ID = "chatcmpl-1"
START = svc.CompletionStart(model="m", created=1700000000)
USER = [{"role": "user", "content": "hi"}]
PNG_BYTES = b"\x89PNG\r\n\x1a\n"
PNG = base64.b64encode(PNG_BYTES).decode()


def chunk(choice: int, delta: str, finish: str = "null", *, usage: bool) -> bytes:
    """The exact bytes of one chunk of START's stream."""
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m"'
    choices = f'"choices":[{{"index":{choice},"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]'
    usage_null = ',"usage":null' if usage else ""
    return f'data: {head},"system_fingerprint":null,{choices}{usage_null}}}\n\n'.encode()


def finished(*reasons: pb.FinishReason.ValueType) -> svc.CompletionFinish:
    """A finish event: one ChoiceFinish per reason, choices 0, 1, ... in order."""
    return svc.CompletionFinish(
        choices=[svc.ChoiceFinish(index=index, finish_reason=reason) for index, reason in enumerate(reasons)]
    )


def decode(frame: bytes) -> dict[str, Any]:
    text = frame.decode()
    assert text.startswith("data: ") and text.endswith("\n\n")
    chunk: dict[str, Any] = json.loads(text[6:])
    return chunk


def test_chunks_are_openai_json_and_escape_text() -> None:
    encoder = ChunkEncoder(ID, START, include_usage=True)
    tricky = 'quote " backslash \\ newline \n unicode é 🙂 </script>'
    chunks = [decode(f) for f in (encoder.role(), encoder.content(tricky), encoder.reasoning("think"),
                                  encoder.finish(finished(pb.FinishReason.FINISH_REASON_LENGTH)))]  # fmt: skip
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-1" and chunk["object"] == "chat.completion.chunk"
        assert chunk["created"] == 1700000000 and chunk["model"] == "m" and chunk["usage"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": tricky}
    assert chunks[2]["choices"][0]["delta"] == {"reasoning_content": "think"}
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    usage = decode(encoder.usage(pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)))
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chunks_without_include_usage_have_no_usage_key() -> None:
    assert "usage" not in decode(ChunkEncoder(ID, START, include_usage=False).content("x"))


def test_usage_details_only_when_reported() -> None:
    assert set(usage_json(pb.Usage(prompt_tokens=1))) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    detailed = usage_json(pb.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cached_tokens=0,
                                   reasoning_tokens=3))  # fmt: skip
    assert detailed["prompt_tokens_details"] == {"cached_tokens": 0}
    assert detailed["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_completion_carries_reasoning_only_when_present() -> None:
    plain = svc.CreateCompletionResponse(
        model="m", choices=[svc.Choice(content="hi", finish_reason=pb.FinishReason.FINISH_REASON_STOP)]
    )
    assert "reasoning_content" not in completion_json(plain, "c")["choices"][0]["message"]
    plain.choices[0].reasoning = "because"
    assert completion_json(plain, "c")["choices"][0]["message"]["reasoning_content"] == "because"


def params_of(**fields: object) -> pb.CompletionParams:
    return to_params(parse_chat_request(json.dumps({"model": "m", **fields}).encode()))


def test_every_parameter_reaches_the_proto() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                     {"type": "image_url", "image_url": {"url": f"data:image/PNG;base64,{PNG}"}},
                                     {"type": "text", "text": " and "},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg",
                                                                         "detail": "high"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "12:"},
                                                               {"type": "text", "text": "00"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "refusal", "refusal": "no"}]},
    ]  # fmt: skip
    params = params_of(
        messages=messages,
        tools=[{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object", "properties": {"city": {
                                                     "type": "string", "description": "é"}}}, "strict": True}},
               {"type": "function", "function": {"name": "time"}}],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "description": "An answer",
                                                                "schema": {"type": "object"}, "strict": False}},
        n=3, seed=-(2**63), presence_penalty=0.5, frequency_penalty=-1, user="u-1", logprobs=True, top_logprobs=2,
        reasoning_effort="xhigh", max_tokens=9, max_completion_tokens=7, temperature=0, top_p=1, stop="END",
    )  # fmt: skip
    expected = pb.CompletionParams(
        model="m",
        messages=[
            pb.Message(role=pb.Role.ROLE_SYSTEM, content="Be brief."),
            pb.Message(role=pb.Role.ROLE_USER, parts=[
                pb.ContentPart(text="Look: "),
                pb.ContentPart(image=pb.Image(data=PNG_BYTES, media_type="image/png")),
                pb.ContentPart(text=" and "),
                pb.ContentPart(image=pb.Image(url="https://example.com/a.jpg")),
            ]),
            pb.Message(role=pb.Role.ROLE_ASSISTANT, tool_calls=[
                pb.ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}'),
                pb.ToolCall(id="call_2", name="time", arguments=""),
            ]),
            pb.Message(role=pb.Role.ROLE_TOOL, content="18C", tool_call_id="call_1"),
            pb.Message(role=pb.Role.ROLE_TOOL, content="12:00", tool_call_id="call_2"),
            pb.Message(role=pb.Role.ROLE_ASSISTANT, content="It is no"),
        ],
        tools=[
            pb.Tool(name="weather", description="Weather in a city", strict=True,
                    parameters='{"type":"object","properties":{"city":{"type":"string","description":"é"}}}'),
            pb.Tool(name="time"),
        ],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoiceMode.TOOL_CHOICE_MODE_FUNCTION, name="weather"),
        parallel_tool_calls=False,
        response_format=pb.ResponseFormat(type=pb.ResponseFormatType.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="answer",
                                          description="An answer", schema='{"type":"object"}', strict=False),
        choice_count=3, seed=-(2**63), presence_penalty=0.5, frequency_penalty=-1.0, user="u-1", logprobs=True,
        top_logprobs=2, reasoning_effort=pb.ReasoningEffort.REASONING_EFFORT_XHIGH,
        max_tokens=7, temperature=0.0, top_p=1.0, stop_sequences=["END"],
    )  # fmt: skip
    assert params == expected


def test_a_plain_request_leaves_every_new_field_unset() -> None:
    params = params_of(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}])  # fmt: skip
    assert params == pb.CompletionParams(model="m", messages=[pb.Message(role=pb.Role.ROLE_USER, content="ab")])
    for name in ("tool_choice", "parallel_tool_calls", "response_format", "choice_count", "seed", "presence_penalty",
                 "frequency_penalty", "top_logprobs"):  # fmt: skip
        assert not params.HasField(name), name


@pytest.mark.parametrize(
    ("choice", "mode", "name"),
    [("none", "TOOL_CHOICE_MODE_NONE", ""), ("auto", "TOOL_CHOICE_MODE_AUTO", ""),
     ("required", "TOOL_CHOICE_MODE_REQUIRED", ""),
     ({"type": "function", "function": {"name": "f"}}, "TOOL_CHOICE_MODE_FUNCTION", "f")],
)  # fmt: skip
def test_tool_choice_modes(choice: object, mode: str, name: str) -> None:
    params = params_of(messages=USER, tools=[{"type": "function", "function": {"name": "f"}}], tool_choice=choice)
    assert params.HasField("tool_choice")
    assert params.tool_choice == pb.ToolChoice(mode=pb.ToolChoiceMode.Value(mode), name=name)


@pytest.mark.parametrize(
    ("response_format", "kind"),
    [({"type": "text"}, "RESPONSE_FORMAT_TYPE_TEXT"), ({"type": "json_object"}, "RESPONSE_FORMAT_TYPE_JSON_OBJECT")],
)
def test_response_format_types(response_format: object, kind: str) -> None:
    params = params_of(messages=USER, response_format=response_format)
    assert params.response_format == pb.ResponseFormat(type=pb.ResponseFormatType.Value(kind))


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh"])
def test_reasoning_efforts(effort: str) -> None:
    expected = pb.ReasoningEffort.Value(f"REASONING_EFFORT_{effort.upper()}")
    assert params_of(messages=USER, reasoning_effort=effort).reasoning_effort == expected


@pytest.mark.parametrize("media_type", ["image/png", "image/jpeg", "image/gif", "image/webp"])
def test_image_detail_is_checked_then_ignored(media_type: str) -> None:
    def with_detail(**detail: str) -> pb.CompletionParams:
        url = {"url": f"data:{media_type};base64,{PNG}", **detail}
        return params_of(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": url}]}])

    plain = with_detail()
    assert plain.messages[0].parts[0].image == pb.Image(data=PNG_BYTES, media_type=media_type)
    assert with_detail(detail="low") == with_detail(detail="high") == with_detail(detail="auto") == plain


def test_max_completion_tokens_is_preferred_over_max_tokens() -> None:
    assert params_of(messages=USER, max_tokens=9, max_completion_tokens=7).max_tokens == 7
    assert params_of(messages=USER, max_tokens=9, max_completion_tokens=None).max_tokens == 9


def test_a_lone_surrogate_is_a_400_not_a_crash() -> None:
    with pytest.raises(OpenAIError) as raised:
        to_params(parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'))
    assert raised.value.status == 400


def test_tool_call_chunks_are_exactly_openais() -> None:
    encoder = ChunkEncoder(ID, START, include_usage=False)

    def frame(choice: int, delta: str, finish: str = "null") -> bytes:
        return chunk(choice, delta, finish, usage=False)

    first = svc.ToolCallDelta(index=0, id="call_1", name="weather", arguments="")
    assert encoder.tool_call(first) == frame(0, '{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
                                                '"function":{"name":"weather","arguments":""}}]}')  # fmt: skip
    piece = svc.ToolCallDelta(index=0, arguments='{"city": "Paris é"}')
    assert encoder.tool_call(piece) == frame(0, '{"tool_calls":[{"index":0,"function":{"arguments":'
                                                '"{\\"city\\": \\"Paris é\\"}"}}]}')  # fmt: skip
    second = svc.ToolCallDelta(index=1, id="call_2", name="time", arguments="{}")
    assert encoder.tool_call(second) == frame(0, '{"tool_calls":[{"index":1,"id":"call_2","type":"function",'
                                                 '"function":{"name":"time","arguments":"{}"}}]}')  # fmt: skip
    assert encoder.finish(finished(pb.FinishReason.FINISH_REASON_TOOL_CALLS)) == frame(0, "{}", '"tool_calls"')


def test_several_choices_have_their_own_role_deltas_and_finish() -> None:
    encoder = ChunkEncoder(ID, START, include_usage=True, choices=3)

    def frame(choice: int, delta: str, finish: str = "null") -> bytes:
        return chunk(choice, delta, finish, usage=True)

    role = '{"role":"assistant","content":""}'
    assert encoder.role() == frame(0, role) + frame(1, role) + frame(2, role)
    assert encoder.content("a", 2) == frame(2, '{"content":"a"}')
    assert encoder.reasoning("r", 1) == frame(1, '{"reasoning_content":"r"}')
    call = svc.ToolCallDelta(choice_index=1, index=0, id="c", name="f", arguments="{")
    assert encoder.tool_call(call) == frame(
        1, '{"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{"}}]}'
    )
    finish = finished(
        pb.FinishReason.FINISH_REASON_STOP,
        pb.FinishReason.FINISH_REASON_TOOL_CALLS,
        pb.FinishReason.FINISH_REASON_LENGTH,
    )
    assert encoder.finish(finish) == (
        frame(0, "{}", '"stop"') + frame(1, "{}", '"tool_calls"') + frame(2, "{}", '"length"')
    )


def test_one_choice_streams_exactly_as_before() -> None:
    encoder = ChunkEncoder(ID, START, include_usage=False, choices=0)  # choice_count unset
    assert encoder.role() == chunk(0, '{"role":"assistant","content":""}', usage=False)
    assert encoder.content("hi") == chunk(0, '{"content":"hi"}', usage=False)


def test_completion_with_tool_calls_has_null_content() -> None:
    response = svc.CreateCompletionResponse(
        model="m", created=1, choices=[svc.Choice(finish_reason=pb.FinishReason.FINISH_REASON_TOOL_CALLS,
        tool_calls=[pb.ToolCall(id="call_1", name="weather", arguments='{"city":"Paris"}'),
                    pb.ToolCall(id="call_2", name="time", arguments="{}")])],
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )  # fmt: skip
    assert completion_json(response, "c")["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    response.choices[0].content = "Let me check."
    assert completion_json(response, "c")["choices"][0]["message"]["content"] == "Let me check."


def test_completion_with_several_choices() -> None:
    response = svc.CreateCompletionResponse(
        model="m", created=1,
        choices=[
            svc.Choice(index=0, content="a", finish_reason=pb.FinishReason.FINISH_REASON_STOP),
            svc.Choice(index=1, content="b", reasoning="hm",
                       finish_reason=pb.FinishReason.FINISH_REASON_LENGTH),
            svc.Choice(index=2, tool_calls=[pb.ToolCall(id="x", name="f", arguments="{}")],
                       finish_reason=pb.FinishReason.FINISH_REASON_TOOL_CALLS),
        ],
    )  # fmt: skip
    choices = completion_json(response, "c")["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["finish_reason"] for c in choices] == ["stop", "length", "tool_calls"]
    assert choices[0]["message"] == {"role": "assistant", "content": "a", "refusal": None}
    assert choices[1]["message"] == {"role": "assistant", "content": "b", "refusal": None, "reasoning_content": "hm"}
    assert choices[2]["message"] == {
        "role": "assistant", "content": None, "refusal": None,
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }  # fmt: skip
