"""The migration runner on both real backends: numbered files applied once, also by concurrent start-ups."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from services.policy import migrations
from services.policy.migrations import Migration
from services.policy.store import MigrationError
from tests.policy_stores import Backend

EXTRA_SQL = "CREATE TABLE extra_table (x integer);\nINSERT INTO extra_table VALUES (1);\n"  # fails if run twice


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_files_are_numbered_from_one_without_gaps(dialect: migrations.Dialect) -> None:
    files = migrations.load(dialect)
    assert [m.version for m in files] == list(range(1, len(files) + 1))
    assert all(m.sql.strip() and len(m.checksum) == 64 for m in files)


async def test_migrations_are_applied_once_and_reopening_changes_nothing(backend: Backend) -> None:
    await backend.open()
    first = await backend.raw("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    files = migrations.load(backend.name)  # type: ignore[arg-type]
    assert [(r["version"], r["name"], r["checksum"]) for r in first] == [(m.version, m.name, m.checksum) for m in files]
    await backend.open()
    await backend.open()
    assert await backend.raw("SELECT version, name, checksum FROM schema_migrations ORDER BY version") == first


async def test_concurrent_start_ups_apply_each_file_once(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    real = migrations.load

    def with_extra(dialect: migrations.Dialect) -> list[Migration]:
        files = real(dialect)
        checksum = hashlib.sha256(EXTRA_SQL.encode()).hexdigest()
        return [*files, Migration(len(files) + 1, "extra", EXTRA_SQL, checksum)]

    monkeypatch.setattr(migrations, "load", with_extra)
    await asyncio.gather(*(backend.open() for _ in range(4)))  # four replicas starting on a fresh database
    versions = await backend.raw("SELECT version FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in versions] == list(range(1, len(real(backend.name)) + 2))  # type: ignore[arg-type]
    assert await backend.raw("SELECT x FROM extra_table") == [{"x": 1}]


async def test_an_edited_applied_migration_is_refused(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    await backend.open()
    real = migrations.load

    def edited(dialect: migrations.Dialect) -> list[Migration]:
        first, *rest = real(dialect)
        return [Migration(first.version, first.name, first.sql + "\n-- edited", "0" * 64), *rest]

    monkeypatch.setattr(migrations, "load", edited)
    with pytest.raises(MigrationError, match="edited after it was applied"):
        await backend.open()


async def test_a_version_unknown_to_this_release_is_tolerated(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    await backend.open()
    # a newer release applied a file this one does not have (migrations are additive, so this one still works)
    await backend.raw("INSERT INTO schema_migrations VALUES (9999, 'from_the_future', 'f', '2030-01-01')")
    store = await backend.open()
    assert await store.list_keys() == []
    assert "[9999]" in caplog.text and "does not know" in caplog.text


def test_pending_refuses_a_changed_checksum() -> None:
    m = Migration(1, "x", "SELECT 1", "a" * 64)
    assert migrations.pending(m, {})
    assert not migrations.pending(m, {1: "a" * 64})
    with pytest.raises(MigrationError):
        migrations.pending(m, {1: "b" * 64})
