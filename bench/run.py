"""`make bench`: the upstream measured directly and through ModelMax (REST -> bridge -> gRPC -> core -> provider),
interleaved in one run, the gateway's two processes pinned to CPU 0 and the fake upstream and load on CPU 1.

Figures are differences and ratios against the direct baseline of the same round; each is the median over rounds.
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

from bench.load import Samples, chat_request, grpc_load, hold_streams, http_load

ROOT = Path(__file__).resolve().parent.parent
KEY = "mm-bench-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]

TARGETS = [  # (result key, comparison, target, label)
    ("nonstream_c1.added_p50_ms", "<=", 1.0, "non-streaming c=1: added latency p50 (ms)"),
    ("nonstream_c1.added_p99_ms", "<=", 2.0, "non-streaming c=1: added latency p99 (ms)"),
    ("nonstream_c64.gateway_rps", ">=", 1500, "non-streaming c=64: requests/s through ModelMax"),
    ("stream_c64.gateway_chunks_per_s", ">=", 10000, "streaming 20 chunks c=64: chunks/s relayed"),
    ("stream_c1.added_ttfc_p50_ms", "<=", 2.0, "streaming c=1: added time to first chunk p50 (ms)"),
    ("held.all_open", "==", 1, "1000 streams held: all open at once"),
    ("held.kib_per_stream", "<=", 25, "1000 streams held: RSS per open stream, both processes (KiB)"),
    ("grpc_c1.added_p50_ms", "<=", 0.5, "gRPC direct c=1: added latency p50 (ms)"),
]


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
    """The fake upstream, the core and the bridge as pinned subprocesses."""

    def __init__(self, workdir: Path) -> None:
        self.upstream_port, self.core_port, self.bridge_port = free_port(), free_port(), free_port()
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
        self._spawn(
            "core",
            [sys.executable, "-m", "services"],
            {**env, "MODELMAX_CATALOG": str(catalog), "MODELMAX_CORE_PORT": str(self.core_port)},
            gateway_cpu,
        )
        self._spawn("bridge", [sys.executable, "-m", "bridge"],
                    {**env, "MODELMAX_API_KEY": KEY, "MODELMAX_CORE_TARGET": f"127.0.0.1:{self.core_port}",
                     "MODELMAX_BRIDGE_PORT": str(self.bridge_port)}, gateway_cpu)  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.bridge_port}/readyz", timeout=1).read()
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


def cpus() -> tuple[int | None, int | None]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


Measure = Callable[[], Coroutine[Any, Any, Samples]]


async def pair(direct: Measure, gateway: Measure, round_index: int) -> tuple[Samples, Samples]:
    """Measure both, alternating which goes first, so drift over the run affects both sides alike."""
    if round_index % 2:
        g = await gateway()
        d = await direct()
    else:
        d = await direct()
        g = await gateway()
    return d, g


async def run_benchmarks(stack: Stack, rounds: int, seconds: float, streams: int) -> dict[str, Any]:
    host = "127.0.0.1"
    up, gw = stack.upstream_port, stack.bridge_port

    def request(port: int, model: str, stream: bool) -> bytes:
        body: dict[str, object] = {"model": model, "messages": MESSAGES, "stream": stream}
        return chat_request(host, port, KEY, body)

    def both(model: str, stream: bool, concurrency: int, limit: int) -> tuple[Measure, Measure]:
        """The same load against the upstream itself and against ModelMax."""
        return (
            lambda: http_load(host, up, request(up, model, stream), concurrency, seconds, limit),
            lambda: http_load(host, gw, request(gw, model, stream), concurrency, seconds, limit),
        )

    per_round: dict[str, list[dict[str, float]]] = {k: [] for k in ("nonstream_c1", "nonstream_c64", "stream_c1",
                                                                    "stream_c64", "grpc_c1")}  # fmt: skip
    for r in range(rounds):
        d, g = await pair(*both("chunks-1", False, 1, 5000), r)
        per_round["nonstream_c1"].append({
            "direct_p50_ms": pct(d.latencies, 0.5) * 1e3, "gateway_p50_ms": pct(g.latencies, 0.5) * 1e3,
            "added_p50_ms": (pct(g.latencies, 0.5) - pct(d.latencies, 0.5)) * 1e3,
            "added_p99_ms": (pct(g.latencies, 0.99) - pct(d.latencies, 0.99)) * 1e3,
            "gateway_errors": g.errors,
        })  # fmt: skip
        d, g = await pair(*both("chunks-1", False, 64, 100000), r)
        per_round["nonstream_c64"].append({
            "direct_rps": len(d.latencies) / d.elapsed, "gateway_rps": len(g.latencies) / g.elapsed,
            "gateway_p50_ms": pct(g.latencies, 0.5) * 1e3, "gateway_p99_ms": pct(g.latencies, 0.99) * 1e3,
            "gateway_errors": g.errors,
        })  # fmt: skip
        d, g = await pair(*both("chunks-20", True, 1, 5000), r)
        per_round["stream_c1"].append({
            "direct_ttfc_p50_ms": pct(d.first_bytes, 0.5) * 1e3, "gateway_ttfc_p50_ms": pct(g.first_bytes, 0.5) * 1e3,
            "added_ttfc_p50_ms": (pct(g.first_bytes, 0.5) - pct(d.first_bytes, 0.5)) * 1e3,
            "gateway_chunks_per_s": g.events / g.elapsed, "gateway_errors": g.errors,
        })  # fmt: skip
        d, g = await pair(*both("chunks-20", True, 64, 100000), r)
        per_round["stream_c64"].append({
            "direct_chunks_per_s": d.events / d.elapsed, "gateway_chunks_per_s": g.events / g.elapsed,
            "gateway_streams_per_s": len(g.latencies) / g.elapsed, "gateway_errors": g.errors,
        })  # fmt: skip
        direct, _ = both("chunks-1", False, 1, 5000)
        d, g = await pair(direct, lambda: grpc_load(f"{host}:{stack.core_port}", "chunks-1", seconds, 5000), r)
        per_round["grpc_c1"].append({
            "direct_p50_ms": pct(d.latencies, 0.5) * 1e3, "grpc_p50_ms": pct(g.latencies, 0.5) * 1e3,
            "added_p50_ms": (pct(g.latencies, 0.5) - pct(d.latencies, 0.5)) * 1e3,
        })  # fmt: skip

    results: dict[str, Any] = {
        name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for name, rows in per_round.items()
    }
    results["held"] = await held(stack, streams)
    return results


async def held(stack: Stack, count: int) -> dict[str, float]:
    pids = {name: stack.processes[name].pid for name in ("core", "bridge")}
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    request = chat_request("127.0.0.1", stack.bridge_port, KEY, {"model": "hold", "messages": MESSAGES, "stream": True})
    connections = await asyncio.wait_for(hold_streams("127.0.0.1", stack.bridge_port, request, count), timeout=120)
    await asyncio.sleep(1.0)
    during = {name: rss_kib(pid) for name, pid in pids.items()}
    for connection in connections:
        connection.close()
    held_count = max(1, len(connections))
    return {
        "held": len(connections),
        "all_open": float(len(connections) == count),
        "rss_before_kib": sum(before.values()),
        "rss_during_kib": sum(during.values()),
        "kib_per_stream": (sum(during.values()) - sum(before.values())) / held_count,
        "core_kib_per_stream": (during["core"] - before["core"]) / held_count,
        "bridge_kib_per_stream": (during["bridge"] - before["bridge"]) / held_count,
    }


def verdicts(results: dict[str, Any]) -> list[tuple[str, float, str, float, bool]]:
    rows = []
    for key, op, target, label in TARGETS:
        section, _, name = key.partition(".")
        value = float(results[section][name])
        ok = {"<=": value <= target, ">=": value >= target, "==": value == target}[op]
        rows.append((label, value, op, target, ok))
    return rows


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"ModelMax benchmark, {meta['date']}: {meta['rounds']} interleaved rounds of {meta['seconds']} s per side, "
        f"gateway pinned to CPU {meta['gateway_cpu']}, upstream and load on CPU {meta['other_cpu']}.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for label, value, op, target, ok in verdicts(results):
        lines.append(f"| {label} | {value:,.2f} | {op} {target:,} | {'yes' if ok else 'NO'} |")
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
    args = parser.parse_args()
    raise_fd_limit()
    gateway_cpu, other_cpu = cpus()
    if other_cpu is not None:
        os.sched_setaffinity(0, {other_cpu})
    with tempfile.TemporaryDirectory() as workdir:
        stack = Stack(Path(workdir))
        stack.start()
        try:
            import uvloop

            results = uvloop.run(run_benchmarks(stack, args.rounds, args.seconds, args.streams))
        finally:
            stack.stop()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
            "seconds": args.seconds, "gateway_cpu": gateway_cpu, "other_cpu": other_cpu,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
