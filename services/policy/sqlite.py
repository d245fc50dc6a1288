"""SQLiteStore: the embedded policy store, one database file (WAL) driven from one worker thread.

Why the stdlib and not aiosqlite: aiosqlite is the same design (one thread per connection, calls handed to it), so
it would add a dependency without removing a thread, and owning the thread means each operation is one plain
function run start to finish there: its BEGIN IMMEDIATE ... COMMIT cannot interleave with another task's statements
on the same connection. Processes sharing the file (replicas on one host) take turns through SQLite's own lock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")
DEFAULT_PATH = Path(".modelmax") / "policy.sqlite3"
_GROUP = {"key": "key_id", "model": "model", "day": "substr(started_at, 1, 10)"}
_KEYS = ", ".join(KEY_COLUMNS)


class SQLiteStore:
    """The Store protocol on one SQLite file. Open with `await SQLiteStore.open(path)`."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self._conn = conn  # used only on the executor's one thread

    @classmethod
    async def open(cls, path: str | Path = DEFAULT_PATH, *, busy_timeout: float = 5.0) -> SQLiteStore:
        """Opens (creating) the file and applies pending migrations. `busy_timeout`: how long a write waits for
        another process's write transaction before failing."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-sqlite")

        def connect() -> sqlite3.Connection:
            # isolation_level=None: no implicit transactions; each write below says BEGIN IMMEDIATE itself
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            _enable_wal(conn, busy_timeout)  # readers never block the writer, nor it them
            conn.execute("PRAGMA synchronous=NORMAL")  # safe in WAL: a power cut loses the last commits, never the file
            conn.execute("PRAGMA cache_size=-16384")  # 16 MiB of pages (the default is 2): the indexes stay in memory
            conn.execute("PRAGMA foreign_keys=ON")
            try:
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    async def close(self) -> None:
        await self._run(lambda conn: conn.close())
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)

    # keys

    async def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        record, whole = new_record(spec, datetime.now(UTC))

        def insert(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute(
                    f"INSERT INTO api_keys ({_KEYS}) VALUES ({', '.join('?' * len(KEY_COLUMNS))})", _key_row(record)
                )

        await self._run(insert)
        return record, whole

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._run(lambda conn: _one_key(conn, "id = ?", key_id))

    async def find_by_hash(self, secret_hash: str) -> KeyRecord | None:
        return await self._run(lambda conn: _one_key(conn, "secret_hash = ?", secret_hash))

    async def list_keys(self, *, owner: str | None = None, include_revoked: bool = True) -> list[KeyRecord]:
        where = "(? IS NULL OR owner = ?)" + ("" if include_revoked else " AND revoked_at IS NULL")
        sql = f"SELECT {_KEYS} FROM api_keys WHERE {where} ORDER BY created_at, id"
        return await self._run(lambda conn: [_key(row) for row in conn.execute(sql, (owner, owner))])

    async def update_key(self, key_id: str, changes: KeyChanges) -> KeyRecord:
        return await self._run(lambda conn: _replace_key(conn, key_id, changes.apply))

    async def revoke_key(self, key_id: str) -> KeyRecord:
        now = datetime.now(UTC)

        def revoke(record: KeyRecord) -> KeyRecord:
            return record if record.revoked_at else replace(record, revoked_at=now)

        return await self._run(lambda conn: _replace_key(conn, key_id, revoke, allow_revoked=True))

    async def rotate_key(self, key_id: str) -> tuple[KeyRecord, str]:
        whole = with_new_secret(key_id)
        record = await self._run(
            lambda conn: _replace_key(conn, key_id, lambda r: replace(r, secret_hash=hash_key(whole)))
        )
        return record, whole

    # usage

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        rows = [_usage_row(r) for r in records]
        marks = ", ".join("?" * len(USAGE_COLUMNS))
        sql = f"INSERT INTO usage_records ({', '.join(USAGE_COLUMNS)}) VALUES ({marks}) ON CONFLICT DO NOTHING"

        def insert(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.executemany(sql, rows)

        await self._run(insert)

    async def usage_report(
        self, start: datetime, end: datetime, group_by: GroupBy, *, key_id: str | None = None
    ) -> list[UsageTotals]:
        check_report_args(start, end, group_by)
        sums = ", ".join(f"coalesce(sum({c}), 0)" for c in TOKEN_COLUMNS)
        one_key = "" if key_id is None else " AND key_id = ?"
        sql = (
            f"SELECT {_GROUP[group_by]} AS grp, count(*), {sums}, sum(cost_micros), count(*) - count(cost_micros) "
            f"FROM usage_records WHERE started_at >= ? AND started_at < ?{one_key} GROUP BY grp ORDER BY grp"
        )
        args = (_t(start), _t(end)) if key_id is None else (_t(start), _t(end), key_id)

        def report(conn: sqlite3.Connection) -> list[UsageTotals]:
            rows = conn.execute(sql, args).fetchall()
            return [UsageTotals(*row) for row in rows]

        return await self._run(report)

    async def spent(self, key_id: str, since: datetime) -> int:
        sql = "SELECT coalesce(sum(cost_micros), 0) FROM usage_records WHERE key_id = ? AND started_at >= ?"
        return await self._run(lambda conn: int(conn.execute(sql, (key_id, _t(since))).fetchone()[0]))

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
        window = (key_id, _t(period_start))

        def reserve(conn: sqlite3.Connection) -> Reservation | None:
            now = datetime.now(UTC)
            # BEGIN IMMEDIATE takes the database's write lock before the first read, so the spend and holds read
            # here cannot change until COMMIT, in this process or any other sharing the file.
            with _write(conn):
                conn.execute(
                    "INSERT INTO budget_windows (key_id, period_start) VALUES (?, ?) ON CONFLICT DO NOTHING", window
                )
                conn.execute(
                    "DELETE FROM budget_reservations WHERE key_id = ? AND period_start = ? AND expires_at <= ?",
                    (*window, _t(now - FORGET_LAPSED)),
                )
                spent, held = conn.execute(
                    "SELECT spent_micros, (SELECT coalesce(sum(amount_micros), 0) FROM budget_reservations r "
                    "WHERE r.key_id = w.key_id AND r.period_start = w.period_start AND r.expires_at > ?) "
                    "FROM budget_windows w WHERE key_id = ? AND period_start = ?",
                    (_t(now), *window),
                ).fetchone()
                if spent + held >= limit_micros:
                    return None
                reservation = Reservation(uuid.uuid4().hex, key_id, period_start, amount_micros)
                conn.execute(
                    "INSERT INTO budget_reservations VALUES (?, ?, ?, ?, ?)",
                    (reservation.id, *window, amount_micros, _t(now + hold)),
                )
                return reservation

        return await self._run(reserve)

    async def settle(self, reservation: Reservation, actual_micros: int) -> bool:
        window = (reservation.key_id, _t(reservation.period_start))

        def settle(conn: sqlite3.Connection) -> bool:
            with _write(conn):
                # The row is the proof the cost is not counted yet (a lapsed hold keeps its row for FORGET_LAPSED)
                if not conn.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation.id,)).rowcount:
                    return False
                conn.execute(
                    "UPDATE budget_windows SET spent_micros = spent_micros + ? WHERE key_id = ? AND period_start = ?",
                    (actual_micros, *window),
                )
                return True

        return await self._run(settle)

    async def budget_state(self, key_id: str, period_start: datetime) -> BudgetState:
        window = (key_id, _t(period_start))

        def state(conn: sqlite3.Connection) -> BudgetState:
            row = conn.execute(
                "SELECT spent_micros FROM budget_windows WHERE key_id = ? AND period_start = ?", window
            ).fetchone()
            held = conn.execute(
                "SELECT coalesce(sum(amount_micros), 0) FROM budget_reservations "
                "WHERE key_id = ? AND period_start = ? AND expires_at > ?",
                (*window, _t(datetime.now(UTC))),
            ).fetchone()[0]
            return BudgetState(row[0] if row else 0, held)

        return await self._run(state)


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _enable_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Switch the file to WAL. The switch needs the file to itself and SQLite answers "database is locked" at once,
    without its busy handler, while another process opens it too (replicas starting together): retry until
    `busy_timeout`."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _migrate(conn: sqlite3.Connection) -> None:
    files = migrations.load("sqlite")
    with _write(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "checksum TEXT NOT NULL, applied_at TEXT NOT NULL) STRICT"
        )
    for migration in files:
        with _write(conn):  # re-read under the lock: another process may have applied it meanwhile
            applied = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            if not migrations.pending(migration, applied):
                continue
            # executescript() would COMMIT first; statement by statement keeps the file inside this transaction
            statement = ""
            for line in migration.sql.splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                (migration.version, migration.name, migration.checksum, _t(datetime.now(UTC))),
            )
    migrations.warn_unknown(files, dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()))


def _one_key(conn: sqlite3.Connection, where: str, value: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_KEYS} FROM api_keys WHERE {where}", (value,)).fetchone()
    return None if row is None else _key(row)


def _replace_key(
    conn: sqlite3.Connection, key_id: str, change: Callable[[KeyRecord], KeyRecord], *, allow_revoked: bool = False
) -> KeyRecord:
    with _write(conn):
        current = _one_key(conn, "id = ?", key_id)
        if current is None:
            raise KeyNotFound(key_id)
        if current.revoked_at is not None and not allow_revoked:
            raise KeyRevoked(key_id)
        record = change(current)
        assignments = ", ".join(f"{c} = ?" for c in KEY_COLUMNS[1:])
        conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = ?", (*_key_row(record)[1:], key_id))
        return record


def _t(value: datetime) -> str:
    # The year by hand: strftime's %Y does not pad years below 1000 to four digits on every libc, and a short year
    # would break the fixed width that makes text order time order.
    utc = value.astimezone(UTC)
    return f"{utc.year:04d}-" + utc.strftime("%m-%dT%H:%M:%S.%fZ")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _key_row(r: KeyRecord) -> list[Any]:
    values = key_values(r)
    models = values[KEY_COLUMNS.index("allowed_models")]
    values[KEY_COLUMNS.index("allowed_models")] = None if models is None else json.dumps(models)
    return [_t(v) if isinstance(v, datetime) else v for v in values]


def _key(row: sqlite3.Row) -> KeyRecord:
    decoded = {c: row[c] for c in KEY_COLUMNS}
    for column in ("created_at", "expires_at", "revoked_at"):
        decoded[column] = _dt(decoded[column])
    if decoded["allowed_models"] is not None:
        decoded["allowed_models"] = json.loads(decoded["allowed_models"])
    return key_from_row(decoded)


def _usage_row(r: UsageRecord) -> list[Any]:
    return [_t(v) if isinstance(v, datetime) else v for v in usage_values(r)]
