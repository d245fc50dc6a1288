"""`python -m bench.memory bridge|core [streams]`: where each held stream's memory goes, by allocating line.

One ModelMax process (the one named) runs inside this script under tracemalloc; the other, the fake upstream and
a client holding the streams run as subprocesses, so their allocations never mix in. The script holds `streams`
streams open (after a warm-up), diffs two snapshots and prints the Python heap per stream and the lines that
allocated most of it. What RSS per stream (make bench) adds on top is native: grpc's per-call state, sockets.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import uvloop

from bench.run import KEY, ROOT, free_port

_CLIENT = """
import asyncio
from bench.load import chat_request, hold_streams
async def main():
    request = chat_request("127.0.0.1", {port}, "{key}", {{"model": "hold", "stream": True,
                           "messages": [{{"role": "user", "content": "hi"}}]}})
    connections = await hold_streams("127.0.0.1", {port}, request, {count})
    print(len(connections), flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def _hold(port: int, count: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    code = _CLIENT.format(port=port, key=KEY, count=count)
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    assert client.stdout is not None
    held = int(await asyncio.wait_for(client.stdout.readline(), 60))
    assert held == count, f"held {held} of {count} streams"
    return client


async def _measure(which: str, streams: int) -> None:
    upstream, core, bridge = free_port(), free_port(), free_port()
    env = {**os.environ, "MODELMAX_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}"}
    with tempfile.TemporaryDirectory() as workdir:
        catalog = Path(workdir) / "catalog.yaml"
        options = {"base_url": f"http://127.0.0.1:{upstream}/v1", "max_connections": 4096}
        catalog.write_text(json.dumps({"models": [{"name": "hold", "provider": "openai", "model": "hold",
                                                   "options": options}]}))  # fmt: skip
        children = [subprocess.Popen([sys.executable, "-m", "bench.upstream", str(upstream)], cwd=ROOT, env=env)]
        tracemalloc.start(4)
        if which == "core":
            from services.server import start_core
            from services.settings import Settings as CoreSettings

            children.append(subprocess.Popen(
                [sys.executable, "-m", "bridge"], cwd=ROOT,
                env={**env, "MODELMAX_CORE_TARGET": f"127.0.0.1:{core}",
                     "MODELMAX_BRIDGE_PORT": str(bridge), "MODELMAX_BRIDGE_METRICS_PORT": "off"},
            ))  # fmt: skip
            server = await start_core(CoreSettings(catalog_path=str(catalog), port=core, api_keys=(KEY,)), {})
            stop = server.stop
        else:
            import uvicorn

            from bridge.app import create_app
            from bridge.settings import Settings as BridgeSettings

            children.append(subprocess.Popen(
                [sys.executable, "-m", "services"], cwd=ROOT,
                env={**env, "MODELMAX_CATALOG": str(catalog), "MODELMAX_CORE_PORT": str(core),
                     "MODELMAX_CORE_METRICS_PORT": "off", "MODELMAX_API_KEY": KEY},
            ))  # fmt: skip
            await asyncio.sleep(3)  # the core's start-up
            app = create_app(BridgeSettings(core_target=f"127.0.0.1:{core}", port=bridge))
            config = uvicorn.Config(app, host="127.0.0.1", port=bridge, log_level="warning", loop="none")
            uvi = uvicorn.Server(config)
            serving = asyncio.create_task(uvi.serve())

            async def stop(grace: float | None = None) -> None:
                uvi.should_exit = True
                await serving

        try:
            await asyncio.sleep(3)
            warm = await _hold(bridge, 20, env)  # first-use allocations (pools, caches) stay out of the diff
            warm.kill()
            await warm.wait()
            await asyncio.sleep(1)
            gc.collect()
            before = tracemalloc.take_snapshot()
            client = await _hold(bridge, streams, env)
            await asyncio.sleep(1)
            gc.collect()
            during = tracemalloc.take_snapshot()
            client.kill()
            await client.wait()
        finally:
            await stop(grace=None)
            for child in children:
                child.terminate()
                child.wait(10)
    stats = during.compare_to(before, "lineno")
    print(f"{which}: Python heap per held stream: {sum(s.size_diff for s in stats) / streams / 1024:.1f} KiB")
    for stat in stats[:20]:
        print(f"{stat.size_diff / streams:7.0f} B {stat.count_diff / streams:5.1f} objects  {stat.traceback[0]}")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "bridge"
    if which not in ("bridge", "core"):
        sys.exit("usage: python -m bench.memory bridge|core [streams]")
    uvloop.run(_measure(which, int(sys.argv[2]) if len(sys.argv) > 2 else 300))


if __name__ == "__main__":
    main()
