"""`make bench`: the upstream measured directly and through ModelMax (REST -> bridge -> gRPC -> core -> provider),
interleaved in one run, the gateway's two processes pinned to CPU 0 and the fake upstream and load on CPU 1.

Figures are differences and ratios against the direct baseline of the same round; each is the median over rounds.
Every scenario is also run against the architecture's floor (bench/floor.py: uvicorn, one grpc.aio hop and the one
upstream call, doing nothing else), pinned like the gateway, so each target can be read against what its building
blocks cost alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import h2load
from bench.load import Samples, chat_request, grpc_load, hold_streams, http_load

ROOT = Path(__file__).resolve().parent.parent
KEY = "mm-bench-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]

TARGETS = [  # (result key, comparison, target, label, the same figure for the architecture's floor)
    ("nonstream_c1.added_p50_ms", "<=", 1.0, "non-streaming c=1: added latency p50 (ms)", "floor_added_p50_ms"),
    ("nonstream_c1.added_p99_ms", "<=", 2.0, "non-streaming c=1: added latency p99 (ms)", "floor_added_p99_ms"),
    ("nonstream_c64.gateway_rps", ">=", 1500, "non-streaming c=64: requests/s through ModelMax", "floor_rps"),
    ("stream_c64.gateway_chunks_per_s", ">=", 10000, "streaming 20 chunks c=64: chunks/s relayed",
     "floor_chunks_per_s"),
    ("stream_c1.added_ttfc_p50_ms", "<=", 2.0, "streaming c=1: added time to first chunk p50 (ms)",
     "floor_added_ttfc_p50_ms"),
    ("held.all_open", "==", 1, "1000 streams held: all open at once", "floor_all_open"),
    ("held.kib_per_stream", "<=", 25, "1000 streams held: RSS per open stream, both processes (KiB)",
     "floor_kib_per_stream"),
    ("grpc_c1.added_p50_ms", "<=", 0.5, "gRPC direct c=1: added latency p50 (ms)", "floor_added_p50_ms"),
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stack:
    """The fake upstream, the core and the bridge as pinned subprocesses, and the floor's pair pinned alike."""

    def __init__(self, workdir: Path, keys: str = "static") -> None:
        self.upstream_port, self.core_port, self.bridge_port = free_port(), free_port(), free_port()
        # "static": the core checks a key from its settings; "database": a key of a SQLite policy store, every
        # request metered into it (the tenants issue's cost, measured against the static keys' run)
        self.keys = keys
        self.key = KEY
        self.floor_core_port, self.floor_bridge_port = free_port(), free_port()
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        catalog = self.workdir / "catalog.yaml"
        entries = [
            {"name": name, "provider": "openai", "model": name,
             "options": {"base_url": f"http://127.0.0.1:{self.upstream_port}/v1", "max_connections": 4096}}
            for name in ("chunks-1", "chunks-20", "hold")
        ]  # fmt: skip
        catalog.write_text(json.dumps({"models": entries}))  # JSON is YAML
        env = {**os.environ, "MODELMAX_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}"}
        gateway_cpu, other_cpu = cpus()
        self._spawn("upstream", [sys.executable, "-m", "bench.upstream", str(self.upstream_port)], env, other_cpu)
        core_env = {**env, "MODELMAX_CATALOG": str(catalog), "MODELMAX_CORE_PORT": str(self.core_port)}
        if self.keys == "database":
            url = f"sqlite:///{self.workdir / 'policy.sqlite3'}"
            self.key = asyncio.run(_database_key(url))
            core_env["MODELMAX_DATABASE_URL"] = url
        else:
            core_env["MODELMAX_API_KEY"] = KEY
        self._spawn("core", [sys.executable, "-m", "services"], core_env, gateway_cpu)
        self._spawn("bridge", [sys.executable, "-m", "bridge"],
                    {**env, "MODELMAX_CORE_TARGET": f"127.0.0.1:{self.core_port}",
                     "MODELMAX_BRIDGE_PORT": str(self.bridge_port)}, gateway_cpu)  # fmt: skip
        floor = [sys.executable, "-m", "bench.floor"]
        self._spawn("floor_core", [*floor, "core", str(self.floor_core_port), str(self.upstream_port)], env,
                    gateway_cpu)  # fmt: skip
        self._spawn("floor_bridge", [*floor, "bridge", str(self.floor_bridge_port), str(self.floor_core_port)], env,
                    gateway_cpu)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                for port in (self.bridge_port, self.floor_bridge_port):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).read()
                socket.create_connection(("127.0.0.1", self.floor_core_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes.values()):
                    raise RuntimeError("the benchmark stack did not start") from None
                time.sleep(0.2)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cpu: int | None) -> None:
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.processes[name] = subprocess.Popen(prefix + argv, cwd=ROOT, env=env)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


