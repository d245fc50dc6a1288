"""The `openai` provider: any OpenAI-compatible chat completions server (vLLM, Ollama, llama.cpp server, OpenAI).

Spoken with our own HTTP/1.1 client (`_http1`): one pool per (base_url, api key), the upstream always streamed
(`stream_options.include_usage`), its server-sent events parsed by `_sse`, and every upstream failure turned into a
GatewayError by the one table in `errors`; the request body is built by `translate`. No `_http1` type leaves this
module. Our own client rather than aiohttp (itself chosen over httpx, ~215 us against ~700 us per call) because
this is the core's hot path: one streamed call costs ~10 us of CPU with a raw asyncio.Protocol + httptools client
against ~66 us with aiohttp, which also holds ~8 KiB of Python objects per open stream.

Everything is passed through in OpenAI's own shape (`supported`), except log probabilities (no proto field carries
them back), top_k and reasoning_budget_tokens (chat completions has neither), which the core refuses before dispatch.
CountTokens answers the core's estimate: chat completions has no counting endpoint. A server that names the stop
string that ended a choice (vLLM's `stop_reason`) has it relayed as that choice's `stop_sequence`, when it is one of
the request's stop sequences.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, read_secret
from services.errors import GatewayError
from services.providers import _http1 as http1
from services.providers import _sse as sse
from services.providers import origin
from services.providers.openai import errors
from services.providers.openai.translate import request_body
from startup import tracing

_OPTIONS = {"base_url", "api_key_env", "timeout_seconds", "connect_timeout_seconds", "max_connections"}
_FINISH_REASONS = {
    "stop": pb.FinishReason.FINISH_REASON_STOP,
    "length": pb.FinishReason.FINISH_REASON_LENGTH,
    "content_filter": pb.FinishReason.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": pb.FinishReason.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FinishReason.FINISH_REASON_TOOL_CALLS,  # the deprecated name of tool_calls
}
_ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error body read; enough for any JSON error, bounded against junk
_DRAIN_SECONDS = 1.0  # after [DONE], how long to wait for the body's end so the connection can be reused

R = pb.ErrorReason


class OpenAICompatibleProvider:
    """Serves one catalog entry through its backend's shared client."""

    supported = frozenset(
        {
            "tools",
            "parallel_tool_calls",
            "response_format",
            "n",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "reasoning_effort",
            "images",
        }
    )

    def __init__(
        self, pool: http1.Pool, path: str, entry: CatalogEntry, *, read_timeout: float, connect_timeout: float
    ) -> None:
        self._pool = pool
        self._path = path
        self._name = entry.name
        self._model = entry.model
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self.server_address, self.server_port = origin(entry.url_option("base_url") or "")

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        try:
            # `async with` ties the HTTP response to this generator: a consumer that stops iterating (aclose,
            # CancelledError) closes it, which drops the upstream connection and so stops the generation.
            # The body is not kept in this frame: orjson's bytes hold a 4 KiB buffer, for as long as a stream is open.
            response = await self._pool.post(
                self._path,
                _encode(request_body(self._model, params)),
                read_timeout=self._read_timeout,
                connect_timeout=self._connect_timeout,
                headers=tracing.outgoing(),  # the attempt's traceparent, which vLLM and others read; () when off
            )
            async with response:
                if response.status != 200:
                    code, kind, message = errors.body_fields(await response.read(_ERROR_BODY_LIMIT))
                    error = self._error(errors.error_reason(response.status, code, kind), message)
                    error.retry_after = errors.retry_after(response.headers.get("retry-after"))
                    raise error
                if "event-stream" not in response.headers.get("content-type", ""):
                    raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL)
                relay = _Relay(self, max(params.choice_count, 1), params.stop_sequences)
                usage: pb.Usage | None = None
                # The events of one network read go out together: one batch event when there are several (the
                # core's caller then pays one gRPC message for them), the event itself when it is alone.
                parser = sse.EventStream()
                async with aclosing(sse.read_events(response, parser)) as reads:
                    async for read in reads:
                        ready: list[svc.StreamCompletionResponse] = []
                        try:
                            for data in read:
                                chunk = self._chunk(data)
                                if isinstance(chunk.get("usage"), dict):  # its own chunk or the finish chunk
                                    usage = self._usage(chunk["usage"])
                                choices = chunk.get("choices")
                                if choices:
                                    ready.extend(relay.events(choices))
                        except GatewayError:
                            if ready:  # what came before the failure still goes out first, as one by one it would
                                yield _together(ready)
                            raise
                        if ready:
                            yield _together(ready)
                if parser.done:  # [DONE]: the answer is complete, the body's end may still be on its way
                    await _drain(response)
                yield svc.StreamCompletionResponse(finish=relay.finish(usage))
        except (http1.ConnectError, http1.ConnectTimeout) as exc:  # could not connect (or no free connection)
            raise self._error(R.ERROR_REASON_UPSTREAM_UNAVAILABLE) from exc
        except http1.ReadTimeout as exc:  # no byte within timeout_seconds
            raise self._error(R.ERROR_REASON_UPSTREAM_TIMEOUT) from exc
        except http1.ProtocolError as exc:  # a response that cannot be parsed or decoded
            raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL) from exc
        except http1.HTTPError as exc:  # the connection broke, e.g. mid-stream (ConnectionBroken)
            raise self._error(R.ERROR_REASON_UPSTREAM_UNAVAILABLE) from exc

    def _error(self, reason: pb.ErrorReason.ValueType, upstream_message: str = "") -> GatewayError:
        return errors.error(reason, self._name, upstream_message)

    def _chunk(self, data: str) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            try:  # what orjson refuses and the stdlib reads (NaN, a UTF-8 BOM): accepted as before
                chunk = json.loads(data)
            except ValueError as exc:
                raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL) from exc
        if not isinstance(chunk, dict):
            raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL)
        if chunk.get("error") is not None or chunk.get("object") == "error":  # older vLLM sends the error flat
            code, kind, message = errors.error_fields(chunk)
            raise self._error(errors.error_reason(None, code, kind), message)
        return chunk

    def protocol_error(self) -> GatewayError:
        """The upstream sent a stream the gateway cannot use."""
        return self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL)

    def _usage(self, usage: dict[str, Any]) -> pb.Usage:
        counts = [usage.get(name) or 0 for name in ("prompt_tokens", "completion_tokens", "total_tokens")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL)
        prompt, completion, total = counts
        out = pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total or prompt + completion)
        # OpenAI's breakdowns, when the server gives them: cached prompt tokens, reasoning tokens of the completion.
        for key, name in (
            ("prompt_tokens_details", "cached_tokens"),
            ("completion_tokens_details", "reasoning_tokens"),
        ):
            value = details.get(name) if isinstance(details := usage.get(key), dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(out, name, value)
        return out


class _Relay:
    """The upstream's streamed choices as our events, and the finish they add up to.

    Tool calls are renumbered per choice in the order they start, so a server that numbers them oddly (or sends each
    parallel call whole with index 0, as some do) still streams OpenAI's shape: a call's first delta carries its id
    (synthesised when the server sent none) and name, later deltas only arguments.
    """

    __slots__ = ("_provider", "_count", "_reasons", "_calls", "_stops", "_matched")

    def __init__(self, provider: OpenAICompatibleProvider, count: int, stops: Sequence[str]) -> None:
        self._provider = provider
        self._count = count  # choices the request asked for
        self._reasons: list[pb.FinishReason.ValueType | None] = [None] * count
        self._calls: dict[int, _Started] | None = None  # by choice; None until a tool call arrives
        self._stops = stops  # the request's stop sequences
        self._matched: list[str] | None = None  # by choice, the stop sequence that ended it; None until one did

    def events(self, choices: object) -> Iterator[svc.StreamCompletionResponse]:
        if not isinstance(choices, list):
            raise self._provider.protocol_error()
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._provider.protocol_error()
            index = choice.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < self._count:
                raise self._provider.protocol_error()
            delta = choice.get("delta")
            if delta:
                if not isinstance(delta, dict):
                    raise self._provider.protocol_error()
                thought = delta.get("reasoning_content") or delta.get("reasoning")  # vLLM, DeepSeek; newer vLLM
                if thought:
                    if not isinstance(thought, str):
                        raise self._provider.protocol_error()
                    yield svc.StreamCompletionResponse(reasoning=svc.ReasoningDelta(text=thought, choice_index=index))
                text = delta.get("content")
                if text:
                    if not isinstance(text, str):
                        raise self._provider.protocol_error()
                    yield svc.StreamCompletionResponse(delta=svc.ContentDelta(text=text, choice_index=index))
                calls = delta.get("tool_calls")
                if calls:
                    yield from self._tool_calls(index, calls)
            name = choice.get("finish_reason")
            if name is not None:
                reason = _FINISH_REASONS.get(name) if isinstance(name, str) else None
                if reason is None:
                    raise self._provider.protocol_error()
                self._reasons[index] = reason
                if self._stops:
                    self._stop_reason(index, choice.get("stop_reason"))

    def _stop_reason(self, index: int, stop: object) -> None:
        """vLLM's `stop_reason`: the stop string that ended the choice (or the id of a stop token, or null). Only one
        of the request's own stop sequences is relayed: anything else is not what the caller asked to stop on."""
        if isinstance(stop, str) and stop in self._stops:
            if self._matched is None:
                self._matched = [""] * self._count
            self._matched[index] = stop

    def _tool_calls(self, choice: int, calls: object) -> Iterator[svc.StreamCompletionResponse]:
        if not isinstance(calls, list):
            raise self._provider.protocol_error()
        if self._calls is None:
            self._calls = {}
        started = self._calls.get(choice)
        if started is None:
            started = self._calls[choice] = _Started()
        for call in calls:
            function = (call.get("function") or {}) if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise self._provider.protocol_error()
            key, call_id, name = call.get("index"), call.get("id") or "", function.get("name") or ""
            if key is not None and not isinstance(key, int):
                raise self._provider.protocol_error()
            arguments = function.get("arguments") or ""
            if not isinstance(arguments, str):  # a server that sends the object itself
                arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise self._provider.protocol_error()
            current = started.by_key.get(key)
            if current is None or (call_id and call_id != current[1]):  # a call starts
                if not name:
                    raise self._provider.protocol_error()
                call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
                started.by_key[key] = (started.count, call_id)
                delta = svc.ToolCallDelta(
                    choice_index=choice, index=started.count, id=call_id, name=name, arguments=arguments
                )
                started.count += 1
            elif arguments:
                delta = svc.ToolCallDelta(choice_index=choice, index=current[0], arguments=arguments)
            else:
                continue  # a repeat of the id or name, with nothing new
            yield svc.StreamCompletionResponse(tool_call=delta)

    def finish(self, usage: pb.Usage | None) -> svc.CompletionFinish:
        """The finish of a complete stream: every choice finished (else the stream was cut: never a made-up stop)."""
        choices: list[svc.ChoiceFinish] = []
        for index, reason in enumerate(self._reasons):
            if reason is None:
                raise self._provider.protocol_error()
            stop = ""
            if reason == pb.FinishReason.FINISH_REASON_STOP:
                if self._calls and index in self._calls:
                    reason = pb.FinishReason.FINISH_REASON_TOOL_CALLS  # an answer with tool calls finishes as such
                elif self._matched is not None:
                    stop = self._matched[index]
            choices.append(svc.ChoiceFinish(index=index, finish_reason=reason, stop_sequence=stop))
        return svc.CompletionFinish(choices=choices, usage=usage)


class _Started:
    """The tool calls one choice has started: our index and id by the upstream's key (its `index`, or None)."""

    __slots__ = ("count", "by_key")

    def __init__(self) -> None:
        self.count = 0
        self.by_key: dict[object, tuple[int, str]] = {}


def _together(events: list[svc.StreamCompletionResponse]) -> svc.StreamCompletionResponse:
    """Events that were ready at once: the one event itself, or a batch of them (never empty, never a finish)."""
    if len(events) == 1:
        return events[0]
    return svc.StreamCompletionResponse(batch=svc.EventBatch(events=events))


async def _drain(response: http1.Response) -> None:
    """Read to the end of the body, so that the connection goes back to the pool instead of being closed."""
    try:
        # The usual case: the body's end came with [DONE], and a timeout of None schedules no timer.
        async with asyncio.timeout(None if response.ended else _DRAIN_SECONDS):
            while await response.next_block():
                pass
    except (TimeoutError, http1.HTTPError):
        pass  # the answer is complete; a server that lingers after [DONE] only costs us the connection


class OpenAICompatibleBackend:
    """Owns one connection pool per (base_url, api key), shared by every entry that names it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self._clients: dict[tuple[str, str | None], http1.Pool] = {}

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def provider_for(self, entry: CatalogEntry) -> OpenAICompatibleProvider:
        entry.check_options(_OPTIONS)
        if not entry.model:
            raise entry.problem("'model' is required: the upstream's model name, such as 'Qwen/Qwen2.5-7B-Instruct'")
        base_url = entry.url_option("base_url")
        if base_url is None:
            raise entry.problem("option 'base_url' is required: the upstream's API root, such as http://vllm:8000/v1")
        timeout = entry.option("timeout_seconds", float, 60.0)
        connect_timeout = entry.option("connect_timeout_seconds", float, 5.0)
        if timeout <= 0 or connect_timeout <= 0:
            raise entry.problem("options 'timeout_seconds' and 'connect_timeout_seconds' must be > 0")
        # Open connections to this upstream, at most: one per concurrent stream. A bound of 100 (aiohttp's default)
        # would queue the 101st stream behind the others.
        max_connections = entry.option("max_connections", int, 1000)
        if max_connections < 1:
            raise entry.problem("option 'max_connections' must be >= 1")
        api_key = read_secret(entry, "api_key", self._env)
        key = (base_url.rstrip("/"), api_key)
        client = self._clients.get(key)
        if client is None:
            headers = {"content-type": "application/json"}
            if api_key:
                headers["authorization"] = f"Bearer {api_key}"
            try:
                client = http1.Pool(base_url, headers=headers, max_connections=max_connections)
            except ValueError as exc:  # a key that cannot be a header value (a line break), a host that is not ASCII
                raise entry.problem(f"cannot reach 'base_url' with this entry: {exc}") from None
            self._clients[key] = client
        # timeout_seconds bounds every wait for upstream bytes (the first token, then each gap), not the whole
        # stream: a long answer is fine while tokens keep coming, and the caller's gRPC deadline bounds the total.
        path = quote(urlsplit(key[0]).path, safe="/%:@!$&'()*+,;=") + "/chat/completions"
        return OpenAICompatibleProvider(client, path, entry, read_timeout=timeout, connect_timeout=connect_timeout)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def create_backend(env: Mapping[str, str]) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(env)


def _encode(body: dict[str, Any]) -> bytes:
    """The request body as JSON: orjson (fast), or the stdlib for what orjson refuses and JSON allows (a tool schema
    with an integer beyond 64 bits, or nested deeper than 254 levels): the caller's schema goes upstream as sent."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
