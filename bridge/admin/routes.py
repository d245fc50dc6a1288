"""The admin API's handlers and routes: each parses its request, makes one KeyService call, and renders the reply.

`/v1/admin/keys/{key_path}` is one route per method whose last segment takes the rest of the path (the route
table's rule), so the handlers split it themselves: `<id>` is the key (GET, PATCH, DELETE), `<id>/rotate` its
rotation (POST); another method on either is a 405 naming the allowed ones, any other path a 404.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import grpc
from starlette.responses import JSONResponse, Response

from bridge.admin.objects import created_json, current_key_json, key_json, usage_json
from bridge.admin.request import param_of, parse_create, parse_list_query, parse_update, parse_usage_query
from bridge.dialect import Refusal, Refused
from bridge.openai.errors import DIALECT as OPENAI
from bridge.openai.errors import OpenAIError, bad_request, from_rpc_error
from bridge.pipeline import REQUEST_ID, Exchange, Route
from modelmax.v1 import key_service_pb2 as ks
from modelmax.v1 import key_service_pb2_grpc as ks_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")

_TIMEOUT_SECONDS: Final = 30.0  # a usage report over a long range reads many rows
_KEY_METHODS: Final = "GET, HEAD, PATCH, DELETE"  # on /v1/admin/keys/<id>
_ROTATE_METHODS: Final = "POST"  # on /v1/admin/keys/<id>/rotate


async def current_key(exchange: Exchange) -> Response:
    """GET /v1/key: the calling key (either kind, static keys included)."""
    reply = await _reply(_keys(exchange).GetCurrentKey(ks.GetCurrentKeyRequest(), **_options(exchange)))
    return _json(exchange, {"data": current_key_json(reply)})


async def create_key(exchange: Exchange) -> Response:
    """POST /v1/admin/keys: 201 with the key and, once, its whole `key`."""
    parsed = parse_create(exchange.body)
    call = _keys(exchange).CreateKey(ks.CreateKeyRequest(key=parsed.key), **_options(exchange))
    reply = await _reply(call, parsed.budget_param)
    return _json(exchange, created_json(reply.key, reply.secret_key), status=201, secret=True)


async def list_keys(exchange: Exchange) -> Response:
    """GET /v1/admin/keys?owner=&include_revoked=: the keys, oldest first."""
    request = parse_list_query(exchange.request.query_params.multi_items())
    reply = await _reply(_keys(exchange).ListKeys(request, **_options(exchange)))
    return _json(exchange, {"object": "list", "data": [key_json(key) for key in reply.keys]})


async def get_key(exchange: Exchange) -> Response:
    """GET /v1/admin/keys/<id>."""
    key_id = _key_id(exchange, rotate=False)
    reply = await _reply(_keys(exchange).GetKey(ks.GetKeyRequest(key_id=key_id), **_options(exchange)))
    return _json(exchange, key_json(reply.key))


async def update_key(exchange: Exchange) -> Response:
    """PATCH /v1/admin/keys/<id>: change the fields the body names."""
    parsed = parse_update(exchange.body, _key_id(exchange, rotate=False))
    request = ks.UpdateKeyRequest(key=parsed.key)
    request.update_mask.paths.extend(parsed.update_mask)
    reply = await _reply(_keys(exchange).UpdateKey(request, **_options(exchange)), parsed.budget_param)
    return _json(exchange, key_json(reply.key))


async def revoke_key(exchange: Exchange) -> Response:
    """DELETE /v1/admin/keys/<id>: revoke; answers the revoked key."""
    key_id = _key_id(exchange, rotate=False)
    reply = await _reply(_keys(exchange).RevokeKey(ks.RevokeKeyRequest(key_id=key_id), **_options(exchange)))
    return _json(exchange, key_json(reply.key))


async def rotate_key(exchange: Exchange) -> Response:
    """POST /v1/admin/keys/<id>/rotate: a new secret; answers the key and, once, its new whole `key`."""
    key_id = _key_id(exchange, rotate=True)
    if exchange.body.strip() not in (b"", b"{}"):
        raise bad_request("Rotating a key takes no request body (or an empty JSON object).")
    reply = await _reply(_keys(exchange).RotateKey(ks.RotateKeyRequest(key_id=key_id), **_options(exchange)))
    return _json(exchange, created_json(reply.key, reply.secret_key), secret=True)


async def usage_report(exchange: Exchange) -> Response:
    """GET /v1/admin/usage?from=&to=&group_by=key|model|day."""
    request = parse_usage_query(exchange.request.query_params.multi_items(), datetime.now(UTC))
    reply = await _reply(_keys(exchange).GetUsageReport(request, **_options(exchange)))
    return _json(exchange, usage_json(reply, request))


# Every admin route, for bridge/app.py's route table. None is public: each call carries the caller's key to the core,
# which decides (a management key for /v1/admin/*, any key for /v1/key).
ADMIN_ROUTES: Final = (
    Route("GET", "/v1/key", current_key, OPENAI),
    Route("POST", "/v1/admin/keys", create_key, OPENAI, json_body=True),
    Route("GET", "/v1/admin/keys", list_keys, OPENAI),
    Route("GET", "/v1/admin/keys/{key_path}", get_key, OPENAI),
    Route("PATCH", "/v1/admin/keys/{key_path}", update_key, OPENAI, json_body=True),
    Route("DELETE", "/v1/admin/keys/{key_path}", revoke_key, OPENAI),
    Route("POST", "/v1/admin/keys/{key_path}", rotate_key, OPENAI),
    Route("GET", "/v1/admin/usage", usage_report, OPENAI),
)


def _keys(exchange: Exchange) -> ks_grpc.KeyServiceAsyncStub:
    stub = exchange.gateway.keys
    if stub is None:  # a Gateway built without the key service's stub: a wiring bug, answered as a 500
        log.error("the gateway has no KeyService stub")
        raise Refused(Refusal.INTERNAL)
    return stub


def _options(exchange: Exchange) -> dict[str, Any]:
    return {"timeout": _TIMEOUT_SECONDS, "metadata": exchange.metadata}


def _key_id(exchange: Exchange, *, rotate: bool) -> str:
    """The <id> of `<id>` (rotate=False) or `<id>/rotate` (rotate=True); a 405 for the other, a 404 for the rest."""
    rest: str = exchange.request.path_params["key_path"]
    key_id, slash, tail = rest.partition("/")
    path = exchange.request.url.path
    if not key_id or (slash and tail != "rotate"):
        raise Refused(Refusal.NOT_FOUND, {"method": exchange.request.method, "path": path})
    if bool(slash) != rotate:
        allow = _ROTATE_METHODS if slash else _KEY_METHODS
        details = {"method": exchange.request.method, "path": path}
        raise Refused(Refusal.METHOD_NOT_ALLOWED, details, {"allow": allow})
    return key_id


async def _reply(call: Awaitable[R], budget_param: str = "budget_usd") -> R:
    """The core's reply, or its error in OpenAI's shape with the admin API's param names."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise _error(exc, budget_param) from None


def _error(exc: grpc.aio.AioRpcError, budget_param: str) -> OpenAIError:
    error = from_rpc_error(exc)
    field = error.param
    if field is None:
        return error
    param = param_of(field, budget_param)
    message = error.message if param is None else error.message.replace(f"'{field}'", f"'{param}'")
    return OpenAIError(
        error.status, message, error.type, param, error.code, error.retry_after, retry=error.retry
    )  # fmt: skip


def _json(exchange: Exchange, content: dict[str, Any], *, status: int = 200, secret: bool = False) -> Response:
    headers = {REQUEST_ID: exchange.seen.request_id}
    if secret:  # the whole key: no cache or proxy on the way may keep a copy
        headers["cache-control"] = "no-store"
    return JSONResponse(content, status_code=status, headers=headers)
