"""The `gemini` provider: Google Gemini through google-genai, on the Gemini API (an API key) or Vertex AI.

One `genai.Client` per credential set, shared by every entry that names it and closed with the backend. SDK
retries are off (the gateway owns retries, and it also drops the SDK's hidden 1-10 s sleep before retrying a
refused connection). All clients send through one aiohttp session that the backend owns, so that a caller who goes
away closes the upstream connection at once (see `_OPENED`). No SDK type or error leaves this module; the
SDK-free parts live beside it: `translate` (requests and the answer fold), `tools` (function calling, call ids and
thought signatures, with the placeholder signature for calls Gemini did not make), `thinking` (the reasoning_effort
table) and `errors` (the upstream error table).

Honoured (`supported`): tools and tool_choice, parallel_tool_calls=false (only each candidate's first call is
relayed), response_format, n (candidateCount), seed, presence and frequency penalties, reasoning_effort (where the
model's family has a setting for it; a 400 naming it where not), reasoning_budget_tokens (thinkingBudget, thoughts
included), top_k, images. Not supported, so refused by the core before dispatch: logprobs, which no proto field
carries back.

CountTokens asks Gemini's countTokens with the contents, system instruction and tools a completion would send.
google-genai refuses `system_instruction` and `tools` in count_tokens on the Gemini API (they are Vertex AI-only in
the SDK), while the API itself takes them inside `generateContentRequest`: so on the Gemini API the provider posts
that body through the SDK's own API client (its `_api_client.async_request`, the request method every SDK call
uses: the same key, base URL, API version, timeout, session and error types), and on Vertex AI it calls the SDK's
count_tokens with them in its config.

google-genai sends what it copies as SDK objects (function declarations, inline data, thinking config) with their
Python field names (`parameters_json_schema`, `mime_type`, `thinking_level`); Google's JSON parsing accepts both
spellings, so the exact upstream requests in the tests show them that way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Mapping
from contextlib import aclosing
from contextvars import ContextVar
from enum import Enum
from typing import TypeVar, cast

import aiohttp
import pydantic
from google import genai
from google.auth import exceptions as auth_errors
from google.genai import errors as genai_errors
from google.genai import types

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, read_secret
from services.errors import GatewayError
from services.providers import origin
from services.providers.gemini import errors as gemini_errors
from services.providers.gemini import thinking as gemini_thinking
from services.providers.gemini import tools as gemini_tools
from services.providers.gemini import translate as tr
from startup import tracing

log = logging.getLogger(__name__)
T = TypeVar("T")
R = pb.ErrorReason

_OPTIONS = {
    "api_key_env",
    "vertexai",
    "project",
    "location",
    "base_url",
    "api_version",
    "timeout_seconds",
    "include_thoughts",
    "reasoning_effort",
}
_LEVELS = {level.value for level in types.ThinkingLevel} - {"THINKING_LEVEL_UNSPECIFIED"}
_API_VERSION = {False: "v1beta", True: "v1beta1"}  # the defaults, Gemini API and Vertex AI; always sent explicitly
# What an upstream call may raise that the caller should see (mapped by GeminiProvider._failure).
_UPSTREAM_FAILURES = (
    genai_errors.APIError,
    TimeoutError,
    aiohttp.ClientError,
    auth_errors.GoogleAuthError,  # TransportError (unreachable) included
    genai_errors.UnknownApiResponseError,
    json.JSONDecodeError,
    pydantic.ValidationError,
)
_READ_BUFFER = 2**22  # what google-genai's own session uses: an SSE event is one line, of any length

# The aiohttp responses opened by the SDK call the current task is awaiting. google-genai reads a stream through
# several nested async generators, one of them in a reference cycle, and closing the generator it returns leaves
# the inner ones (and the HTTP response) open until the garbage collector finds them. So the session records each
# response here, and the provider closes its own in a `finally`, which drops the connection at once.
_OPENED: ContextVar[list[aiohttp.ClientResponse] | None] = ContextVar("gemini_opened", default=None)


async def _record_response(
    session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestEndParams
) -> None:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(params.response)


async def _propagate(session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestStartParams) -> None:
    """aiohttp's request-start hook: the attempt's W3C trace context on Gemini's HTTP request (nothing when off)."""
    for name, value in tracing.outgoing():
        params.headers[name] = value


