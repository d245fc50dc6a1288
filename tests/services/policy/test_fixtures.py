"""The test fixtures themselves: a machine without PostgreSQL fails the PostgreSQL tests rather than skipping them."""

from __future__ import annotations

import glob

import pytest

from tests import policy_stores as conftest


def test_missing_postgresql_fails_loudly_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    with pytest.raises(pytest.fail.Exception, match="postgresql-15"):
        conftest._pg_bindir()


def test_the_newest_installed_postgresql_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [
        "/usr/lib/postgresql/9/bin/initdb",
        "/usr/lib/postgresql/15/bin/initdb",
        "/usr/lib/postgresql/13/bin/initdb",
    ]
    monkeypatch.setattr(glob, "glob", lambda pattern: found)
    assert str(conftest._pg_bindir()) == "/usr/lib/postgresql/15/bin"
