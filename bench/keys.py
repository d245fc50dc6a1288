"""`python -m bench.keys`: what database keys and metering cost against static keys, measured in one run.

Two gateways (core + bridge each) on the same fake upstream, pinned together to CPU 0: one checks a static key from
its settings, the other a key of a SQLite policy store, and meters every request into it (one usage record each,
written in batches by the core). The load (and the upstream) run on CPU 1. Non-streaming requests: at concurrency 1,
one request to the upstream directly, to each gateway in turn (p50 latency, and the median of the paired
differences); at concurrency 64, both gateways loaded at once, 32 connections each (requests/s, their ratio, and
each gateway's CPU per request); medians over the rounds. The targets (the tenants issue): the added c=1 p50 grows
by at most 0.1 ms, and c=64 throughput drops by at most 10%.

`--combined` measures the combined mode the same way: both sides database keys with metering (the full hot path),
the first split (core + bridge, one gRPC hop), the second one process (`python -m startup.combined`, the bridge
calling the core in process); its "core" CPU is the whole process's.

`--traces` measures tracing the same way: both gateways on a static key, the second with OpenTelemetry on, sampling
every request (always_on) and exporting over OTLP/gRPC to a local sink (bench/otlp_sink.py, on the load's CPU): what
three spans a request (bridge, core, the upstream attempt) cost. There is no target; it says what it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.load import Connection, Samples, chat_request, http_load
from bench.run import KEY, MESSAGES, ROOT, _database_key, cpus, free_port, raise_fd_limit


class Gateways:
    """The two gateways. With `baseline` (another checkout), the first runs that tree's code with a static key and
    the second this tree's, also with a static key: the same paired measurement, of a change to the hot path."""

    def __init__(
        self,
        workdir: Path,
        baseline: Path | None = None,
        limits: bool = False,
        traces: bool = False,
        combined: bool = False,
    ) -> None:
        self.workdir = workdir
        self.baseline = baseline
        self.limits = limits  # both sides database keys; the second's key has limits counted in a Redis
        self.traces = traces  # both sides static keys; the second traces every request to a local OTLP sink
        self.combined = combined  # both sides database keys; the second is one process, the bridge calling in process
        self.upstream = free_port()
        self.ports = {"static": (free_port(), free_port()), "database": (free_port(), free_port())}  # core, bridge
        self.keys = {"static": KEY, "database": ""}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, list[int]] = {"static": [], "database": []}  # each gateway's core and bridge

    def start(self) -> None:
        catalog = self.workdir / "catalog.yaml"
        entry = {"name": "chunks-1", "provider": "openai", "model": "chunks-1",
                 "options": {"base_url": f"http://127.0.0.1:{self.upstream}/v1", "max_connections": 4096}}  # fmt: skip
        catalog.write_text(json.dumps({"models": [entry]}))
        env = {**os.environ, "MODELMAX_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}",
               "MODELMAX_CORE_METRICS_PORT": "off", "MODELMAX_BRIDGE_METRICS_PORT": "off"}  # fmt: skip
        gateway_cpu, other_cpu = cpus()
        self._spawn([sys.executable, "-m", "bench.upstream", str(self.upstream)], env, other_cpu)
        url = f"sqlite:///{self.workdir / 'policy.sqlite3'}"
        self.keys["database"] = asyncio.run(_database_key(url))
        if self.baseline is not None or self.traces:
            self.keys["database"] = KEY
        otel: dict[str, str] = {}
        if self.traces:
            sink = free_port()
            self._spawn([sys.executable, "-m", "bench.otlp_sink", str(sink)], env, other_cpu)
            otel = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}",
                "OTEL_TRACES_SAMPLER": "always_on",
            }
        redis_url = ""
        if self.limits:  # never reached, so every request is counted and admitted
            redis_url = self._start_redis(env, other_cpu)
            self.keys["static"] = asyncio.run(_database_key(url))
            self.keys["database"] = asyncio.run(
                _database_key(url, rpm=2**31 - 1, tpm=2**31 - 1, max_concurrent=2**31 - 1)
            )
        for name, (core, bridge) in self.ports.items():
            root = self.baseline if self.baseline is not None and name == "static" else ROOT
            tree = {**env, "PYTHONPATH": f"{root / 'gen'}:{root}", "MODELMAX_API_KEY": KEY}  # older bridges read it
            if name == "database" and otel:
                tree = {**tree, **otel}
            core_env = {**tree, "MODELMAX_CATALOG": str(catalog), "MODELMAX_CORE_PORT": str(core)}
            if (name == "database" and self.baseline is None and not self.traces) or self.limits or self.combined:
                core_env.pop("MODELMAX_API_KEY")
                core_env["MODELMAX_DATABASE_URL"] = url
            if name == "database" and redis_url:
                core_env["MODELMAX_LIMITS_REDIS_URL"] = redis_url
            bridge_env = {**tree, "MODELMAX_CORE_TARGET": f"127.0.0.1:{core}", "MODELMAX_BRIDGE_PORT": str(bridge)}
            if name == "database" and self.combined:
                self._spawn([sys.executable, "-m", "startup.combined"], {**bridge_env, **core_env}, gateway_cpu, root)
                self.pids[name] = [self.processes[-1].pid]
                continue
            self._spawn([sys.executable, "-m", "services"], core_env, gateway_cpu, root)
            self._spawn([sys.executable, "-m", "bridge"], bridge_env, gateway_cpu, root)
            self.pids[name] = [process.pid for process in self.processes[-2:]]
        deadline = time.monotonic() + 60
        for _, bridge in self.ports.values():
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{bridge}/readyz", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                        raise RuntimeError("the gateways did not start") from None
                    time.sleep(0.2)

    def _start_redis(self, env: dict[str, str], cpu: int | None) -> str:
        """A private redis-server on 127.0.0.1 (`make tools` installs it), on the load's CPU like the upstream."""
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn(argv, env, cpu, self.workdir)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        return f"redis://127.0.0.1:{port}/0"
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start (make tools installs it)")
            time.sleep(0.1)

    def _spawn(self, argv: list[str], env: dict[str, str], cpu: int | None, cwd: Path = ROOT) -> None:
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.processes.append(subprocess.Popen(prefix + argv, cwd=cwd, env=env))

    def stop(self) -> None:
        """The gateways first, then what they drain into (the upstream, Redis, the OTLP sink of their last spans)."""
        gateways = {pid for pids in self.pids.values() for pid in pids}
        first = [process for process in self.processes if process.pid in gateways]
        for group in (first, [process for process in self.processes if process.pid not in gateways]):
            for process in group:
                process.terminate()
            for process in group:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far (Linux /proc; taskset runs each command in its own pid)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