async def _tracked(call: Awaitable[T], opened: list[aiohttp.ClientResponse]) -> T:
    """Await one SDK call, recording the responses it opens in `opened`."""
    token = _OPENED.set(opened)
    try:
        return await call
    finally:
        _OPENED.reset(token)


class GeminiProvider:
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
            "top_k",
            "reasoning_budget_tokens",
        }
    )

    def __init__(
        self,
        client: genai.Client,
        entry: CatalogEntry,
        include_thoughts: bool,
        thinking: Mapping[pb.ReasoningEffort.ValueType, gemini_thinking.Thinking],
        server: tuple[str, int | None],
    ) -> None:
        self.server_address, self.server_port = server
        self._models = client.aio.models
        self._vertexai = client.vertexai
        self._name = entry.name
        self._model = entry.model
        self._include_thoughts = include_thoughts
        self._thinking = dict(thinking)
        self._placeholder_signatures = gemini_tools.needs_thought_signatures(entry.model)

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        contents, fields = tr.to_request(
            params, self._name, self._thinking, placeholder_signatures=self._placeholder_signatures
        )
        if self._include_thoughts:
            fields.setdefault("thinking_config", {})["include_thoughts"] = True
        # Typed, because the SDK sends nested dicts as they are. The caller runs its own tools, so the SDK's
        # automatic function calling (its own request loop, logged on every call) stays off.
        config = types.GenerateContentConfig.model_validate(fields)
        config.automatic_function_calling = types.AutomaticFunctionCallingConfig(disable=True)
        parallel = not params.HasField("parallel_tool_calls") or params.parallel_tool_calls
        choices = params.choice_count if params.HasField("choice_count") and params.choice_count > 1 else 1
        answer = tr.Answer(self._name, choices, parallel)
        opened: list[aiohttp.ClientResponse] = []
        try:
            if incremental:
                # The SDK annotates this AsyncIterator, but it returns an async generator (its stream_generator()):
                # typed as what it is, so aclosing can close it.
                chunks = cast(
                    "AsyncGenerator[types.GenerateContentResponse, None]",
                    await self._models.generate_content_stream(model=self._model, contents=contents, config=config),
                )
                async with aclosing(chunks):
                    # An HTTP error status surfaces on the first chunk, before anything was yielded: the caller
                    # sees it exactly like an error before the stream.
                    while (chunk := await _tracked(anext(chunks, None), opened)) is not None:
                        for event in answer.events(_chunk(chunk)):
                            yield event
            else:
                response = await _tracked(
                    self._models.generate_content(model=self._model, contents=contents, config=config), opened
                )
                for event in answer.events(_chunk(response)):
                    yield event
            yield answer.finish()
        except _UPSTREAM_FAILURES as exc:
            raise self._failure(exc) from exc
        finally:
            for http_response in opened:
                http_response.close()  # a no-op once the SDK has read it to the end

    async def count_tokens(self, params: pb.CompletionParams) -> int:
        """The prompt's tokens as Gemini counts them: the contents, system instruction and tools a completion of
        `params` sends (see the module doc for the two ways it asks)."""
        contents, fields = tr.to_request(
            params, self._name, self._thinking, placeholder_signatures=self._placeholder_signatures
        )
        opened: list[aiohttp.ClientResponse] = []
        try:
            if self._vertexai:
                config = types.CountTokensConfig.model_validate(
                    {"system_instruction": fields.get("system_instruction"), "tools": fields.get("tools")}
                )
                call = self._models.count_tokens(model=self._model, contents=contents, config=config)
                total = (await _tracked(call, opened)).total_tokens
            else:
                total = await _tracked(self._count_on_gemini_api(contents, fields), opened)
        except _UPSTREAM_FAILURES as exc:
            raise self._failure(exc) from exc
        finally:
            for http_response in opened:
                http_response.close()
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            log.warning("Gemini counted %r tokens for %s", total, self._name)
            raise gemini_errors.error(R.ERROR_REASON_UPSTREAM_PROTOCOL, self._name)
        return total

    async def _count_on_gemini_api(self, contents: list[dict[str, object]], fields: Mapping[str, object]) -> int | None:
        """countTokens with a generateContentRequest, in the wire's camelCase (the SDK's types serialise it)."""
        model = self._model if self._model.startswith(("models/", "tunedModels/")) else f"models/{self._model}"
        request: dict[str, object] = {"model": model, "contents": [_wire(types.Content, c) for c in contents]}
        if "system_instruction" in fields:
            request["systemInstruction"] = _wire(types.Content, fields["system_instruction"])
        if "tools" in fields:
            request["tools"] = [_wire(types.Tool, tool) for tool in cast("list[object]", fields["tools"])]
        api = self._models._api_client  # the SDK's own request method: its count_tokens refuses these (module doc)
        response = await api.async_request("post", f"{model}:countTokens", {"generateContentRequest": request})
        answer = types.CountTokensResponse.model_validate(json.loads(response.body) if response.body else {})
        return answer.total_tokens

    def _failure(self, exc: Exception) -> GatewayError:
        """An upstream call's failure (one of _UPSTREAM_FAILURES) as the GatewayError the caller sees."""
        if isinstance(exc, genai_errors.APIError):  # an HTTP error status, or an error event in the stream
            return self._api_error(exc)
        if isinstance(exc, TimeoutError):  # timeout_seconds (aiohttp's total timeout) ran out, connecting or reading
            return gemini_errors.error(R.ERROR_REASON_UPSTREAM_TIMEOUT, self._name)
        if isinstance(exc, (aiohttp.ClientError, auth_errors.TransportError)):  # refused, reset, dropped mid-body
            return gemini_errors.error(R.ERROR_REASON_UPSTREAM_UNAVAILABLE, self._name)
        if isinstance(exc, auth_errors.GoogleAuthError):  # Vertex AI: no usable Google credentials
            log.warning("no usable Google credentials for %s: %s", self._name, exc)
            return gemini_errors.error(R.ERROR_REASON_UPSTREAM_AUTH, self._name)
        # the SDK's unknown answers, JSON that does not parse, a response its types refuse
        return gemini_errors.error(R.ERROR_REASON_UPSTREAM_PROTOCOL, self._name)

    def _api_error(self, exc: genai_errors.APIError) -> GatewayError:
        reason = gemini_errors.error_reason(exc.code, exc.status, exc.details)
        if reason is None:
            log.error("unexpected Gemini error for %s: HTTP %s %s", self._name, exc.code, exc.status)
            reason = R.ERROR_REASON_INTERNAL
        elif reason == R.ERROR_REASON_UPSTREAM_AUTH:
            log.warning("Gemini refused the credentials for %s: %s %s", self._name, exc.code, exc.message)
        return gemini_errors.error(reason, self._name, exc.message if isinstance(exc.message, str) else "")