async def _database_key(url: str, **limits: int) -> str:
    from services.policy import open_store
    from services.policy.keys import KeySpec

    store = await open_store(url)
    try:
        _, key = await store.create_key(KeySpec("bench", **limits))  # type: ignore[arg-type]
    finally:
        await store.close()
    return key


def cpus() -> tuple[int | None, int | None]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


Measure = Callable[[], Coroutine[Any, Any, Samples]]


async def sides(measures: dict[str, Measure], round_index: int) -> dict[str, Samples]:
    """Measure each side in turn, rotating which goes first, so drift over the run affects every side alike."""
    names = list(measures)
    shift = round_index % len(names)
    return {name: await measures[name]() for name in names[shift:] + names[:shift]}


def _p(samples: Samples, q: float) -> float:
    return pct(samples.latencies, q) * 1e3


def _ttfc(samples: Samples) -> float:
    return pct(samples.first_bytes, 0.5) * 1e3


async def run_benchmarks(stack: Stack, rounds: int, seconds: float, streams: int) -> dict[str, Any]:
    host = "127.0.0.1"
    ports = {"direct": stack.upstream_port, "gateway": stack.bridge_port, "floor": stack.floor_bridge_port}

    def load(model: str, stream: bool, concurrency: int, limit: int) -> dict[str, Measure]:
        """The same load against the upstream itself, against ModelMax and against the floor."""
        body: dict[str, object] = {"model": model, "messages": MESSAGES, "stream": stream}

        def one(port: int) -> Measure:
            request = chat_request(host, port, stack.key, body)
            return lambda: http_load(host, port, request, concurrency, seconds, limit)

        return {side: one(port) for side, port in ports.items()}

    per_round: dict[str, list[dict[str, float]]] = {k: [] for k in ("nonstream_c1", "nonstream_c64", "stream_c1",
                                                                    "stream_c64", "grpc_c1")}  # fmt: skip
    grpc_sides = _grpc_measures(stack, seconds)
    for r in range(rounds):
        m = await sides(load("chunks-1", False, 1, 5000), r)
        d, g, f = m["direct"], m["gateway"], m["floor"]
        per_round["nonstream_c1"].append({
            "direct_p50_ms": _p(d, 0.5), "gateway_p50_ms": _p(g, 0.5), "floor_p50_ms": _p(f, 0.5),
            "added_p50_ms": _p(g, 0.5) - _p(d, 0.5), "added_p99_ms": _p(g, 0.99) - _p(d, 0.99),
            "floor_added_p50_ms": _p(f, 0.5) - _p(d, 0.5), "floor_added_p99_ms": _p(f, 0.99) - _p(d, 0.99),
            "gateway_errors": g.errors,
        })  # fmt: skip
        m = await sides(load("chunks-1", False, 64, 100000), r)
        d, g, f = m["direct"], m["gateway"], m["floor"]
        per_round["nonstream_c64"].append({
            "direct_rps": len(d.latencies) / d.elapsed, "gateway_rps": len(g.latencies) / g.elapsed,
            "floor_rps": len(f.latencies) / f.elapsed,
            "gateway_p50_ms": _p(g, 0.5), "gateway_p99_ms": _p(g, 0.99), "gateway_errors": g.errors,
        })  # fmt: skip
        m = await sides(load("chunks-20", True, 1, 5000), r)
        d, g, f = m["direct"], m["gateway"], m["floor"]
        per_round["stream_c1"].append({
            "direct_ttfc_p50_ms": _ttfc(d), "gateway_ttfc_p50_ms": _ttfc(g),
            "added_ttfc_p50_ms": _ttfc(g) - _ttfc(d), "floor_added_ttfc_p50_ms": _ttfc(f) - _ttfc(d),
            "gateway_chunks_per_s": g.events / g.elapsed, "gateway_errors": g.errors,
        })  # fmt: skip
        m = await sides(load("chunks-20", True, 64, 100000), r)
        d, g, f = m["direct"], m["gateway"], m["floor"]
        per_round["stream_c64"].append({
            "direct_chunks_per_s": d.events / d.elapsed, "gateway_chunks_per_s": g.events / g.elapsed,
            "floor_chunks_per_s": f.events / f.elapsed,
            "gateway_streams_per_s": len(g.latencies) / g.elapsed, "gateway_errors": g.errors,
        })  # fmt: skip
        m = await sides(grpc_sides, r)
        d, g, f = m["direct"], m["core"], m["floor"]
        per_round["grpc_c1"].append({
            "direct_p50_ms": _p(d, 0.5), "grpc_p50_ms": _p(g, 0.5), "floor_p50_ms": _p(f, 0.5),
            "added_p50_ms": _p(g, 0.5) - _p(d, 0.5), "floor_added_p50_ms": _p(f, 0.5) - _p(d, 0.5),
            "client_is_h2load": float(h2load.available()),
        })  # fmt: skip

    results: dict[str, Any] = {
        name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for name, rows in per_round.items()
    }
    gateway_held = await held(stack, ("core", "bridge"), stack.bridge_port, streams)
    floor_held = await held(stack, ("floor_core", "floor_bridge"), stack.floor_bridge_port, streams)
    results["held"] = {
        **gateway_held,
        "floor_all_open": floor_held["all_open"],
        "floor_kib_per_stream": floor_held["kib_per_stream"],
        "floor_core_kib_per_stream": floor_held["floor_core_kib_per_stream"],
        "floor_bridge_kib_per_stream": floor_held["floor_bridge_kib_per_stream"],
    }
    return results


