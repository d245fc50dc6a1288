"""Every route goes through the one pipeline, read from the route table itself: the key, then the slot.

A fake core (a real grpc.aio server on 127.0.0.1:0) answers every RPC and records the metadata of each call, so
these tests also pin what the pipeline sends the core: the request id and the caller's key, which the core alone
checks (the fake, like the core, answers UNAUTHENTICATED for any key but the tests' one).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bridge.app import ROUTES
from bridge.auth import static_key_id
from bridge.pipeline import Route
from modelmax.v1 import completion_pb2 as pb
from modelmax.v1 import completion_service_pb2 as svc
from modelmax.v1 import completion_service_pb2_grpc as svc_grpc
from modelmax.v1 import key_service_pb2 as ks
from modelmax.v1 import key_service_pb2_grpc as ks_grpc
from services.errors import GatewayError
from tests.conftest import API_KEY, running_bridge

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STOP = pb.FinishReason.FINISH_REASON_STOP
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}


Context = grpc.aio.ServicerContext[Any, Any]


class Probes(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health ships no stubs for it
    """The core's health service, always SERVING: /readyz answers 200."""

    async def Check(self, request: Any, context: Context) -> health_pb2.HealthCheckResponse:  # noqa: N802
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class RecordingCore(svc_grpc.CompletionServiceServicer):
    """Answers every RPC and keeps each call's metadata; streams wait for `flowing` after their start."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, dict[str, str]]] = []  # (RPC, its invocation metadata)
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def _record(self, rpc: str, context: Context) -> None:
        pairs = context.invocation_metadata() or ()
        metadata = {key: value for key, value in pairs if isinstance(value, str)}
        self.metadata.append((rpc, metadata))
        if metadata.get("authorization") != AUTH["Authorization"]:  # the core's contract (services/policy/gate.py)
            refused = GatewayError(pb.ErrorReason.ERROR_REASON_UNAUTHENTICATED, "Incorrect API key provided.")
            await context.abort_with_status(refused.to_status())

    async def StreamCompletion(self, request: Any, context: Context) -> AsyncIterator[Any]:  # noqa: N802
        await self._record("StreamCompletion", context)
        yield svc.StreamCompletionResponse(start=svc.CompletionStart(model="m", created=1, attempts=1))
        await self.flowing.wait()
        yield svc.StreamCompletionResponse(delta=svc.ContentDelta(text="hi"))
        finish = svc.CompletionFinish(choices=[svc.ChoiceFinish(index=0, finish_reason=STOP)])
        yield svc.StreamCompletionResponse(finish=finish)

    async def CreateCompletion(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._record("CreateCompletion", context)
        return svc.CreateCompletionResponse(model="m", choices=[svc.Choice(content="hi", finish_reason=STOP)])

    async def CountTokens(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._record("CountTokens", context)
        return svc.CountTokensResponse(input_tokens=3)

    async def ListModels(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._record("ListModels", context)
        return svc.ListModelsResponse(models=[svc.ModelInfo(id="m", provider="openai", owned_by="x")])


class RecordingKeys(ks_grpc.KeyServiceServicer):
    """Answers every KeyService RPC, recording each call's metadata in the core's list."""

    def __init__(self, core: RecordingCore) -> None:
        self._core = core

    async def _key(self, rpc: str, context: Context) -> ks.ApiKey:
        await self._core._record(rpc, context)
        return ks.ApiKey(id="k", name="k", kind=ks.KeyKind.KEY_KIND_INFERENCE, state=ks.KeyState.KEY_STATE_ACTIVE)

    async def GetCurrentKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.GetCurrentKeyResponse(key=await self._key("GetCurrentKey", context))

    async def CreateKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.CreateKeyResponse(key=await self._key("CreateKey", context), secret_key="mm-k")

    async def ListKeys(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.ListKeysResponse(keys=[await self._key("ListKeys", context)])

    async def GetKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.GetKeyResponse(key=await self._key("GetKey", context))

    async def UpdateKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.UpdateKeyResponse(key=await self._key("UpdateKey", context))

    async def RevokeKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.RevokeKeyResponse(key=await self._key("RevokeKey", context))

    async def RotateKey(self, request: Any, context: Context) -> Any:  # noqa: N802
        return ks.RotateKeyResponse(key=await self._key("RotateKey", context), secret_key="mm-k")

    async def GetUsageReport(self, request: Any, context: Context) -> Any:  # noqa: N802
        await self._core._record("GetUsageReport", context)
        return ks.GetUsageReportResponse()


@pytest.fixture
async def core() -> AsyncIterator[tuple[RecordingCore, str]]:
    recording = RecordingCore()
    server = grpc.aio.server()
    svc_grpc.add_CompletionServiceServicer_to_server(recording, server)
    ks_grpc.add_KeyServiceServicer_to_server(RecordingKeys(recording), server)
    health_pb2_grpc.add_HealthServicer_to_server(Probes(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield recording, f"127.0.0.1:{port}"
    finally:
        recording.flowing.set()
        await server.stop(grace=None)


@asynccontextmanager
async def bridge(core: tuple[RecordingCore, str], **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """The bridge in front of the fake core, under uvicorn; the calls it made at start-up are forgotten."""
    async with running_bridge(core[1], **settings) as base_url:
        core[0].metadata.clear()  # the lifespan's own ListModels, which no caller made
        async with httpx.AsyncClient(base_url=base_url.removesuffix("/v1"), timeout=10) as http:
            yield http


def name(route: Route) -> str:
    return f"{route.method} {route.path}"


# The path and body of a well-formed request where the generic ones do not fit.
PATHS = {"POST /v1/admin/keys/{key_path}": "/v1/admin/keys/k/rotate"}
MESSAGES = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
BODIES: dict[str, Any] = {
    "POST /v1/admin/keys": {"name": "k"},
    "PATCH /v1/admin/keys/{key_path}": {"name": "k"},
    "POST /v1/messages": MESSAGES,
    "POST /v1/messages/count_tokens": MESSAGES,
}
ANTHROPIC_VERSION = {"anthropic-version": "2023-06-01"}
# The errors each dialect answers for the pipeline's refusals: OpenAI's `code`, Anthropic's error `type`.
ANTHROPIC_TYPES = {"missing_api_key": "authentication_error", "invalid_api_key": "authentication_error",
                   "overloaded": "overloaded_error", None: "invalid_request_error"}  # fmt: skip
ANTHROPIC_STATUS = {503: 529}  # Anthropic's overloaded_error


def path_of(route: Route) -> str:
    path = PATHS.get(name(route)) or route.path.replace("{model_id}", "m").replace("{key_path}", "k")
    assert "{" not in path, f"{name(route)}: give its path parameter a value here"
    return path


def send(http: httpx.AsyncClient, route: Route, headers: dict[str, str] | None = None) -> Any:
    """A well-formed request for `route`: what its handler would serve."""
    path = path_of(route)
    body = BODIES.get(name(route), CHAT if route.json_body else None)
    if route.dialect.name == "anthropic":
        headers = {**ANTHROPIC_VERSION, **(headers or {})}
    return http.request(route.method, path, json=body, headers=headers)


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


def assert_error(route: Route, response: httpx.Response, status: int, code: str | None) -> None:
    """The refusal in the route's dialect: OpenAI's code, or the Anthropic type and status for it."""
    if route.dialect.name != "anthropic":
        assert_openai_error(response, status, code)
        return
    assert response.status_code == ANTHROPIC_STATUS.get(status, status), response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == ANTHROPIC_TYPES[code], body


ROUTE_IDS = [name(route) for route in ROUTES.routes]


def test_only_the_health_probes_are_public() -> None:
    assert {(route.method, route.path) for route in ROUTES.routes if route.public} == PUBLIC
    assert all(route.path.startswith("/v1/") for route in ROUTES.routes if not route.public)


@pytest.mark.parametrize("route", ROUTES.routes, ids=ROUTE_IDS)
async def test_every_v1_route_is_authenticated(core: tuple[RecordingCore, str], route: Route) -> None:
    async with bridge(core) as http:
        missing = await send(http, route)
        wrong = await send(http, route, {"Authorization": "Bearer wrong-key-0123456789"})
        served = await send(http, route, AUTH)
    if route.public:
        assert missing.status_code == wrong.status_code == served.status_code == 200
        return
    assert_error(route, missing, 401, "missing_api_key")
    assert_error(route, wrong, 401, "invalid_api_key")
    assert served.status_code in (200, 201), served.text


@pytest.mark.parametrize("route", ROUTES.routes, ids=ROUTE_IDS)
async def test_every_v1_route_is_admitted(core: tuple[RecordingCore, str], route: Route) -> None:
    """With no slot at all, every /v1 route is refused after its key check; the probes still answer."""
    async with bridge(core, max_concurrent_requests=0) as http:
        keyless = await send(http, route)
        keyed = await send(http, route, AUTH)
    if route.public:
        assert keyless.status_code == keyed.status_code == 200
        return
    assert_error(route, keyless, 401, "missing_api_key")  # authentication comes before admission
    assert_error(route, keyed, 503, "overloaded")
    assert keyed.headers["retry-after"] == "1"
    assert core[0].metadata == [], "a refused request never reaches the core"


async def test_a_held_stream_takes_the_one_slot_of_every_route(core: tuple[RecordingCore, str]) -> None:
    core[0].flowing.clear()
    async with bridge(core, max_concurrent_requests=1) as http:
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as held:
            assert held.status_code == 200
            lines = held.aiter_lines()
            await anext(lines)  # the stream is open and holds its slot
            during = {name(route): await send(http, route, AUTH) for route in ROUTES.routes}
            core[0].flowing.set()
            rest = [line async for line in lines]
        after = {name(route): (await send(http, route, AUTH)).status_code for route in ROUTES.routes}
    assert "data: [DONE]" in rest
    for route in ROUTES.routes:
        if route.public:
            assert during[name(route)].status_code == 200
        else:
            assert_error(route, during[name(route)], 503, "overloaded")
    assert all(after[name(route)] in (200, 201) for route in ROUTES.routes if not route.public), after


@pytest.mark.parametrize("route", ROUTES.routes, ids=ROUTE_IDS)
async def test_another_method_is_405(core: tuple[RecordingCore, str], route: Route) -> None:
    async with bridge(core) as http:
        response = await http.request("PUT", path_of(route), headers=AUTH)  # no route takes PUT
    assert_error(route, response, 405, None)
    assert response.json()["error"]["message"] == f"Method PUT is not allowed for {response.url.path}."
    assert route.method in response.headers["allow"].split(", ")


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/chat/completion", "/v1/nothing-here", "/healthz/x"])
async def test_a_path_no_route_declares_is_404(core: tuple[RecordingCore, str], path: str) -> None:
    async with bridge(core) as http:
        response = await http.post(path, json=CHAT)  # no key: the path is unknown before anyone asks for one
    assert_openai_error(response, 404, None)
    assert response.json()["error"]["message"] == f"Unknown request URL: POST {path}."


async def test_a_trailing_slash_redirects_as_starlette_did(core: tuple[RecordingCore, str]) -> None:
    async with bridge(core) as http:
        redirected = await http.get("/healthz/")
    assert redirected.status_code == 307 and redirected.headers["location"].endswith("/healthz")


async def test_the_key_reaches_the_core_in_authorization_metadata_and_no_log_line(
    core: tuple[RecordingCore, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The core checks every call's key, so the bridge forwards it, in `authorization` and nowhere else; the
    bridge's own log line names it by its public id."""
    caplog.set_level(logging.INFO)
    recording = core[0]
    async with bridge(core) as http:
        plain = await http.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "x-request-id": "trace-1"})
        streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
        listed = await http.get("/v1/models", headers=AUTH)
        one = await http.get("/v1/models/m", headers=AUTH)
    assert plain.status_code == streamed.status_code == listed.status_code == one.status_code == 200
    key_id = static_key_id(API_KEY)
    assert re.fullmatch(r"static-[0-9a-f]{12}", key_id)
    assert [rpc for rpc, _ in recording.metadata] == [
        "CreateCompletion",
        "StreamCompletion",
        "ListModels",
        "ListModels",
    ]
    for rpc, metadata in recording.metadata:
        assert metadata["authorization"] == f"Bearer {API_KEY}", rpc
        assert metadata["x-request-id"], rpc
        others = {k: v for k, v in metadata.items() if k != "authorization"}
        assert not any(API_KEY in value for value in others.values()), f"{rpc} carried the key elsewhere"
        assert "x-modelmax-key-id" not in metadata, "the core believes the key, not a claimed identity"
    assert recording.metadata[0][1]["x-request-id"] == plain.headers["x-request-id"] == "trace-1"
    lines = [record for record in caplog.records if record.name == "bridge.requests"]
    assert [line.key_id for line in lines] == [key_id, key_id]  # type: ignore[attr-defined]  # the two chats
    assert not any(API_KEY in record.getMessage() + repr(vars(record)) for record in caplog.records)


async def test_a_stored_key_is_logged_by_its_public_id(
    core: tuple[RecordingCore, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = "mm-abcdefghijk2-" + "s" * 43
    async with bridge(core) as http:
        refused = await http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(refused, 401, "invalid_api_key")  # the fake core knows only the static key
    [line] = [record for record in caplog.records if record.name == "bridge.requests"]
    assert line.key_id == "abcdefghijk2"  # type: ignore[attr-defined]
    assert not any(key in record.getMessage() + repr(vars(record)) for record in caplog.records)
