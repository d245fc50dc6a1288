"""Folds one completion's event stream into the whole CreateCompletionResponse that the unary RPC returns.

Reasoning folds twice: its text joined (`Choice.reasoning`), and as blocks (`Choice.reasoning_blocks`), which is
what a caller gives back in the next turn: consecutive text deltas form one block, a signature delta closes the
open block with that signature (or makes a block of its own when none is open), and a redacted delta is a whole
block. A stream without signatures or redacted blocks (most providers) still gets its text as one block.
"""

from __future__ import annotations

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.completion.relay import protocol_error


class Fold:
    """Accumulates `start`, deltas, reasonings, tool calls (single or batched) and the finish, choice by choice.

    The common case, one choice of text, stays two lists and no other allocation; tool calls and choices 1..n-1
    go to a `_More` created only when the answer has any.
    """

    __slots__ = ("response", "_text", "_reasoning", "_blocks", "_more")

    def __init__(self) -> None:
        self.response = svc.CreateCompletionResponse()
        self._text: list[str] = []  # choice 0's text pieces
        self._reasoning: list[str] = []
        self._blocks: _Blocks | None = None  # choice 0's reasoning blocks, once a signature or redaction came
        self._more: _More | None = None

    def add(self, event: svc.StreamCompletionResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "start":
            start, response = event.start, self.response
            response.model, response.created = start.model, start.created
            response.deployment, response.attempts = start.deployment, start.attempts
        elif kind == "finish":
            finish = event.finish
            self.response.usage.CopyFrom(finish.usage)
            for ending in finish.choices:
                self.response.choices.add(
                    index=ending.index, finish_reason=ending.finish_reason, stop_sequence=ending.stop_sequence
                )
        else:  # a delta, reasoning or tool call, or a batch of them
            for item in event.batch.events if kind == "batch" else (event,):
                part = item.WhichOneof("event")
                if part == "delta":
                    delta = item.delta
                    if delta.choice_index:
                        more = self._extra()
                        more.text(more.contents, delta.choice_index, delta.text)
                    else:
                        self._text.append(delta.text)
                elif part == "tool_call":
                    self._extra().tool_call(item.tool_call)
                elif part == "reasoning":
                    thought = item.reasoning
                    if thought.choice_index:
                        self._extra().reasoning(thought)
                    elif thought.signature or thought.redacted:
                        if self._blocks is None:
                            self._blocks = _Blocks()
                        self._blocks.add(thought, self._reasoning)
                    else:
                        self._reasoning.append(thought.text)

    def result(self, model: str) -> svc.CreateCompletionResponse:
        """The whole response; its choices are the finish's (the relay checked there is one per choice asked)."""
        response = self.response
        choices = response.choices
        if not choices:
            raise protocol_error("the provider finished no choice", model)
        first = choices[0]
        first.content = "".join(self._text)
        if self._blocks is not None:
            self._blocks.fill(first, self._reasoning)
        elif self._reasoning:
            first.reasoning = "".join(self._reasoning)
            first.reasoning_blocks.add(text=first.reasoning)
        if self._more is not None:
            self._more.fill(response, model)
        return response

    def _extra(self) -> _More:
        more = self._more
        if more is None:
            more = self._more = _More()
        return more


class _Blocks:
    """One choice's reasoning once it has a signature or a redacted block: the blocks closed so far, and their text.

    The open block's text pieces stay in the caller's list (the plain path's), so the common case never lands here.
    """

    __slots__ = ("blocks", "texts")

    def __init__(self) -> None:
        self.blocks: list[pb.Reasoning] = []
        self.texts: list[str] = []  # the text of every closed block, for Choice.reasoning

    def add(self, delta: svc.ReasoningDelta, open_text: list[str]) -> None:
        """A signature closes the open block (`open_text`, emptied here); a redacted delta is a block of its own."""
        if delta.redacted:
            self._close(open_text, "")
            self.blocks.append(pb.Reasoning(redacted=delta.redacted))
        else:
            self._close(open_text, delta.signature, always=True)

    def _close(self, open_text: list[str], signature: str, *, always: bool = False) -> None:
        if open_text or always:
            text = "".join(open_text)
            open_text.clear()
            self.texts.append(text)
            self.blocks.append(pb.Reasoning(text=text, signature=signature))

    def fill(self, choice: svc.Choice, open_text: list[str]) -> None:
        """Write the blocks (an unsigned one last, for text after the last signature) and the joined text."""
        self._close(open_text, "")
        choice.reasoning = "".join(self.texts)
        choice.reasoning_blocks.extend(self.blocks)


class _Call:
    """One tool call being folded: id and name from its first delta, the arguments' pieces in order."""

    __slots__ = ("id", "name", "arguments")

    def __init__(self, id: str, name: str, arguments: str) -> None:  # noqa: A002 (the proto's field name)
        self.id = id
        self.name = name
        self.arguments = [arguments]


class _More:
    """What a fold holds beyond choice 0's text and reasoning: tool calls, and choices 1..n-1."""

    __slots__ = ("contents", "reasonings", "blocks", "calls")

    def __init__(self) -> None:
        self.contents: dict[int, list[str]] = {}  # choice index -> text pieces
        self.reasonings: dict[int, list[str]] = {}  # choice index -> the open reasoning block's text pieces
        self.blocks: dict[int, _Blocks] = {}  # choice index -> its closed reasoning blocks, once it has any
        self.calls: dict[tuple[int, int], _Call] = {}  # (choice index, call index) -> call

    @staticmethod
    def text(into: dict[int, list[str]], choice: int, text: str) -> None:
        pieces = into.get(choice)
        if pieces is None:
            into[choice] = [text]
        else:
            pieces.append(text)

    def reasoning(self, delta: svc.ReasoningDelta) -> None:
        choice = delta.choice_index
        if delta.signature or delta.redacted:
            open_text = self.reasonings.setdefault(choice, [])
            self.blocks.setdefault(choice, _Blocks()).add(delta, open_text)
        else:
            self.text(self.reasonings, choice, delta.text)

    def tool_call(self, delta: svc.ToolCallDelta) -> None:
        key = (delta.choice_index, delta.index)
        call = self.calls.get(key)
        if call is None:
            self.calls[key] = _Call(delta.id, delta.name, delta.arguments)
        else:
            call.arguments.append(delta.arguments)

    def fill(self, response: svc.CreateCompletionResponse, model: str) -> None:
        """Write the folded parts into `response.choices` (already one per choice, from the finish)."""
        choices = response.choices
        count = len(choices)

        def choice(index: int) -> svc.Choice:
            if not 0 <= index < count:
                raise protocol_error(f"the provider sent choice {index} of {count}", model)
            return choices[index]

        for index, pieces in self.contents.items():
            choice(index).content = "".join(pieces)
        for index in sorted(self.reasonings.keys() | self.blocks.keys()):
            pieces = self.reasonings.get(index, [])
            blocks = self.blocks.get(index)
            if blocks is not None:
                blocks.fill(choice(index), pieces)
            elif pieces:
                target = choice(index)
                target.reasoning = "".join(pieces)
                target.reasoning_blocks.add(text=target.reasoning)
        for (index, _), call in sorted(self.calls.items(), key=lambda item: item[0]):
            choice(index).tool_calls.add(id=call.id, name=call.name, arguments="".join(call.arguments))