def _grpc_measures(stack: Stack, seconds: float) -> dict[str, Measure]:
    """CreateCompletion on the core and on the floor's core, one call at a time, and the upstream directly.

    With h2load (a C client), all three sides use it and the Python client's own cost stays out of the figures;
    without it, a grpc.aio client against the raw-asyncio HTTP client (which counts that client's ~0.27 ms per call).
    """
    host = "127.0.0.1"
    _, load_cpu = cpus()
    if not h2load.available():
        body = {"model": "chunks-1", "messages": MESSAGES, "stream": False}
        direct = chat_request(host, stack.upstream_port, stack.key, body)
        return {
            "direct": lambda: http_load(host, stack.upstream_port, direct, 1, seconds, 5000),
            "core": lambda: grpc_load(f"{host}:{stack.core_port}", "chunks-1", seconds, 5000, stack.key),
            "floor": lambda: grpc_load(f"{host}:{stack.floor_core_port}", "chunks-1", seconds, 5000, stack.key),
        }
    from modelmax.v1 import completion_pb2 as pb
    from modelmax.v1 import completion_service_pb2 as svc

    message = svc.CreateCompletionRequest(
        params=pb.CompletionParams(model="chunks-1", messages=[pb.Message(role=pb.Role.ROLE_USER, content="hi")])
    )
    framed = h2load.grpc_frame(message.SerializeToString())
    json_body = json.dumps({"model": "chunks-1", "messages": MESSAGES}).encode()
    grpc_headers = ["content-type: application/grpc", "te: trailers", f"authorization: Bearer {stack.key}"]
    method = "/modelmax.v1.CompletionService/CreateCompletion"

    def side(url: str, body: bytes, headers: list[str], h1: bool) -> Measure:
        async def measure() -> Samples:
            return await asyncio.to_thread(h2load.run, url, body, headers, seconds, h1=h1, cpu=load_cpu)

        return measure

    return {
        "direct": side(f"http://{host}:{stack.upstream_port}/v1/chat/completions", json_body,
                       ["content-type: application/json"], True),
        "core": side(f"http://{host}:{stack.core_port}{method}", framed, grpc_headers, False),
        "floor": side(f"http://{host}:{stack.floor_core_port}{method}", framed, grpc_headers, False),
    }  # fmt: skip


