"""Folds one completion's event stream into the whole CreateCompletionResponse that the unary RPC returns."""

from __future__ import annotations

from modelmax.v1 import completion_service_pb2 as svc
from services.completion.relay import protocol_error


class Fold:
    """Accumulates `start`, deltas, reasonings, tool calls (single or batched) and the finish, choice by choice.

    The common case, one choice of text, stays two lists and no other allocation; tool calls and choices 1..n-1
    go to a `_More` created only when the answer has any.
    """

    __slots__ = ("response", "_text", "_reasoning", "_more")

    def __init__(self) -> None:
        self.response = svc.CreateCompletionResponse()
        self._text: list[str] = []  # choice 0's text pieces
        self._reasoning: list[str] = []
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
                        more = self._extra()
                        more.text(more.reasonings, thought.choice_index, thought.text)
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
        first.reasoning = "".join(self._reasoning)
        if self._more is not None:
            self._more.fill(response, model)
        return response

    def _extra(self) -> _More:
        more = self._more
        if more is None:
            more = self._more = _More()
        return more


class _Call:
    """One tool call being folded: id and name from its first delta, the arguments' pieces in order."""

    __slots__ = ("id", "name", "arguments")

    def __init__(self, id: str, name: str, arguments: str) -> None:  # noqa: A002 (the proto's field name)
        self.id = id
        self.name = name
        self.arguments = [arguments]


class _More:
    """What a fold holds beyond choice 0's text and reasoning: tool calls, and choices 1..n-1."""

    __slots__ = ("contents", "reasonings", "calls")

    def __init__(self) -> None:
        self.contents: dict[int, list[str]] = {}  # choice index -> text pieces
        self.reasonings: dict[int, list[str]] = {}
        self.calls: dict[tuple[int, int], _Call] = {}  # (choice index, call index) -> call

    @staticmethod
    def text(into: dict[int, list[str]], choice: int, text: str) -> None:
        pieces = into.get(choice)
        if pieces is None:
            into[choice] = [text]
        else:
            pieces.append(text)

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
        for index, pieces in self.reasonings.items():
            choice(index).reasoning = "".join(pieces)
        for (index, _), call in sorted(self.calls.items(), key=lambda item: item[0]):
            choice(index).tool_calls.add(id=call.id, name=call.name, arguments="".join(call.arguments))
