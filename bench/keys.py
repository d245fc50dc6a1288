"""`python -m bench.keys`: what database keys and metering cost against static keys, measured in one run.

Two gateways (core + bridge each) on the same fake upstream, pinned together to CPU 0: one checks a static key from
its settings, the other a key of a SQLite policy store, and meters every request into it (one usage record each,
written in batches by the core). The load (and the upstream) run on CPU 1. Each round measures both in turn,
rotating which goes first, for non-streaming requests at concurrency 1 (p50 latency) and 64 (requests/s); figures
are medians over the rounds. The targets (the tenants issue): the added c=1 p50 grows by at most 0.1 ms, and c=64
throughput drops by at most 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.load import chat_request, http_load
from bench.run import KEY, MESSAGES, ROOT, Measure, _database_key, _p, cpus, free_port, raise_fd_limit, sides


class Gateways:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
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
        for name, (core, bridge) in self.ports.items():
            core_env = {**env, "MODELMAX_CATALOG": str(catalog), "MODELMAX_CORE_PORT": str(core)}
            core_env.update({"MODELMAX_DATABASE_URL": url} if name == "database" else {"MODELMAX_API_KEY": KEY})
            self._spawn([sys.executable, "-m", "services"], core_env, gateway_cpu)
            bridge_env = {**env, "MODELMAX_CORE_TARGET": f"127.0.0.1:{core}", "MODELMAX_BRIDGE_PORT": str(bridge)}
            self._spawn([sys.executable, "-m", "bridge"], bridge_env, gateway_cpu)
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

    def _spawn(self, argv: list[str], env: dict[str, str], cpu: int | None) -> None:
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self.processes.append(subprocess.Popen(prefix + argv, cwd=ROOT, env=env))

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
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
    host = "127.0.0.1"
    body: dict[str, object] = {"model": "chunks-1", "messages": MESSAGES}

    def load(concurrency: int, limit: int) -> dict[str, Measure]:
        measures: dict[str, Measure] = {}
        targets = {
            "direct": (gateways.upstream, KEY),
            **{n: (p[1], gateways.keys[n]) for n, p in gateways.ports.items()},
        }
        for name, (port, key) in targets.items():
            request = chat_request(host, port, key, body)
            pids = gateways.pids.get(name, [])

            async def run(port: int = port, request: bytes = request, pids: list[int] = pids, name: str = name) -> Any:
                before = cpu_seconds(pids)
                samples = await http_load(host, port, request, concurrency, seconds, limit)
                if pids and samples.latencies:  # the gateway's own CPU per request served, both processes
                    cpu_per_request[name].append((cpu_seconds(pids) - before) / len(samples.latencies) * 1e6)
                return samples

            measures[name] = run
        return measures

    cpu_per_request: dict[str, list[float]] = {"static": [], "database": []}

    rows: list[dict[str, float]] = []
    for r in range(rounds):
        c1 = await sides(load(1, 5000), r)
        c64 = await sides(load(64, 100000), r)
        direct = _p(c1["direct"], 0.5)
        row = {
            "static_added_p50_ms": _p(c1["static"], 0.5) - direct,
            "database_added_p50_ms": _p(c1["database"], 0.5) - direct,
            "static_rps": len(c64["static"].latencies) / c64["static"].elapsed,
            "database_rps": len(c64["database"].latencies) / c64["database"].elapsed,
            "errors": float(sum(s.errors for s in (*c1.values(), *c64.values()))),
        }
        row["p50_growth_ms"] = row["database_added_p50_ms"] - row["static_added_p50_ms"]
        row["static_cpu_us_per_request"] = cpu_per_request["static"][-1]  # of the c=64 load, just measured
        row["database_cpu_us_per_request"] = cpu_per_request["database"][-1]
        row["rps_ratio"] = row["database_rps"] / row["static_rps"]
        rows.append(row)
        print(f"round {r + 1}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", flush=True)
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    raise_fd_limit()
    _, other_cpu = cpus()
    if other_cpu is not None:
        os.sched_setaffinity(0, {other_cpu})
    with tempfile.TemporaryDirectory() as workdir:
        gateways = Gateways(Path(workdir))
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "keys.json").write_text(json.dumps({"results": results, "targets": verdicts}, indent=2))
    print(
        f"\nstatic keys: +{results['static_added_p50_ms']:.3f} ms p50 at c=1, {results['static_rps']:.0f} req/s at c=64"
        f"\ndatabase keys + metering (SQLite): +{results['database_added_p50_ms']:.3f} ms, "
        f"{results['database_rps']:.0f} req/s"
        f"\np50 growth {results['p50_growth_ms']:+.3f} ms, throughput ratio {results['rps_ratio']:.3f} "
        f"(medians of {args.rounds} rounds; {results['usage_records']:,} usage records written)"
        f"\nCPU per request at c=64, core + bridge: static {results['static_cpu_us_per_request']:.0f} us, "
        f"database {results['database_cpu_us_per_request']:.0f} us"
    )
    for name, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
