"""Who is calling: API keys, usage metering, prices and budgets, kept in SQLite (embedded) or PostgreSQL (shared)."""

from __future__ import annotations

from pathlib import Path

from services.policy.store import Store

__all__ = ["Store", "open_store"]


async def open_store(url: str) -> Store:
    """A store for `url`: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, or a `postgresql://` DSN.

    The backends are imported here, not at the top, so that asyncpg is needed only where PostgreSQL is used.
    """
    if url.startswith("sqlite:///"):
        from services.policy.sqlite import SQLiteStore

        return await SQLiteStore.open(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from services.policy.postgres import PostgresStore

        return await PostgresStore.open(url)
    raise ValueError(f"policy store URL must start with sqlite:/// or postgresql://, got {url.split(':', 1)[0]!r}")