def _wire(kind: type[pydantic.BaseModel], value: object) -> dict[str, object]:
    """A request part as its wire JSON: camelCase names, bytes as (URL-safe) base64, as the SDK itself sends them."""
    return kind.model_validate(value).model_dump(mode="json", by_alias=True, exclude_none=True)


def _chunk(response: types.GenerateContentResponse) -> tr.Chunk:
    """The facts the gateway reads from one response: each candidate's parts and finish, block, usage."""
    feedback = response.prompt_feedback
    meta = response.usage_metadata
    counts = None
    if meta is not None:
        counts = tr.UsageCounts(
            prompt=meta.prompt_token_count,
            candidates=meta.candidates_token_count,
            thoughts=meta.thoughts_token_count,
            cached=meta.cached_content_token_count,
        )
    return tr.Chunk(
        candidates=tuple(_candidate(c, position) for position, c in enumerate(response.candidates or ())),
        block_reason=_name(feedback.block_reason) if feedback is not None else None,
        usage=counts,
    )


def _candidate(candidate: types.Candidate, position: int) -> tr.Candidate:
    """Text (thought or not) and function-call parts, in order; parts without either are left out."""
    parts: list[tuple[bool, str] | tr.FunctionCall] = []
    for part in (candidate.content.parts if candidate.content is not None else None) or ():
        call = part.function_call
        if call is not None:
            arguments = gemini_tools.arguments_text(call.args)
            parts.append(tr.FunctionCall(call.name or "", arguments, call.id or None, part.thought_signature or None))
        elif part.text:
            parts.append((bool(part.thought), part.text))
    return tr.Candidate(
        # Gemini numbers its candidates; a lone candidate may come without its index.
        index=candidate.index if candidate.index is not None else position,
        parts=tuple(parts),
        finish_reason=_name(candidate.finish_reason),
    )


