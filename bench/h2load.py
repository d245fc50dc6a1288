"""h2load (nghttp2's C load generator) as the client of the latency scenarios where a Python client would measure
itself: a grpc.aio client spends ~0.2 ms of its own per unary call, which would land in the "added latency" of the
direct-gRPC scenario. h2load sends a pre-framed gRPC message over h2c (or JSON over HTTP/1.1) and logs each request's
time, so the same C client measures the upstream directly, the core, and the architecture floor.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from bench.load import Samples


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length, the serialized protobuf."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def run(url: str, body: bytes, headers: list[str], seconds: float, *, h1: bool, cpu: int | None) -> Samples:
    """One connection, one request at a time, for `seconds` after a short warm-up; each request's latency."""
    with tempfile.TemporaryDirectory() as workdir:
        body_file, log_file = Path(workdir) / "body", Path(workdir) / "log.tsv"
        body_file.write_bytes(body)
        argv = ["h2load", "-c", "1", "-m", "1", "-D", f"{max(1, round(seconds))}", "--warm-up-time=300ms"]
        argv += ["-d", str(body_file), f"--log-file={log_file}"] + [f"--header={h}" for h in headers]
        argv += ["--h1"] if h1 else []
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        done = subprocess.run(prefix + argv + [url], capture_output=True, text=True, timeout=seconds + 60, check=True)
        samples = Samples(elapsed=seconds)
        for line in log_file.read_text().splitlines():
            _, status, micros = line.split("\t")[:3]
            if status == "200":
                samples.latencies.append(int(micros) / 1e6)
            else:
                samples.errors += 1
        if not samples.latencies:
            raise RuntimeError(f"h2load answered no request: {done.stdout[-500:]}")
        return samples