async def measure(gateways: Gateways, rounds: int, seconds: float) -> dict[str, Any]:
    """Both measurements pair the two gateways in the same moment, so the machine's drift (large on a shared VM)
    falls on both alike: at c=1 one request to each in turn (the order rotating), at c=64 both loaded at once,
    32 connections each, sharing CPU 0, so each gateway's share of the requests served says what it costs."""
    host = "127.0.0.1"
    body: dict[str, object] = {"model": "chunks-1", "messages": MESSAGES}
    targets = {"direct": (gateways.upstream, KEY), **{n: (p[1], gateways.keys[n]) for n, p in gateways.ports.items()}}
    requests = {name: chat_request(host, port, key, body) for name, (port, key) in targets.items()}
    connections = {name: await Connection.open(host, port) for name, (port, _) in targets.items()}
    names = list(targets)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    growth: list[float] = []  # per turn: database minus static, the paired difference
    deadline = time.perf_counter() + seconds * rounds
    turn = 0
    while time.perf_counter() < deadline:
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            samples = Samples()
            await connections[name].exchange(requests[name], samples)
            latencies[name] += samples.latencies
        growth.append(latencies["database"][-1] - latencies["static"][-1])
        turn += 1
    for connection in connections.values():
        connection.close()
    direct = statistics.median(latencies["direct"])
    results: dict[str, Any] = {
        "c1_turns": turn,
        "static_added_p50_ms": (statistics.median(latencies["static"]) - direct) * 1e3,
        "database_added_p50_ms": (statistics.median(latencies["database"]) - direct) * 1e3,
        "p50_growth_ms": statistics.median(growth) * 1e3,
    }
    ratios, cpu = [], {"static": [], "database": []}
    core_cpu: dict[str, list[float]] = {"static": [], "database": []}
    rps: dict[str, list[float]] = {"static": [], "database": []}
    for _ in range(rounds):
        before = {name: cpu_seconds(gateways.pids[name]) for name in rps}
        core_before = {name: cpu_seconds(gateways.pids[name][:1]) for name in rps}
        if gateways.combined:
            # One process against two: loaded together on one CPU, the scheduler would give the split mode's two
            # processes twice the combined one's share, whatever each costs. So each alone, 64 connections, in turn.
            order = list(rps) if len(ratios) % 2 == 0 else list(rps)[::-1]
            alone = {
                name: await http_load(host, targets[name][0], requests[name], 64, seconds, 10**7) for name in order
            }
            both = [alone[name] for name in rps]
        else:
            both = list(
                await asyncio.gather(
                    *(http_load(host, targets[name][0], requests[name], 32, seconds, 10**7) for name in rps)
                )
            )
        for name, samples in zip(rps, both, strict=True):
            rps[name].append(len(samples.latencies) / samples.elapsed)
            used = cpu_seconds(gateways.pids[name]) - before[name]
            cpu[name].append(used / max(1, len(samples.latencies)) * 1e6)
            core_used = cpu_seconds(gateways.pids[name][:1]) - core_before[name]
            core_cpu[name].append(core_used / max(1, len(samples.latencies)) * 1e6)
            results["errors"] = results.get("errors", 0) + samples.errors
        ratios.append(rps["database"][-1] / rps["static"][-1])
        print(f"c=64 round: static {rps['static'][-1]:.0f} req/s, database {rps['database'][-1]:.0f} req/s", flush=True)
    results.update(
        static_rps=statistics.median(rps["static"]),
        database_rps=statistics.median(rps["database"]),
        rps_ratio=statistics.median(ratios),
        static_cpu_us_per_request=statistics.median(cpu["static"]),
        database_cpu_us_per_request=statistics.median(cpu["database"]),
        static_core_cpu_us_per_request=statistics.median(core_cpu["static"]),
        database_core_cpu_us_per_request=statistics.median(core_cpu["database"]),
    )
    return results


