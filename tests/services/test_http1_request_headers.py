"""The pooled HTTP/1.1 client's per-request headers (a trace context): sent after the pool's, checked before sending."""

from __future__ import annotations

import pytest

from services.providers._http1 import Pool
from tests.services.test_http1 import OK_HELLO, PATH, answering, serving

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_a_request_s_own_headers_go_with_it_only() -> None:
    async with serving(answering(OK_HELLO)) as (server, url):
        pool = Pool(url, headers={"authorization": "Bearer k"})
        try:
            own = (("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))
            async with await pool.post(PATH, b"{}", headers=own) as response:
                assert await response.read(100) == b"hello"
            async with await pool.post(PATH, b"{}") as response:  # the same connection, no trace context
                assert await response.read(100) == b"hello"
        finally:
            await pool.aclose()
    first, second = server.requests
    head, _, body = first.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[-3:] == [b"content-length: 2", f"traceparent: {TRACEPARENT}".encode(), b"tracestate: vendor=1"]
    assert b"authorization: Bearer k" in lines and body == b"{}"
    assert b"traceparent" not in second and second.endswith(b"content-length: 2\r\n\r\n{}")
    assert server.accepted == 1


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b", "caf\u00e9"])
async def test_a_header_that_could_split_the_request_is_refused_before_sending(value: str) -> None:
    async with serving(answering(OK_HELLO)) as (server, url):
        pool = Pool(url)
        try:
            with pytest.raises(ValueError):
                await pool.post(PATH, b"{}", headers=(("tracestate", value),))
        finally:
            await pool.aclose()
    assert server.accepted == 0
