"""GET /v1/models and /v1/models/{model_id}: the core's catalog as OpenAI model objects."""

from __future__ import annotations

from typing import Any

import grpc
from starlette.responses import JSONResponse, Response

from bridge.openai.errors import OpenAIError, from_rpc_error
from bridge.pipeline import REQUEST_ID, Exchange
from modelmax.v1 import completion_service_pb2 as svc

_LIST_TIMEOUT_SECONDS = 10.0


async def list_models(exchange: Exchange) -> Response:
    models = await _models(exchange)
    exchange.gateway.metrics.known_models.update(model.id for model in models)
    return JSONResponse(
        {"object": "list", "data": [model_json(model) for model in models]},
        headers={REQUEST_ID: exchange.seen.request_id},
    )


async def retrieve_model(exchange: Exchange) -> Response:
    model_id: str = exchange.request.path_params["model_id"]
    for model in await _models(exchange):
        if model.id == model_id:
            return JSONResponse(model_json(model), headers={REQUEST_ID: exchange.seen.request_id})
    raise OpenAIError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model",
                      "model_not_found")  # fmt: skip


def model_json(model: svc.ModelInfo) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}


async def _models(exchange: Exchange) -> list[svc.ModelInfo]:
    try:
        reply = await exchange.gateway.stub.ListModels(
            svc.ListModelsRequest(), timeout=_LIST_TIMEOUT_SECONDS, metadata=exchange.metadata
        )
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    return list(reply.models)