async def _records(url: str) -> int:
    """Usage records the database gateway wrote: one per request it served (the metering was on)."""
    from datetime import UTC, datetime

    from services.policy import open_store

    store = await open_store(url)
    try:
        rows = await store.usage_report(datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC), "key")
    finally:
        await store.close()
    return sum(row.requests for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout: compare its static-key gateway with this "
        "tree's (a hot-path change, before and after) instead of static with database keys",
    )
    parser.add_argument(
        "--traces",
        action="store_true",
        help="compare tracing off with tracing on (every request sampled, OTLP/gRPC to a local sink), static keys",
    )
    parser.add_argument(
        "--combined",
        action="store_true",
        help="compare the split mode (core + bridge) with the combined mode (one process), database keys on both",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="compare a database key without limits with one whose limits are counted in Redis (rate-limit cost)",
    )
    args = parser.parse_args()
    raise_fd_limit()
    _, other_cpu = cpus()
    if other_cpu is not None:
        os.sched_setaffinity(0, {other_cpu})
    with tempfile.TemporaryDirectory() as workdir:
        gateways = Gateways(Path(workdir), args.baseline, args.limits, args.traces, args.combined)
        gateways.start()
        try:
            import uvloop

            results = uvloop.run(measure(gateways, args.rounds, args.seconds))
        finally:
            gateways.stop()  # the core's drain writes its last usage records
        results["usage_records"] = asyncio.run(_records(f"sqlite:///{Path(workdir) / 'policy.sqlite3'}"))
    verdicts = {
        "c=1 p50 growth <= 0.1 ms": results["p50_growth_ms"] <= 0.1,
        "c=64 throughput drop <= 10%": results["rps_ratio"] >= 0.9,
    }
    if args.limits:  # the fleet issue's target for a Redis-backed limit
        verdicts = {"c=1 p50 growth <= 0.2 ms": results["p50_growth_ms"] <= 0.2}
    if args.traces or args.combined:  # no target here: the figures are the answer (bench.run has the targets)
        verdicts = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "baseline" if args.baseline else "limits" if args.limits else "traces" if args.traces else "keys"
    name = "combined" if args.combined else name
    (out / f"{name}.json").write_text(
        json.dumps({"results": results, "targets": verdicts, "baseline": str(args.baseline or "")}, indent=2)
    )
    first, second = ("baseline tree", "this tree") if args.baseline else ("static keys", "database keys + metering")
    if args.limits:
        first, second = ("database key, no limits", "database key, limits in Redis")
    if args.traces:
        first, second = ("tracing off", "tracing on (every request sampled, OTLP/gRPC)")
    if args.combined:
        first, second = ("split mode (core + bridge)", "combined mode (one process)")
    print(
        f"\n{first}: +{results['static_added_p50_ms']:.3f} ms p50 at c=1, {results['static_rps']:.0f} req/s at c=64"
        f"\n{second}: +{results['database_added_p50_ms']:.3f} ms, "
        f"{results['database_rps']:.0f} req/s"
        f"\np50 growth {results['p50_growth_ms']:+.3f} ms, throughput ratio {results['rps_ratio']:.3f} "
        f"({results['c1_turns']:,} paired c=1 turns, {args.rounds} c=64 rounds; "
        f"{results['usage_records']:,} usage records written)"
        f"\nCPU per request at c=64, core + bridge: static {results['static_cpu_us_per_request']:.0f} us, "
        f"database {results['database_cpu_us_per_request']:.0f} us (of which the core: "
        f"{results['static_core_cpu_us_per_request']:.0f} and {results['database_core_cpu_us_per_request']:.0f} us)"
    )
    for name, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
