"""Real Redis for any test: a private `redis-server` on 127.0.0.1 per session, and one per test that it may stop.

The server is Debian's (`make tools` installs it), run in the foreground as this process's child, without
persistence, in a temporary directory. A missing redis-server fails the tests that need it, loudly: a skipped
backend would let the shared limits' guarantees (exact limits across replicas, the fail mode) go untested.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "redis-server is installed by `make tools` (Debian's redis-server package)"


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail(f"redis-server is not on PATH: {INSTALL_HINT}", pytrace=False)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # a server with a password answers too
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server child process on a fixed port, which a test may stop, pause and start again."""

    port: int
    root: Path
    binary: str = field(default_factory=_redis_server_binary)
    options: tuple[str, ...] = ()  # more redis-server arguments, such as ("--requirepass", "secret")
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (again, on the same port, empty) and wait until it answers PING."""
        assert self.process is None, "already running"
        log = self.root / "server.log"
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.root), "--logfile", str(log), "--protected-mode", "no", *self.options]
        self.process = subprocess.Popen([self.binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _pings(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start:\n{log.read_text() if log.exists() else '(no log)'}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server as a crash would (SIGKILL: no goodbye to its clients), and wait for it to exit."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server frozen (SIGSTOP): connections are accepted by the kernel but never answered."""
        assert self.process is not None, "not running"
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@contextmanager
def running_redis(*options: str) -> Iterator[RedisServer]:
    root = Path(tempfile.mkdtemp(prefix="modelmax-redis-"))
    server = RedisServer(_free_port(), root, options=tuple(o.replace("{root}", str(root)) for o in options))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The session's shared server: tests keep apart by using key ids of their own."""
    with running_redis() as server:
        yield server.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A server for this test alone, which it may stop, pause and restart."""
    with running_redis() as server:
        yield server
