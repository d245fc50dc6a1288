"""A light load generator: raw asyncio HTTP/1.1 with keep-alive, and a grpc.aio client for the core's API.

Each result is a list of per-request samples (seconds): total latency, time to the first body byte, and how many SSE
`data:` events arrived, so streaming figures (time to first chunk, chunks/s) come from the same client.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    events: int = 0
    errors: int = 0
    elapsed: float = 0.0

    def merge(self, other: Samples) -> None:
        self.latencies += other.latencies
        self.first_bytes += other.first_bytes
        self.events += other.events
        self.errors += other.errors


def chat_request(host: str, port: int, key: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a fixed request and reads whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def exchange(self, request: bytes, samples: Samples, until_first_event: bool = False) -> None:
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            samples.errors += 1
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            first = True
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                data = await self.reader.readexactly(size + 2)
                if first:
                    samples.first_bytes.append(time.perf_counter() - started)
                    first = False
                if size == 0:
                    break
                samples.events += data.count(b"data: ")
                if until_first_event and b"held" in data:
                    return
        else:
            start = lower.index(b"content-length:") + 15
            length = int(lower[start : lower.index(b"\r\n", start)])
            await self.reader.readexactly(length)
            samples.first_bytes.append(time.perf_counter() - started)
        samples.latencies.append(time.perf_counter() - started)

    def close(self) -> None:
        self.writer.close()


async def http_load(host: str, port: int, request: bytes, concurrency: int, seconds: float, limit: int) -> Samples:
    """`concurrency` connections each send `request` back to back for `seconds` (at most `limit` in all)."""
    connections = [await Connection.open(host, port) for _ in range(concurrency)]
    for connection in connections:  # warm each connection (and the server's per-connection state) once
        await connection.exchange(request, Samples())
    deadline = time.perf_counter() + seconds
    budget = [limit]

    async def worker(connection: Connection) -> Samples:
        samples = Samples()
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            await connection.exchange(request, samples)
        return samples

    started = time.perf_counter()
    results = await asyncio.gather(*(worker(c) for c in connections))
    total = Samples(elapsed=time.perf_counter() - started)
    for result in results:
        total.merge(result)
    for connection in connections:
        connection.close()
    return total


async def hold_streams(host: str, port: int, request: bytes, count: int) -> list[Connection]:
    """Open `count` streams that each receive their first event and then stay open; returns their connections."""
    connections: list[Connection] = []
    semaphore = asyncio.Semaphore(64)  # open them quickly, without a thundering herd of connects

    async def one() -> None:
        async with semaphore:
            connection = await Connection.open(host, port)
            await connection.exchange(request, Samples(), until_first_event=True)
            connections.append(connection)

    await asyncio.gather(*(one() for _ in range(count)))
    return connections


async def grpc_load(target: str, model: str, seconds: float, limit: int, key: str) -> Samples:
    """CreateCompletion on the core, one call at a time, through the generated stubs."""
    import grpc

    from modelmax.v1 import completion_pb2 as pb
    from modelmax.v1 import completion_service_pb2 as svc
    from modelmax.v1 import completion_service_pb2_grpc as svc_grpc

    request = svc.CreateCompletionRequest(
        params=pb.CompletionParams(model=model, messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
    )
    samples = Samples()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = svc_grpc.CompletionServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        await stub.CreateCompletion(request, metadata=metadata)
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline and len(samples.latencies) < limit:
            t = time.perf_counter()
            await stub.CreateCompletion(request, metadata=metadata)
            samples.latencies.append(time.perf_counter() - t)
        samples.elapsed = time.perf_counter() - started
    return samples