def _name(value: object) -> str | None:
    """An SDK enum's wire name; values newer than the SDK arrive as ad-hoc members with the same shape."""
    if value is None:
        return None
    return str(value.value) if isinstance(value, Enum) else str(value)


class GeminiBackend:
    """Owns one genai.Client per credential set and the aiohttp session they all send through."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self._clients: dict[tuple[object, ...], genai.Client] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def provider_for(self, entry: CatalogEntry) -> GeminiProvider:
        entry.check_options(_OPTIONS)
        if not entry.model:
            raise entry.problem("'model' is required: the Gemini model name, such as 'gemini-3-flash-preview'")
        vertexai = entry.option("vertexai", bool, False)
        project = entry.option("project", str, "")
        location = entry.option("location", str, "")
        if vertexai == ("api_key_env" in entry.options):
            raise entry.problem(
                "give exactly one of option 'api_key_env' (the Gemini API) or 'vertexai: true' (Vertex AI)"
            )
        if vertexai and not (project and location):
            raise entry.problem("Vertex AI ('vertexai: true') needs options 'project' and 'location'")
        if not vertexai and (project or location):
            raise entry.problem("options 'project' and 'location' are for Vertex AI ('vertexai: true')")
        base_url = entry.url_option("base_url") or ""
        api_version = entry.option("api_version", str, _API_VERSION[vertexai])
        if not api_version:
            raise entry.problem("option 'api_version' must not be empty (for example 'v1beta')")
        timeout = entry.option("timeout_seconds", float, 60.0)
        if timeout <= 0:
            raise entry.problem("option 'timeout_seconds' must be > 0")
        include_thoughts = entry.option("include_thoughts", bool, False)
        thinking = gemini_thinking.thinking_table(entry.model, _effort_overrides(entry))
        api_key = None if vertexai else read_secret(entry, "api_key", self._env)
        timeout_ms = max(1, round(timeout * 1000))  # google-genai counts in milliseconds
        key = (api_key, project, location, base_url, api_version, timeout_ms)
        client = self._clients.get(key)
        if client is None:
            http_options = types.HttpOptions(
                base_url=base_url or None,
                api_version=api_version,
                timeout=timeout_ms,
                retry_options=types.HttpRetryOptions(attempts=1),
                aiohttp_client=self._shared_session(),
            )
            if vertexai:  # the standard Google credential chain (ADC), fetched when the first request is sent
                client = genai.Client(vertexai=True, project=project, location=location, http_options=http_options)
            else:  # vertexai=False explicitly: GOOGLE_GENAI_USE_VERTEXAI in the environment must not switch it
                client = genai.Client(vertexai=False, api_key=api_key, http_options=http_options)
            self._clients[key] = client
        if base_url:
            server = origin(base_url)
        elif vertexai:  # google-genai's Vertex AI host: the location's, or the global one
            server = (
                f"{location}-aiplatform.googleapis.com" if location != "global" else "aiplatform.googleapis.com",
                443,
            )
        else:
            server = ("generativelanguage.googleapis.com", 443)
        return GeminiProvider(client, entry, include_thoughts, thinking, server)

    def _shared_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(_record_response)
            trace.on_request_start.append(_propagate)
            # As google-genai builds its own: no connection limit, proxies from the environment, long lines.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                trust_env=True,
                read_bufsize=_READ_BUFFER,
                trace_configs=[trace],
            )
        return self._session

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aio.aclose()
            client.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _effort_overrides(entry: CatalogEntry) -> dict[str, gemini_thinking.Thinking]:
    """Option `reasoning_effort`: effort name -> thinkingLevel name, thinkingBudget, or null (refused)."""
    overrides: dict[str, gemini_thinking.Thinking] = {}
    for effort, value in entry.option("reasoning_effort", dict, {}).items():
        if effort not in gemini_thinking.EFFORTS:
            raise entry.problem(
                f"option 'reasoning_effort': unknown effort {effort!r}; known: {list(gemini_thinking.EFFORTS)}"
            )
        if isinstance(value, str) and value.upper() in _LEVELS:
            overrides[effort] = value.upper()
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            overrides[effort] = value
        else:
            raise entry.problem(
                f"option 'reasoning_effort': {effort!r} must be a thinking level ({', '.join(sorted(_LEVELS))}), "
                f"a thinking budget in tokens, or null, got {value!r}"
            )
    return overrides


def create_backend(env: Mapping[str, str]) -> GeminiBackend:
    return GeminiBackend(env)
