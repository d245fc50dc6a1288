"""Real policy stores for any test: a private PostgreSQL server per session, a fresh schema per test, SQLite files.

PostgreSQL refuses to run as root, so when the tests run as root the server's files belong to the `postgres` user
and its commands run through `runuser`. A missing PostgreSQL fails the tests that need it, loudly: a skipped
backend would let the shared-database guarantees (budgets across replicas, concurrent migrations) go untested.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.policy.postgres import PostgresStore
from services.policy.sqlite import SQLiteStore
from services.policy.store import Store

PG_USER = "modelmax"
INSTALL_HINT = "apt-get install -y --no-install-recommends postgresql-15"


@dataclass(frozen=True)
class PostgresServer:
    port: int
    database: str = "policy_tests"

    def dsn(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        pytest.fail(f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): {INSTALL_HINT}", pytrace=False)
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _pg_bindir()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="modelmax-pg-"))  # under /tmp: pytest's own tmp dirs are private to root
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=60)

    # Durability is not under test: no fsync makes initdb and every CREATE DATABASE several times faster.
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "-E", "UTF8", "--no-sync")
    port = _free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    try:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "30", "start")
    except subprocess.CalledProcessError:
        pytest.fail(f"postgres did not start:\n{log.read_text() if log.exists() else '(no log)'}", pytrace=False)
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PostgresServer.database)
        yield PostgresServer(port)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def fresh_database(server: PostgresServer) -> AsyncIterator[str]:
    """A DSN whose tables live in a schema made for one test alone (and dropped after it).

    A schema, not a database: CREATE DATABASE copies a template and costs about half a second a test on these
    machines, CREATE SCHEMA a few milliseconds. The stores name their tables unqualified, so `search_path` (which
    asyncpg takes from the DSN's query) is all that places them, migrations and `schema_migrations` included.
    """
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.dsn(server.database))
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield f"{server.dsn(server.database)}?search_path={schema}"
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()


@pytest.fixture
async def pg_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    async with fresh_database(postgres_server) as dsn:
        yield dsn


@dataclass
class Backend:
    """One test's database, and how to open stores ("replicas") on it and read its rows behind the store's back."""

    name: str
    _open: Callable[[], Awaitable[Store]]
    raw: Callable[[str], Awaitable[list[dict[str, Any]]]]  # runs SQL directly; returns rows as dicts
    opened: list[Store] = field(default_factory=list)

    async def open(self) -> Store:
        store = await self._open()
        self.opened.append(store)
        return store


def _sqlite_backend(path: Path) -> Backend:
    async def raw(sql: str) -> list[dict[str, Any]]:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql)]
        finally:
            conn.close()

    return Backend("sqlite", lambda: SQLiteStore.open(path), raw)


def _postgres_backend(dsn: str) -> Backend:
    async def raw(sql: str) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return Backend("postgres", lambda: PostgresStore.open(dsn), raw)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            made = _sqlite_backend(tmp_path / ".modelmax" / "policy.sqlite3")
        else:  # the server is looked up only here, so SQLite-only runs never start it
            server = request.getfixturevalue("postgres_server")
            made = _postgres_backend(await stack.enter_async_context(fresh_database(server)))
        try:
            yield made
        finally:
            await asyncio.gather(*(store.close() for store in made.opened))


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
