"""Over-long strings a caller controls are 400s naming their field, through the real bridge and core, never 5xx/413.

The core once echoed an over-long model name into the status message and trailing metadata: a 5 KB name came back
as a 500, a 100 KB one as a 413. `user` and the stop strings had no bound at all.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY

MODEL = "smollm2-135m"
USER = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, "max_tokens": 1, **fields}


async def post(gateway_url: str, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as http:
        return await http.post("/chat/completions", json=payload, headers=AUTH)


def assert_400(response: httpx.Response, param: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert len(error["message"]) < 1000  # the offending value is never echoed whole
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_a_5kb_model_name_is_a_400_not_a_500(gateway_url: str, stream: bool) -> None:
    assert_400(await post(gateway_url, body(model="m" * 5 * 1024, stream=stream)), "model")


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
async def test_a_100kb_model_name_is_a_400_not_a_413(gateway_url: str, stream: bool) -> None:
    assert_400(await post(gateway_url, body(model="m" * 100 * 1024, stream=stream)), "model")


async def test_user_and_stop_strings_are_bounded(gateway_url: str) -> None:
    assert_400(await post(gateway_url, body(user="u" * 10_000)), "user")
    assert_400(await post(gateway_url, body(stop=["s" * 10_000])), "stop")
    assert_400(await post(gateway_url, body(stop="s" * 10_000)), "stop")
