"""Versioned schema migrations: numbered SQL files per dialect, and the checks both backends' runners share.

Why numbered SQL files applied at start-up, rather than `CREATE TABLE IF NOT EXISTS` or an external tool: every
replica of every version agrees on what schema it runs against (`schema_migrations` records each applied file with
its checksum), a change to a table is a new reviewable file instead of an edit nobody re-runs, a DBA can read or
apply the same files with psql or sqlite3, and no migration framework joins the dependencies. Each file is applied
once, in its own transaction (so a failing file leaves no half-changed schema), under a lock that makes concurrent
start-ups of several replicas take turns: PostgreSQL's transaction-scoped advisory lock, SQLite's BEGIN IMMEDIATE.

Files are forward-only and additive (expand, then contract in a later release), so a replica that is one release
behind keeps working against a schema one file ahead: a version the code does not know is logged, not fatal.
An applied file that has since been edited is fatal: the databases it ran on differ from those it would make now.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from services.policy.store import MigrationError

Dialect = Literal["sqlite", "postgres"]
log = logging.getLogger(__name__)
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str = ""
    checksum: str = ""


def load(dialect: Dialect) -> list[Migration]:
    """The dialect's migration files in order; numbered 1, 2, 3... with no gap and no duplicate."""
    found: list[Migration] = []
    for entry in resources.files(__name__).joinpath(dialect).iterdir():
        match = _FILE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise MigrationError(f"migration file {dialect}/{entry.name} is not named NNNN_lower_snake.sql")
            continue
        sql = entry.read_text(encoding="utf-8")
        checksum = hashlib.sha256(sql.encode()).hexdigest()
        found.append(Migration(int(match.group(1)), match.group(2), sql, checksum))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"{dialect} migrations must be numbered 1..N without gaps or duplicates: {versions}")
    return found


def pending(migration: Migration, applied: Mapping[int, str]) -> bool:
    """Whether `migration` still has to run, given {version: checksum} already applied; refuses an edited one."""
    checksum = applied.get(migration.version)
    if checksum is None:
        return True
    if checksum != migration.checksum:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name} was edited after it was applied "
            f"(checksum {checksum[:12]} in the database, {migration.checksum[:12]} on disk): add a new file instead"
        )
    return False


def warn_unknown(migrations: list[Migration], applied: Mapping[int, str]) -> None:
    unknown = sorted(set(applied) - {m.version for m in migrations})
    if unknown:
        log.warning("the database has migrations %s that this release does not know (a newer release ran)", unknown)
