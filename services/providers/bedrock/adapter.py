"""The `bedrock` provider: AWS Bedrock Runtime's Converse (whole answers) and ConverseStream, through aioboto3.

One bedrock-runtime client per distinct client configuration (region, endpoint_url, profile, timeouts), entered
once while the catalog is loaded and shared by every entry that names it. The SDK's own retries are off (the
gateway owns retries) and its timeouts come from the catalog. Credentials come from the standard AWS chain only
(environment, shared profile, web identity / IRSA, container and instance metadata), never from the catalog.
Every AWS failure becomes a GatewayError through the one table in errors.py; no botocore type leaves this module.
The request and answer shapes are in translate.py, the tools' in tools.py.

Honoured (`supported`): tools (tool_choice, tool calls and results in the history), parallel_tool_calls=false (by
relaying only the first call), response_format (a forced tool), images, and `strict` on a tool or a json_schema:
Converse has no such switch, so the gateway validates the final JSON against the schema (schema_check.py) and
answers a mismatch with an UPSTREAM_PROTOCOL error (a 502), never as if it matched. Not supported, so refused by the
core before dispatch: n, seed, non-zero penalties, logprobs, reasoning_effort, top_k and reasoning_budget_tokens.
Converse's inferenceConfig has no field for any of them, and the only way to pass them,
additionalModelRequestFields, is model-specific and refused by models that do not know one. A failed tool's result
(`is_error`) and the reasoning given back in the history (with its signatures) have Converse fields of their own
(translate.py). CountTokens answers the core's estimate: Bedrock Runtime's own CountTokens operation, which only
some models support, is not used.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack, aclosing
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.eventstream import ParserError
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    HTTPClientError,
    InvalidRegionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOError,
    TokenRetrievalError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.parsers import ResponseParserError

from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from services.catalog import CatalogEntry, MissingSecret
from services.errors import GatewayError
from services.providers import origin
from services.providers.bedrock.errors import PROVIDER, error, error_reason
from services.providers.bedrock.translate import StreamFold, UnusableAnswer, converse_events, converse_request
from services.providers.schema_check import SchemaMismatch, mismatch_error
from startup import tracing

log = logging.getLogger(__name__)

_OPTIONS = {"region", "endpoint_url", "connect_timeout_seconds", "read_timeout_seconds", "profile"}
# Connections per client, so concurrent streams per client. botocore's default of 10 would queue the eleventh
# concurrent stream behind a pool slot, silently, for as long as the first ten take.
_MAX_POOL_CONNECTIONS = 100

R = pb.ErrorReason
# The credential chain's failures (botocore's own types): the gateway has no usable AWS credentials.
_CREDENTIAL_ERRORS = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    TokenRetrievalError,
    SSOError,
)


class BedrockProvider:
    """Serves one catalog entry through its backend's shared client."""

    supported = frozenset({"tools", "parallel_tool_calls", "response_format", "images"})

    def __init__(self, client: Any, entry: CatalogEntry, server: tuple[str, int | None]) -> None:
        self._client = client
        self._name = entry.name
        self._model = entry.model
        self.server_address, self.server_port = server

    async def stream(
        self, params: pb.CompletionParams, *, incremental: bool = True
    ) -> AsyncGenerator[svc.StreamCompletionResponse, None]:
        request, shape = converse_request(self._model, params)
        request_id = ""  # AWS's id for this call, for the log; exception frames mid-stream carry none of their own
        try:
            if not incremental:
                answer = await self._client.converse(**request)
                request_id = _request_id(answer)
                for event in converse_events(answer, shape):
                    yield event
                return
            response = await self._client.converse_stream(**request)
            request_id = _request_id(response)
            body = response["stream"]
            try:
                fold = StreamFold(shape)
                async with aclosing(aiter(body)) as events:
                    async for event in events:
                        for out in fold.feed(event):
                            yield out
                for out in fold.finish():  # after the body ended, so the connection goes back to the pool
                    yield out
            finally:
                # A consumer that stops (aclose, CancelledError) or an error: drop the connection, which stops
                # the generation upstream. A no-op when the body was read to its end.
                body.close()
        except ClientError as exc:  # modelled errors; EventStreamError (mid-stream) is a ClientError too
            raise self._client_error(exc, request_id) from exc
        except (ReadTimeoutError, ConnectTimeoutError, TimeoutError) as exc:  # aiohttp's read timeouts mid-stream
            raise self._error(R.ERROR_REASON_UPSTREAM_TIMEOUT) from exc
        except (BotocoreConnectionError, HTTPClientError, aiohttp.ClientError) as exc:  # refused, reset, cut short
            raise self._error(R.ERROR_REASON_UPSTREAM_UNAVAILABLE) from exc
        except _CREDENTIAL_ERRORS as exc:
            log.warning("no usable AWS credentials for model %s: %s", self._name, type(exc).__name__)
            message = f"The gateway has no usable AWS credentials for '{self._name}'."
            raise GatewayError(R.ERROR_REASON_UPSTREAM_AUTH, message, provider=PROVIDER) from exc
        except SchemaMismatch as exc:  # strict: the model's JSON broke the caller's schema
            log.warning("Bedrock answer for model %s (request id %s) failed its strict schema: %s",
                        self._name, request_id, exc)  # fmt: skip
            raise mismatch_error(exc, model=self._name, provider=PROVIDER) from exc
        except (UnusableAnswer, ParserError, ResponseParserError) as exc:
            log.warning("unusable Bedrock answer for model %s (request id %s): %s", self._name, request_id, exc)
            raise self._error(R.ERROR_REASON_UPSTREAM_PROTOCOL) from exc

    def _client_error(self, exc: ClientError, request_id: str) -> GatewayError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", ""))
        request_id = exc.response.get("ResponseMetadata", {}).get("RequestId") or request_id
        reason = error_reason(code, message)
        if reason is None:
            # botocore gives an exception frame of a type its model does not know an empty code.
            log.error("unknown AWS Bedrock error %s for model %s (request id %s): %s",
                      code or "(no code)", self._name, request_id, message)  # fmt: skip
            return self._error(R.ERROR_REASON_INTERNAL)
        if reason == R.ERROR_REASON_UPSTREAM_AUTH:
            log.warning("AWS Bedrock refused the gateway's credentials for model %s (request id %s): %s: %s",
                        self._name, request_id, code, message)  # fmt: skip
        return self._error(reason, message)

    def _error(self, reason: pb.ErrorReason.ValueType, upstream_message: str = "") -> GatewayError:
        return error(reason, self._name, upstream_message)


