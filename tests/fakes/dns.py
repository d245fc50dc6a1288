"""A fake DNS server on 127.0.0.1 (UDP): A records for one name, which a test changes while it runs.

gRPC's c-ares resolver asks a given server for a `dns://127.0.0.1:PORT/name:grpc-port` target, so a test can hand the
bridge a list of loopback addresses the way a headless Service's DNS hands it the pod IPs. Every other question (AAAA,
SRV, TXT, another name) gets an empty answer, as for a name with only A records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

_TYPE_A = 1
_CLASS_IN = 1
_TTL_SECONDS = 0  # nothing caches: each re-resolution sees the current list


@dataclass
class FakeDns(asyncio.DatagramProtocol):
    """Answers A queries for `name` with `addresses` (mutable); `queries` counts the A questions for it."""

    name: str
    addresses: list[str] = field(default_factory=list)
    queries: int = 0
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython 3.11's selector datagram transport does not subclass asyncio.DatagramTransport: no isinstance.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        answer = self._answer(data)
        if answer is not None and self._transport is not None:
            self._transport.sendto(answer, addr)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, flags, questions = struct.unpack("!HHH", query[:6])
        if questions != 1:
            return None
        labels, offset = [], 12
        while offset < len(query) and query[offset] != 0:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace").lower())
            offset += 1 + length
        question_end = offset + 5  # the root label, then type and class
        if question_end > len(query):
            return None
        qtype, qclass = struct.unpack("!HH", query[offset + 1 : question_end])
        records = []
        if ".".join(labels) == self.name.lower().rstrip(".") and qtype == _TYPE_A and qclass == _CLASS_IN:
            self.queries += 1
            records = [
                struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, _TTL_SECONDS, 4) + ipaddress.IPv4Address(a).packed
                for a in self.addresses
            ]
        # QR (a response), the query's opcode and RD, RA; RCODE 0 (an empty answer, never NXDOMAIN: c-ares then
        # keeps the A answer it got for the same name).
        reply_flags = 0x8000 | (flags & 0x7900) | 0x0080
        header = struct.pack("!HHHHHH", ident, reply_flags, 1, len(records), 0, 0)
        return header + query[12:question_end] + b"".join(records)


@asynccontextmanager
async def serve_dns(name: str, addresses: list[str]) -> AsyncIterator[FakeDns]:
    """The fake on 127.0.0.1 and an ephemeral UDP port (`.port`)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: FakeDns(name, list(addresses)), local_addr=("127.0.0.1", 0)
    )
    protocol.port = transport.get_extra_info("sockname")[1]
    try:
        yield protocol
    finally:
        transport.close()
