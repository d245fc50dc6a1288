"""The `modelmax` command: run the core, the bridge or both, and check a catalog file.

`modelmax core` and `modelmax bridge` are `python -m services` and `python -m bridge`; `modelmax run` starts both
for a local session, as `make run` does. The core and the bridge are imported only inside their subcommands, so
this module imports neither at start-up (they never import each other; `startup` is the one place that knows both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from startup import keys

if TYPE_CHECKING:
    from services.catalog import CatalogEntry

_KEY_FILE = Path(".modelmax") / "api-key"
_READY_POLL_SECONDS = 0.5
_READY_NOTICE_SECONDS = 60.0  # after this, say we are still waiting (the first start may load a model for a while)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modelmax` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelmax",
        description="ModelMax, an OpenAI-compatible LLM gateway with a gRPC core. Configured by MODELMAX_* "
        "environment variables (see the README).",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    core = commands.add_parser("core", help="run the gRPC core (python -m services) until SIGTERM or Ctrl-C")
    core.set_defaults(command=_core)
    bridge = commands.add_parser("bridge", help="run the OpenAI-compatible bridge (python -m bridge)")
    bridge.set_defaults(command=_bridge)
    run = commands.add_parser(
        "run",
        help="run the core and the bridge on this machine, print the URL and the API key; Ctrl-C stops both",
        description="Start the core and the bridge, wait until the bridge reports the core serving, and print the "
        f"URL and an API key. Keys, usage and budgets live in $MODELMAX_DATABASE_URL, by default "
        f"{keys.DEFAULT_DATABASE} under the current directory; the key printed is $MODELMAX_API_KEY when set (a "
        f"static key), otherwise a key of that database, created on first run and kept in {_KEY_FILE} (mode 600). "
        "The bridge listens on 127.0.0.1 unless MODELMAX_BRIDGE_HOST says otherwise.",
    )
    run.add_argument(
        "--combined",
        action="store_true",
        help="one process instead of two: the bridge calls the core in process, with no gRPC hop between them "
        "(python -m startup.combined); the core's gRPC port still serves every other caller",
    )
    run.set_defaults(command=_run)
    check = commands.add_parser(
        "check-config",
        help="check a catalog file: each model, its provider(s), and whether it can be served",
        description="Load a catalog as the core does and print each model with its provider(s) and status: ok, or "
        "the problem (such as an unset environment variable a secret is read from). Exits 1 when the core would "
        "refuse to start with this catalog. Provider options are checked by the core when it starts.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the catalog YAML (as MODELMAX_CATALOG names it)")
    check.set_defaults(command=_check_config)
    keys.add_commands(commands)
    return parser


def _core(args: argparse.Namespace) -> int:
    from services.__main__ import main as core_main

    core_main()
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from bridge.__main__ import main as bridge_main

    bridge_main()
    return 0


# ---- check-config ----


def _check_config(args: argparse.Namespace) -> int:
    from services.catalog import CatalogError, load_catalog

    try:
        catalog = load_catalog(args.file)
    except CatalogError as exc:
        print(f"modelmax check-config: {exc}", file=sys.stderr)
        return 1
    rows = [(entry.name, ", ".join(dict.fromkeys(d.provider for d in entry.routes())), *_status(entry, os.environ))
            for entry in catalog.entries]  # fmt: skip
    name_width = max(len(name) for name, *_ in rows)
    provider_width = max(len(providers) for _, providers, *_ in rows)
    print(f"{catalog.path}: {len(rows)} model(s)")
    for name, providers, status, _ in rows:
        print(f"  {name:<{name_width}}  {providers:<{provider_width}}  {status}")
    if any(is_fatal for *_, is_fatal in rows):
        print(f"modelmax check-config: the core would refuse to start with {catalog.path}", file=sys.stderr)
        return 1
    return 0


def _status(entry: CatalogEntry, env: Mapping[str, str]) -> tuple[str, bool]:
    """An entry's status line and whether its problem stops the core from starting (a missing secret does not:
    the core serves the entry as unavailable and every other model as usual)."""
    from services.catalog import CatalogError, MissingSecret, read_secret
    from services.providers import _MODULES as provider_modules

    problems: list[str] = []
    fatal = False
    for deployment in entry.routes():
        try:
            if deployment.provider not in provider_modules:
                raise deployment.problem(f"unknown provider {deployment.provider!r}; known: {sorted(provider_modules)}")
            for option in sorted(deployment.options):
                if option.endswith("_env"):
                    read_secret(deployment, option.removesuffix("_env"), env)
        except MissingSecret as exc:
            problems.append(f"unavailable: {_without_where(exc, entry)}")
        except CatalogError as exc:
            problems.append(f"error: {_without_where(exc, entry)}")
            fatal = True
    return ("; ".join(problems) or "ok"), fatal


def _without_where(exc: Exception, entry: CatalogEntry) -> str:
    """The problem without the entry's location, which the row already shows; a deployment's index stays."""
    return str(exc).removeprefix(entry.where).removeprefix(":").strip()


# ---- run ----


class _Stop(Exception):
    """SIGINT or SIGTERM reached `modelmax run`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env.setdefault("MODELMAX_DATABASE_URL", keys.DEFAULT_DATABASE)
    key = env.get("MODELMAX_API_KEY", "").strip() or asyncio.run(_local_key(env["MODELMAX_DATABASE_URL"]))
    # A laptop has no EC2 metadata service: without this, a Bedrock model with no credentials configured would make
    # botocore wait on the link-local metadata address before failing. On EC2, set it to false.
    env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    env.setdefault("MODELMAX_LOG_FORMAT", "text")  # JSON lines are for log pipelines; this is a terminal
    env.setdefault("MODELMAX_CORE_PORT", "50051")
    env.setdefault("MODELMAX_BRIDGE_PORT", "8000")
    env.setdefault("MODELMAX_CORE_TARGET", f"127.0.0.1:{env['MODELMAX_CORE_PORT']}")
    host = env.get("MODELMAX_BRIDGE_HOST") or "127.0.0.1"
    base_url = f"http://{f'[{host}]' if ':' in host else host}:{env['MODELMAX_BRIDGE_PORT']}"

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # The children share our process group, so a Ctrl-C in the terminal reaches them too; stopping them below
        # covers a SIGTERM sent to this process alone.
        if args.combined:
            processes.append(subprocess.Popen([sys.executable, "-m", "startup.combined"], env=env))
        else:
            processes.append(subprocess.Popen([sys.executable, "-m", "services"], env=env))
            processes.append(subprocess.Popen([sys.executable, "-m", "bridge"], env=env))
        if not _wait_until_ready(f"{base_url}/readyz", processes):
            return 1
        print(_banner(env, base_url, key), flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(_READY_POLL_SECONDS)
        exited = next(process for process in processes if process.returncode is not None)
        name = "gateway" if args.combined else "core" if exited is processes[0] else "bridge"
        print(f"modelmax: the {name} exited with status {exited.returncode}; stopping", file=sys.stderr)
        if exited.returncode < 0:  # killed by a signal
            return 128 - exited.returncode
        return exited.returncode or 1  # one process stopping on its own ends the session as a failure
    except _Stop as stopped:
        return 128 + stopped.signum
    finally:
        _stop_all(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _local_key(database_url: str) -> str:
    """The key kept in .modelmax/api-key while the database still accepts it; else a new inference key (every
    model, no budget) created in the database and kept there (mode 600), so every `make run` prints a working key."""
    from services.policy import open_store
    from services.policy.keys import KeySpec, parse_key, verify_key

    try:
        kept = _KEY_FILE.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        kept = ""
    store = await open_store(database_url)
    try:
        parsed = parse_key(kept)
        record = None if parsed is None else await store.get_key(parsed.key_id)
        usable = record is not None and record.kind == "inference" and record.is_active(datetime.now(UTC))
        if record is not None and usable and verify_key(kept, record.secret_hash):
            return kept
        _, key = await store.create_key(KeySpec("local", owner="modelmax run"))
    finally:
        await store.close()
    _KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key


def _wait_until_ready(url: str, processes: Sequence[subprocess.Popen[bytes]]) -> bool:
    """True once the bridge reports the core reachable and serving; False when a process exits first."""
    started = time.monotonic()
    noticed = False
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:  # URLError while the bridge starts, HTTPError (503) until it reaches the core serving
            pass
        if any(process.poll() is not None for process in processes):
            print("modelmax: a process exited during start-up", file=sys.stderr)
            return False
        if not noticed and time.monotonic() - started > _READY_NOTICE_SECONDS:
            print(f"modelmax: still waiting for {url} (Ctrl-C stops)", file=sys.stderr)
            noticed = True
        time.sleep(_READY_POLL_SECONDS)


def _banner(env: Mapping[str, str], base_url: str, key: str) -> str:
    catalog = env.get("MODELMAX_CATALOG")
    what = f"with the catalog {catalog}" if catalog else "on the embedded model (smollm2-135m)"
    return f"""
  ModelMax is running {what}.

    URL:  {base_url}/v1
    Key:  {key}

  In another shell:
    export MODELMAX_API_KEY={key}
    export MODELMAX_BASE_URL={base_url}/v1

  Ctrl-C stops the gateway.
"""


def _stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running and wait for them to drain; a second Ctrl-C kills them."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        while True:
            try:
                process.wait()
                break
            except _Stop:
                for other in processes:
                    if other.poll() is None:
                        other.kill()


if __name__ == "__main__":
    sys.exit(main())