def _request_id(response: Mapping[str, Any]) -> str:
    return str(response.get("ResponseMetadata", {}).get("RequestId", ""))


def _propagate(request: Any, **_: Any) -> None:
    """botocore's before-send handler: the attempt's traceparent on the HTTP request; returns None, so it is sent."""
    for name, value in tracing.outgoing():
        request.headers[name] = value


class BedrockBackend:
    """Owns the aioboto3 sessions (one per AWS profile) and clients; closes the clients in `aclose`."""

    def __init__(self) -> None:
        self._stack = AsyncExitStack()
        self._sessions: dict[str | None, aioboto3.Session] = {}
        self._clients: dict[tuple[str, str | None, str | None, float, float], Any] = {}

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def provider_for(self, entry: CatalogEntry) -> BedrockProvider:
        entry.check_options(_OPTIONS)
        if not entry.model:
            raise entry.problem("'model' is required: a Bedrock model id such as 'deepseek.v3.2', or an ARN")
        region = entry.option("region", str, "")
        if not region:
            raise entry.problem("option 'region' is required: the AWS region, such as 'us-east-1'")
        endpoint_url = entry.url_option("endpoint_url")
        connect_timeout = entry.option("connect_timeout_seconds", float, 5.0)
        read_timeout = entry.option("read_timeout_seconds", float, 60.0)
        if connect_timeout <= 0 or read_timeout <= 0:
            raise entry.problem("options 'connect_timeout_seconds' and 'read_timeout_seconds' must be > 0")
        profile = entry.option("profile", str, "") or None
        key = (region, endpoint_url, profile, connect_timeout, read_timeout)
        client = self._clients.get(key)
        if client is None:
            client = await self._open_client(entry, key)
            self._clients[key] = client
        # The host botocore connects to: the endpoint_url's, else the region's bedrock-runtime endpoint.
        server = origin(endpoint_url) if endpoint_url else (f"bedrock-runtime.{region}.amazonaws.com", 443)
        return BedrockProvider(client, entry, server)

    async def _open_client(self, entry: CatalogEntry, key: tuple[str, str | None, str | None, float, float]) -> Any:
        region, endpoint_url, profile, connect_timeout, read_timeout = key
        # read_timeout bounds every wait for upstream bytes (the first one, then each gap between events), not the
        # whole answer: a long stream is fine while events keep coming, and the caller's gRPC deadline bounds it.
        config = Config(
            retries={"total_max_attempts": 1},  # `max_attempts` would count retries, not attempts
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=_MAX_POOL_CONNECTIONS,
        )
        try:
            session = self._sessions.get(profile)
            if session is None:
                session = aioboto3.Session(profile_name=profile)
                self._sessions[profile] = session
            # Resolves the credential chain now, at start-up (a web identity token is exchanged at first use).
            client = await self._stack.enter_async_context(
                session.client("bedrock-runtime", region_name=region, endpoint_url=endpoint_url, config=config)
            )
            # botocore's public event hook, after signing: the attempt's W3C trace context (none when tracing is off)
            client.meta.events.register("before-send.bedrock-runtime", _propagate)
            return client
        except ProfileNotFound as exc:
            raise MissingSecret(f"{entry.where}: AWS profile {profile!r} (option 'profile') is not configured") from exc
        except _CREDENTIAL_ERRORS as exc:
            raise MissingSecret(f"{entry.where}: AWS credentials could not be loaded ({type(exc).__name__})") from exc
        except InvalidRegionError as exc:
            raise entry.problem(f"option 'region' is not a valid AWS region name: {region!r}") from exc

    async def aclose(self) -> None:
        self._clients.clear()
        self._sessions.clear()
        await self._stack.aclose()


def create_backend(env: Mapping[str, str]) -> BedrockBackend:
    # botocore reads the credential chain's variables (AWS_*) from the process environment itself, at start-up.
    del env
    return BedrockBackend()
