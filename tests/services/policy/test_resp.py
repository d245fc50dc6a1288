"""The limiter's own Redis client (services/policy/resp.py) against real redis-servers: every reply type, pipelining
many callers over one connection, a cancelled caller, URLs with passwords, databases, TLS and Unix sockets, and the
bound on a reply. redis-py is the independent client that checks what landed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis as RedisPy

from services.policy.resp import Redis, RedisUnavailable, ReplyError, _Target
from tests.redis_server import RedisServer, running_redis


@pytest.fixture(scope="module")
def guarded() -> Iterator[RedisServer]:
    """A server with a password and an ACL user, on TCP and on a Unix socket."""
    options = ("--requirepass", "s3cret", "--unixsocket", "{root}/redis.sock", "--unixsocketperm", "700")
    with running_redis(*options) as server:
        yield server


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:7000/2", ("127.0.0.1", 7000, None, None, None, 2, False)),
        ("redis://:p%40ss@127.0.0.1", ("127.0.0.1", 6379, None, None, "p@ss", 0, False)),
        ("redis://bob:pw@127.0.0.1:7000?db=5", ("127.0.0.1", 7000, None, "bob", "pw", 5, False)),
        ("rediss://127.0.0.1:7001/0", ("127.0.0.1", 7001, None, None, None, 0, True)),
        ("unix:///run/redis.sock?db=3&password=pw", ("127.0.0.1", 6379, "/run/redis.sock", None, "pw", 3, False)),
    ],
)
def test_urls(url: str, expected: tuple[object, ...]) -> None:
    t = _Target.parse(url)
    assert (t.host, t.port, t.path, t.username, t.password, t.db, t.tls is not None) == expected


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1/one"])
def test_a_url_that_is_not_redis_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="Redis"):
        _Target.parse(url)


async def test_every_reply_type(redis_url: str) -> None:
    client = Redis(redis_url, timeout=2)
    try:
        assert await client.call("PING") == "PONG"
        assert await client.call("SET", "resp:a", "héllo") == "OK"
        assert await client.call("GET", "resp:a") == "héllo"
        assert await client.call("GET", "resp:missing") is None
        assert await client.call("INCRBY", "resp:n", -7) == -7
        script = "return {1, {2, 'x', ''}, false, redis.status_reply('FINE')}"
        assert await client.call("EVAL", script, 0) == [1, [2, "x", ""], None, "FINE"]
        with pytest.raises(ReplyError) as wrong:
            await client.call("INCR", "resp:a")
        assert wrong.value.code == "ERR"
        with pytest.raises(ReplyError) as unknown:
            await client.call("EVALSHA", "0" * 40, 0)
        assert unknown.value.code == "NOSCRIPT"
        assert await client.call("PING") == "PONG"  # an error reply leaves the connection usable
        big = "z" * 300_000  # several reads: parsed once it has all arrived
        await client.call("SET", "resp:big", big)
        assert await client.call("GET", "resp:big") == big
    finally:
        await client.aclose()


async def test_many_callers_share_one_connection_and_each_gets_its_own_reply(redis_url: str) -> None:
    client = Redis(redis_url, timeout=5)
    try:
        await client.call("DEL", "resp:counter")
        counts = await asyncio.gather(*(client.call("INCR", "resp:counter") for _ in range(500)))
        assert sorted(counts) == list(range(1, 501))  # type: ignore[type-var]  # INCR answers integers
        async with RedisPy.from_url(redis_url) as raw:
            clients = await raw.client_list()
        assert sum(c["cmd"] in ("incr", "del") for c in clients) == 1  # one socket for all of them

        async def echo(i: int) -> object:
            return await client.call("ECHO", f"e{i}")

        calls = [asyncio.ensure_future(echo(i)) for i in range(200)]
        await asyncio.sleep(0)  # every call sent
        for call in calls[::3]:
            call.cancel()  # their replies still come back, and are dropped in order
        results = await asyncio.gather(*calls, return_exceptions=True)
        for i, result in enumerate(results):
            assert isinstance(result, asyncio.CancelledError) if i % 3 == 0 else result == f"e{i}"
        assert await client.call("ECHO", "after") == "after"
    finally:
        await client.aclose()


async def test_a_password_a_user_and_a_database(guarded: RedisServer) -> None:
    port = guarded.port
    async with RedisPy.from_url(f"redis://:s3cret@127.0.0.1:{port}/0") as raw:
        await raw.acl_setuser("limiter", enabled=True, passwords=["+pw2"], commands=["+@all"], keys=["*"])
    for url in (f"redis://:s3cret@127.0.0.1:{port}/3", f"redis://limiter:pw2@127.0.0.1:{port}/3"):
        client = Redis(url, timeout=2)
        try:
            await client.call("SET", "resp:where", url)
        finally:
            await client.aclose()
        async with RedisPy.from_url(f"redis://:s3cret@127.0.0.1:{port}/3", decode_responses=True) as raw:
            assert await raw.get("resp:where") == url  # in database 3, not 0
    wrong = Redis(f"redis://:nope@127.0.0.1:{port}/0", timeout=2)
    with pytest.raises(RedisUnavailable, match="WRONGPASS"):
        await wrong.call("PING")
    none = Redis(f"redis://127.0.0.1:{port}/0", timeout=2)  # no password: the server refuses the command itself
    try:
        with pytest.raises(ReplyError, match="NOAUTH"):
            await none.call("PING")
    finally:
        await none.aclose()


async def test_a_unix_socket(guarded: RedisServer) -> None:
    client = Redis(f"unix://{guarded.root}/redis.sock?db=1&password=s3cret", timeout=2)
    try:
        assert await client.call("PING") == "PONG"
    finally:
        await client.aclose()


async def test_tls_to_a_plain_server_is_unavailable_not_a_hang(redis_url: str) -> None:
    client = Redis(redis_url.replace("redis://", "rediss://"), timeout=0.5)
    with pytest.raises(RedisUnavailable):
        await asyncio.wait_for(client.call("PING"), 5)


async def test_a_reply_beyond_the_bound_closes_the_connection(redis_url: str) -> None:
    client = Redis(redis_url, timeout=5)
    try:
        await client.call("SET", "resp:huge", "h" * (1 << 21))  # 2 MiB: no limiter reply is anywhere near it
        with pytest.raises(RedisUnavailable, match="1 MiB"):
            await client.call("GET", "resp:huge")
        assert await client.call("PING") == "PONG"  # a new connection for the next call
    finally:
        await client.aclose()


async def test_a_closed_client_refuses_calls(redis_url: str) -> None:
    client = Redis(redis_url, timeout=2)
    await client.call("PING")
    await client.aclose()
    with pytest.raises(RedisUnavailable, match="closed"):
        await client.call("PING")
