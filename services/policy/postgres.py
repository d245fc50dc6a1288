"""PostgresStore: the production policy store (asyncpg, a small pool), shared by every replica of the gateway."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from asyncpg import Record
from asyncpg.pool import PoolConnectionProxy

from services.policy import migrations
from services.policy.keys import KeyRecord, KeySpec, hash_key, new_record, with_new_secret
from services.policy.store import (
    DEFAULT_HOLD,
    FORGET_LAPSED,
    KEY_COLUMNS,
    TOKEN_COLUMNS,
    USAGE_COLUMNS,
    BudgetState,
    GroupBy,
    KeyChanges,
    KeyNotFound,
    KeyRevoked,
    Reservation,
    UsageTotals,
    check_report_args,
    check_reserve_args,
    key_from_row,
    key_values,
    usage_values,
)
from services.policy.usage import UsageRecord

# pg_advisory_xact_lock's key for the migration runner: "mmpolicy" in ASCII, one bigint.
MIGRATION_LOCK = int.from_bytes(b"mmpolicy", "big")
_KEYS = ", ".join(KEY_COLUMNS)
_GROUP = {"key": "key_id", "model": "model", "day": "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"}


def _params(n: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + n))


class PostgresStore:
    """The Store protocol on PostgreSQL. Open with `await PostgresStore.open(dsn)`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 4, timeout: float = 10.0) -> PostgresStore:
        """Connects a pool and applies pending migrations. `timeout`: seconds for any one statement."""
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=timeout)
        try:
            await migrate(pool)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    # keys

    async def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        record, whole = new_record(spec, await self._now())
        sql = f"INSERT INTO api_keys ({_KEYS}) VALUES ({_params(len(KEY_COLUMNS))})"
        await self._pool.execute(sql, *key_values(record))
        return record, whole

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return _key(await self._pool.fetchrow(f"SELECT {_KEYS} FROM api_keys WHERE id = $1", key_id))

    async def find_by_hash(self, secret_hash: str) -> KeyRecord | None:
        return _key(await self._pool.fetchrow(f"SELECT {_KEYS} FROM api_keys WHERE secret_hash = $1", secret_hash))

    async def list_keys(self, *, owner: str | None = None, include_revoked: bool = True) -> list[KeyRecord]:
        where = "($1::text IS NULL OR owner = $1)" + ("" if include_revoked else " AND revoked_at IS NULL")
        rows = await self._pool.fetch(f"SELECT {_KEYS} FROM api_keys WHERE {where} ORDER BY created_at, id", owner)
        return [key_from_row(dict(row)) for row in rows]

    async def update_key(self, key_id: str, changes: KeyChanges) -> KeyRecord:
        return await self._replace_key(key_id, changes.apply)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        now = await self._now()
        return await self._replace_key(
            key_id, lambda r: r if r.revoked_at else replace(r, revoked_at=now), allow_revoked=True
        )

    async def rotate_key(self, key_id: str) -> tuple[KeyRecord, str]:
        whole = with_new_secret(key_id)
        return await self._replace_key(key_id, lambda r: replace(r, secret_hash=hash_key(whole))), whole

    async def _replace_key(
        self, key_id: str, change: Callable[[KeyRecord], KeyRecord], *, allow_revoked: bool = False
    ) -> KeyRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            current = _key(await conn.fetchrow(f"SELECT {_KEYS} FROM api_keys WHERE id = $1 FOR UPDATE", key_id))
            if current is None:
                raise KeyNotFound(key_id)
            if current.revoked_at is not None and not allow_revoked:
                raise KeyRevoked(key_id)
            record = change(current)
            assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(KEY_COLUMNS[1:], start=2))
            await conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = $1", *key_values(record))
            return record

    async def _now(self) -> datetime:
        """The database's clock: one clock for every replica, so their timestamps agree."""
        now: datetime = await self._pool.fetchval("SELECT now()")
        return now

    # usage

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        columns = ", ".join(USAGE_COLUMNS)
        sql = f"INSERT INTO usage_records ({columns}) VALUES ({_params(len(USAGE_COLUMNS))}) ON CONFLICT DO NOTHING"
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(sql, [usage_values(r) for r in records])

    async def usage_report(
        self, start: datetime, end: datetime, group_by: GroupBy, *, key_id: str | None = None
    ) -> list[UsageTotals]:
        check_report_args(start, end, group_by)
        sums = ", ".join(f"coalesce(sum({c}), 0)::bigint" for c in TOKEN_COLUMNS)
        one_key = "" if key_id is None else " AND key_id = $3"
        sql = (
            f"SELECT {_GROUP[group_by]} AS grp, count(*), {sums}, sum(cost_micros)::bigint, "
            f"count(*) - count(cost_micros) FROM usage_records WHERE started_at >= $1 AND started_at < $2{one_key} "
            "GROUP BY grp ORDER BY grp"
        )
        args = (start, end) if key_id is None else (start, end, key_id)
        return [UsageTotals(*row.values()) for row in await self._pool.fetch(sql, *args)]

    async def spent(self, key_id: str, since: datetime) -> int:
        sql = "SELECT coalesce(sum(cost_micros), 0)::bigint FROM usage_records WHERE key_id = $1 AND started_at >= $2"
        total: int = await self._pool.fetchval(sql, key_id, since)
        return total

    # budgets

    async def reserve(
        self,
        key_id: str,
        amount_micros: int,
        period_start: datetime,
        limit_micros: int,
        *,
        hold: timedelta = DEFAULT_HOLD,
    ) -> Reservation | None:
        check_reserve_args(amount_micros, period_start, limit_micros, hold)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO budget_windows (key_id, period_start) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                key_id,
                period_start,
            )
            # The window's row lock serialises every reservation and settlement of this key and period, on every
            # replica. Under READ COMMITTED each later statement takes a fresh snapshot, so once the lock is ours
            # the holds summed below include every reservation committed by the lock's previous owners.
            spent: int = await conn.fetchval(
                "SELECT spent_micros FROM budget_windows WHERE key_id = $1 AND period_start = $2 FOR UPDATE",
                key_id,
                period_start,
            )
            await conn.execute(
                "DELETE FROM budget_reservations "
                "WHERE key_id = $1 AND period_start = $2 AND expires_at <= now() - $3::interval",
                key_id,
                period_start,
                FORGET_LAPSED,
            )
            held: int = await conn.fetchval(
                "SELECT coalesce(sum(amount_micros), 0)::bigint FROM budget_reservations "
                "WHERE key_id = $1 AND period_start = $2 AND expires_at > now()",
                key_id,
                period_start,
            )
            if spent + held >= limit_micros:
                return None
            reservation = Reservation(uuid.uuid4().hex, key_id, period_start, amount_micros)
            await conn.execute(
                "INSERT INTO budget_reservations VALUES ($1, $2, $3, $4, now() + $5::interval)",
                reservation.id,
                key_id,
                period_start,
                amount_micros,
                hold,
            )
            return reservation

    async def settle(self, reservation: Reservation, actual_micros: int) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            # Lock the window first, as reserve does, so the two never wait on each other in opposite orders.
            await conn.execute(
                "SELECT 1 FROM budget_windows WHERE key_id = $1 AND period_start = $2 FOR UPDATE",
                reservation.key_id,
                reservation.period_start,
            )
            # The row is the proof the cost is not counted yet (a lapsed hold keeps its row for FORGET_LAPSED).
            if await conn.fetchval("DELETE FROM budget_reservations WHERE id = $1 RETURNING 1", reservation.id) is None:
                return False
            await conn.execute(
                "UPDATE budget_windows SET spent_micros = spent_micros + $3 WHERE key_id = $1 AND period_start = $2",
                reservation.key_id,
                reservation.period_start,
                actual_micros,
            )
            return True

    async def budget_state(self, key_id: str, period_start: datetime) -> BudgetState:
        row = await self._pool.fetchrow(
            "SELECT coalesce((SELECT spent_micros FROM budget_windows WHERE key_id = $1 AND period_start = $2), 0), "
            "(SELECT coalesce(sum(amount_micros), 0)::bigint FROM budget_reservations "
            " WHERE key_id = $1 AND period_start = $2 AND expires_at > now())",
            key_id,
            period_start,
        )
        assert row is not None  # a SELECT without FROM always returns its one row
        return BudgetState(row[0], row[1])


async def migrate(pool: asyncpg.Pool) -> None:
    """Applies pending migrations, each in its own transaction under one advisory lock.

    pg_advisory_xact_lock is released by the COMMIT or ROLLBACK itself, so a runner that dies cannot leave it held.
    Even CREATE TABLE IF NOT EXISTS runs under it: two sessions creating the same table at once can both miss it and
    one then fails on a duplicate catalog row.
    """
    files = migrations.load("postgres")
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for migration in files:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                applied = await _applied(conn)
                if migrations.pending(migration, applied):
                    await conn.execute(migration.sql)  # no arguments: the simple protocol, several statements
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
        migrations.warn_unknown(files, await _applied(conn))


async def _applied(conn: PoolConnectionProxy[Record]) -> dict[int, str]:
    return {row[0]: row[1] for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")}


def _key(row: Any) -> KeyRecord | None:
    return None if row is None else key_from_row(dict(row))
