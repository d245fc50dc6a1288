"""The bridge's pure translations: chunk bytes are valid JSON in OpenAI's shape, usage details appear when known."""

from __future__ import annotations

import json

from bridge.translate import ChunkEncoder, completion_json, usage_json
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc

START = svc.CompletionStart(id="chatcmpl-1", model="m", created=1700000000)


def decode(frame: bytes) -> dict[str, object]:
    text = frame.decode()
    assert text.startswith("data: ") and text.endswith("\n\n")
    return json.loads(text[6:])


def test_chunks_are_openai_json_and_escape_text() -> None:
    encoder = ChunkEncoder(START, include_usage=True)
    tricky = 'quote " backslash \\ newline \n unicode é 🙂 </script>'
    chunks = [decode(f) for f in (encoder.role(), encoder.content(tricky), encoder.reasoning("think"),
                                  encoder.finish(pb.FinishReason.FINISH_REASON_LENGTH))]  # fmt: skip
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
    assert "usage" not in decode(ChunkEncoder(START, include_usage=False).content("x"))


def test_usage_details_only_when_reported() -> None:
    assert set(usage_json(pb.Usage(prompt_tokens=1))) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    detailed = usage_json(pb.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cached_tokens=0,
                                   reasoning_tokens=3))  # fmt: skip
    assert detailed["prompt_tokens_details"] == {"cached_tokens": 0}
    assert detailed["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_completion_carries_reasoning_only_when_present() -> None:
    plain = svc.CreateCompletionResponse(
        id="c", model="m", content="hi", finish_reason=pb.FinishReason.FINISH_REASON_STOP
    )
    assert "reasoning_content" not in completion_json(plain)["choices"][0]["message"]
    plain.reasoning_content = "because"
    assert completion_json(plain)["choices"][0]["message"]["reasoning_content"] == "because"
