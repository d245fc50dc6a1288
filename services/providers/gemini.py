"""The `gemini` provider: Google Gemini through google-genai, on the Gemini API (an API key) or Vertex AI.

One `genai.Client` per credential set, shared by every entry that names it and closed with the backend. SDK
retries are off (the gateway owns retries, and it also drops the SDK's hidden 1-10 s sleep before retrying a
refused connection). All clients send through one aiohttp session that the backend owns, so that a caller who goes
away closes the upstream connection at once (see `_OPENED`). No SDK type or error leaves this module; the
SDK-free translation and both mapping tables live in `gemini_translate`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from contextvars import ContextVar
from enum import Enum
from typing import TypeVar

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
from services.providers import gemini_translate as tr

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
}
_API_VERSION = {False: "v1beta", True: "v1beta1"}  # the defaults, Gemini API and Vertex AI; always sent explicitly
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


async def _tracked(call: Awaitable[T], opened: list[aiohttp.ClientResponse]) -> T:
    """Await one SDK call, recording the responses it opens in `opened`."""
    token = _OPENED.set(opened)
    try:
        return await call
    finally:
        _OPENED.reset(token)


class GeminiProvider:
    """Serves one catalog entry through its backend's shared client."""

    def __init__(self, client: genai.Client, entry: CatalogEntry, include_thoughts: bool) -> None:
        self._models = client.aio.models
        self._name = entry.name
        self._model = entry.model
        self._thinking = types.ThinkingConfig(include_thoughts=True) if include_thoughts else None

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncIterator[svc.StreamCompletionResponse]:
        contents, fields = tr.to_request(params, self._name)
        # Typed, because the SDK sends nested dicts as they are. The gateway offers no tools, so the SDK's automatic
        # function calling (its own request loop, logged on every call) stays off.
        config = types.GenerateContentConfig.model_validate(fields)
        config.thinking_config = self._thinking
        config.automatic_function_calling = types.AutomaticFunctionCallingConfig(disable=True)
        answer = tr.Answer(self._name)
        opened: list[aiohttp.ClientResponse] = []
        try:
            if incremental:
                chunks = await self._models.generate_content_stream(model=self._model, contents=contents, config=config)
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
        except genai_errors.APIError as exc:  # an HTTP error status, or an error event in the stream
            raise self._api_error(exc) from exc
        except TimeoutError as exc:  # timeout_seconds (aiohttp's total timeout) ran out, connecting or reading
            raise tr.error(R.ERROR_REASON_UPSTREAM_TIMEOUT, self._name) from exc
        except (aiohttp.ClientError, auth_errors.TransportError) as exc:  # refused, reset, dropped mid-body
            raise tr.error(R.ERROR_REASON_UPSTREAM_UNAVAILABLE, self._name) from exc
        except auth_errors.GoogleAuthError as exc:  # Vertex AI: no usable Google credentials
            log.warning("no usable Google credentials for %s: %s", self._name, exc)
            raise tr.error(R.ERROR_REASON_UPSTREAM_AUTH, self._name) from exc
        except (genai_errors.UnknownApiResponseError, json.JSONDecodeError, pydantic.ValidationError) as exc:
            raise tr.error(R.ERROR_REASON_UPSTREAM_PROTOCOL, self._name) from exc
        finally:
            for response in opened:
                response.close()  # a no-op once the SDK has read it to the end

    def _api_error(self, exc: genai_errors.APIError) -> GatewayError:
        reason = tr.error_reason(exc.code, exc.status, exc.details)
        if reason is None:
            log.error("unexpected Gemini error for %s: HTTP %s %s", self._name, exc.code, exc.status)
            reason = R.ERROR_REASON_INTERNAL
        elif reason == R.ERROR_REASON_UPSTREAM_AUTH:
            log.warning("Gemini refused the credentials for %s: %s %s", self._name, exc.code, exc.message)
        return tr.error(reason, self._name, exc.message if isinstance(exc.message, str) else "")


def _chunk(response: types.GenerateContentResponse) -> tr.Chunk:
    """The facts the gateway reads from one response: text parts, finish, block, usage."""
    candidate = response.candidates[0] if response.candidates else None
    parts = (candidate.content.parts if candidate is not None and candidate.content is not None else None) or []
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
        parts=tuple((bool(part.thought), part.text) for part in parts if part.text),
        function_call=any(part.function_call is not None for part in parts),
        finish_reason=_name(candidate.finish_reason) if candidate is not None else None,
        block_reason=_name(feedback.block_reason) if feedback is not None else None,
        usage=counts,
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
        return GeminiProvider(client, entry, include_thoughts)

    def _shared_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(_record_response)
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


def create_backend(env: Mapping[str, str]) -> GeminiBackend:
    return GeminiBackend(env)