async def held(stack: Stack, names: tuple[str, str], port: int, count: int) -> dict[str, float]:
    """Hold `count` streams through `port`; RSS per stream of the two processes named (core first, then bridge)."""
    pids = {name: stack.processes[name].pid for name in names}
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    request = chat_request("127.0.0.1", port, stack.key, {"model": "hold", "messages": MESSAGES, "stream": True})
    connections = await asyncio.wait_for(hold_streams("127.0.0.1", port, request, count), timeout=120)
    await asyncio.sleep(1.0)
    during = {name: rss_kib(pid) for name, pid in pids.items()}
    for connection in connections:
        connection.close()
    await asyncio.sleep(1.0)  # let both processes see the streams end before anything else is measured
    held_count = max(1, len(connections))
    return {
        "held": len(connections),
        "all_open": float(len(connections) == count),
        "rss_before_kib": sum(before.values()),
        "rss_during_kib": sum(during.values()),
        "kib_per_stream": (sum(during.values()) - sum(before.values())) / held_count,
        **{f"{name}_kib_per_stream": (during[name] - before[name]) / held_count for name in names},
    }


def verdicts(results: dict[str, Any]) -> list[tuple[str, float, float, str, float, bool]]:
    """(label, measured, the floor's figure, comparison, target, met) per target."""
    rows = []
    for key, op, target, label, floor_key in TARGETS:
        section, _, name = key.partition(".")
        value = float(results[section][name])
        ok = {"<=": value <= target, ">=": value >= target, "==": value == target}[op]
        rows.append((label, value, float(results[section][floor_key]), op, target, ok))
    return rows


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    client = "h2load" if results["grpc_c1"]["client_is_h2load"] else "a grpc.aio client (h2load not installed)"
    lines = [
        f"ModelMax benchmark, {meta['date']}: {meta['rounds']} interleaved rounds of {meta['seconds']} s per side, "
        f"gateway pinned to CPU {meta['gateway_cpu']}, upstream and load on CPU {meta['other_cpu']}. The floor is "
        f"uvicorn, one grpc.aio hop and the one upstream call, doing nothing else (bench/floor.py), pinned like the "
        f"gateway. gRPC direct measured with {client}.",
        "",
        "| target | ModelMax | architecture floor | goal | met |",
        "|---|---|---|---|---|",
    ]
    for label, value, floor, op, target, ok in verdicts(results):
        lines.append(f"| {label} | {value:,.2f} | {floor:,.2f} | {op} {target:,} | {'yes' if ok else 'NO'} |")
    lines += ["", "| scenario | figure | value |", "|---|---|---|"]
    for section, figures in results.items():
        for name, value in figures.items():
            lines.append(f"| {section} | {name} | {value:,.3f} |")
    return "\n".join(lines) + "\n"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--keys", choices=("static", "database"), default="static",
                        help="static: a key from the core's settings; database: a key of a SQLite policy store, "
                        "every request metered into it")  # fmt: skip
    args = parser.parse_args()
    raise_fd_limit()
    gateway_cpu, other_cpu = cpus()
    if other_cpu is not None:
        os.sched_setaffinity(0, {other_cpu})
    with tempfile.TemporaryDirectory() as workdir:
        stack = Stack(Path(workdir), args.keys)
        stack.start()
        try:
            import uvloop

            results = uvloop.run(run_benchmarks(stack, args.rounds, args.seconds, args.streams))
        finally:
            stack.stop()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
            "seconds": args.seconds, "keys": args.keys, "gateway_cpu": gateway_cpu, "other_cpu": other_cpu,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
