"""`modelmax keys` on real stores: what each command prints, and what it did to the store (the keys it made
authenticate, a revoked or rotated-out key is refused). Commands run through a parser built as `startup.cli` builds it.

The commands call asyncio.run themselves, so these tests are plain functions, and they check the store with their
own asyncio.run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from services.policy import open_store
from services.policy.cache import DEFAULT_TTL, KeyCache, KeyRefused
from services.policy.keys import Budget, KeyKind, KeyRecord, KeySpec, parse_key, window_start
from services.policy.sqlite import DEFAULT_PATH
from services.policy.store import Store
from services.policy.usage import UsageRecord
from startup.keys import DEFAULT_DATABASE, add_commands

T = TypeVar("T")
TTL = f"{DEFAULT_TTL:g} s"
MAY = ("--from", "2026-05-01", "--to", "2026-06-01")


@dataclass(frozen=True)
class Result:
    status: int
    out: str
    err: str


class Cli(Protocol):
    def __call__(self, *argv: str) -> Result: ...


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """`modelmax keys ARGV...`, with no --database added."""

    def run(*argv: str) -> Result:
        parser = argparse.ArgumentParser(prog="modelmax")
        add_commands(parser.add_subparsers(title="commands", metavar="COMMAND", required=True))
        args = parser.parse_args(["keys", *argv])
        capsys.readouterr()
        status: int = args.command(args)
        captured = capsys.readouterr()
        return Result(status, captured.out, captured.err)

    return run


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'policy.sqlite3'}"  # tmp_path is absolute: sqlite:////tmp/...


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    dsn: str = request.getfixturevalue("pg_dsn")  # an async fixture: pytest-asyncio runs it for this sync one
    return dsn


def bind(cli: Cli, url: str) -> Cli:
    return lambda *argv: cli(*argv, "--database", url)


@pytest.fixture
def keys(cli: Cli, sqlite_url: str) -> Cli:
    """`modelmax keys ARGV... --database <a SQLite file of this test's>`."""
    return bind(cli, sqlite_url)


def on_store(url: str, work: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = await open_store(url)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def get(url: str, key_id: str) -> KeyRecord:
    record = on_store(url, lambda store: store.get_key(key_id))
    assert record is not None
    return record


def authenticate(url: str, whole: str, kind: KeyKind = "inference") -> KeyRecord:
    """What a gateway starting now (an empty cache) makes of the key."""
    return on_store(url, lambda store: KeyCache(store).authenticate(whole, kind=kind))


def refusal(url: str, whole: str, kind: KeyKind = "inference") -> str:
    try:
        authenticate(url, whole, kind)
    except KeyRefused as refused:
        return refused.reason
    raise AssertionError("the key was accepted")


def key_id_of(whole: str) -> str:
    parsed = parse_key(whole)
    assert parsed is not None, whole
    return parsed.key_id


def create_directly(url: str, spec: KeySpec) -> KeyRecord:
    record, _ = on_store(url, lambda store: store.create_key(spec))
    return record


def when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def usage(request_id: str, key_id: str, model: str, started_at: datetime, **counts: Any) -> UsageRecord:
    return UsageRecord(request_id, key_id, model, f"{model}-1", "fake", started_at, **counts)


# ---- the whole life of a key, on both stores ----


def test_create_list_show_update_usage_rotate_revoke(cli: Cli, database_url: str) -> None:
    keys = bind(cli, database_url)
    before = datetime.now(UTC)
    created = keys("create", "--name", "ci", "--owner", "team-a", "--models", "small,large", "--budget", "5",
                   "--expires", "30d", "--rpm", "60")  # fmt: skip
    after = datetime.now(UTC)
    assert created.status == 0, created.err
    whole = created.out.removesuffix("\n")
    assert "\n" not in whole  # the key alone, on one line
    key_id = key_id_of(whole)
    record = authenticate(database_url, whole)
    assert (record.id, record.name, record.owner, record.kind) == (key_id, "ci", "team-a", "inference")
    assert record.allowed_models == frozenset({"small", "large"})
    assert record.budget == Budget(5_000_000, "month")
    assert (record.rpm, record.tpm, record.max_concurrent, record.revoked_at) == (60, None, None, None)
    assert record.expires_at is not None and before + timedelta(days=30) <= record.expires_at
    assert record.expires_at <= after + timedelta(days=30)
    assert created.err.splitlines() == [
        f'created key {key_id} ("ci", inference)',
        "  models:   large,small",
        "  budget:   $5.00/month",
        f"  expires:  {when(record.expires_at)}",
        "The key above is shown once: store it now.",
    ]
    assert whole not in created.err

    listed = keys("list")
    assert (listed.status, listed.err) == (0, "")
    assert listed.out.splitlines() == [
        "id            name  owner   kind       models       budget       status  created",
        f"{key_id}  ci    team-a  inference  large,small  $5.00/month  active  {when(record.created_at)}",
    ]
    as_json = {
        "id": key_id,
        "name": "ci",
        "owner": "team-a",
        "kind": "inference",
        "models": ["large", "small"],
        "budget": {"amount_usd": "5.00", "amount_micros": 5_000_000, "period": "month"},
        "status": "active",
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": None,
        "rpm": 60,
        "tpm": None,
        "max_concurrent": None,
    }
    assert json.loads(keys("list", "--json").out) == [as_json]

    # a settled request and one in flight in this month's budget window
    period = window_start("month", datetime.now(UTC))

    async def spend(store: Store) -> None:
        settled = await store.reserve(key_id, 1_300_000, period, 5_000_000)
        assert settled is not None and await store.settle(settled, 1_250_000)
        assert await store.reserve(key_id, 100_000, period, 5_000_000) is not None

    on_store(database_url, spend)
    shown = keys("show", key_id)
    assert shown.status == 0, shown.err
    assert shown.out.splitlines() == [
        f"id:             {key_id}",
        "name:           ci",
        "owner:          team-a",
        "kind:           inference",
        "status:         active",
        f"created:        {when(record.created_at)}",
        f"expires:        {when(record.expires_at)}",
        "revoked:        -",
        "models:         large,small",
        "budget:         $5.00/month",
        "rpm:            60",
        "tpm:            no limit",
        "max concurrent: no limit",
        f"this period:    since {when(period)}",
        "  spent:        $1.25",
        "  held:         $0.10 (requests in flight)",
        "  remaining:    $3.65",
    ]
    assert json.loads(keys("show", key_id, "--json").out) == as_json | {
        "budget_state": {
            "period_start": iso(period),
            "spent_usd": "1.25",
            "spent_micros": 1_250_000,
            "held_usd": "0.10",
            "held_micros": 100_000,
            "remaining_usd": "3.65",
            "remaining_micros": 3_650_000,
        }
    }

    updated = keys("update", key_id, "--name", "ci-2", "--budget", "0.25", "--period", "day", "--all-models",
                   "--no-rpm", "--tpm", "1000")  # fmt: skip
    assert updated.status == 0, updated.err
    assert updated.out.splitlines()[0] == f"updated key {key_id}"
    assert "budget:         $0.25/day" in updated.out.splitlines()
    changed = dataclasses.replace(
        record, name="ci-2", budget=Budget(250_000, "day"), allowed_models=None, rpm=None, tpm=1000
    )
    assert get(database_url, key_id) == changed  # and nothing else changed: owner, expiry, secret
    assert authenticate(database_url, whole) == changed

    may = datetime(2026, 5, 1, tzinfo=UTC)
    records = [
        usage("r1", key_id, "small", may + timedelta(hours=9), prompt_tokens=1000, cached_tokens=200,
              completion_tokens=300, reasoning_tokens=50, cost_micros=1234),
        usage("r2", key_id, "small", may + timedelta(days=1), prompt_tokens=10, completion_tokens=5, cost_micros=6),
        usage("r3", key_id, "large", may + timedelta(days=2), prompt_tokens=7),  # unpriced
        usage("r4", key_id, "small", may - timedelta(microseconds=1), cost_micros=999),  # April
        usage("r5", key_id, "small", datetime(2026, 6, 1, tzinfo=UTC), cost_micros=999),  # June: --to is excluded
    ]  # fmt: skip
    on_store(database_url, lambda store: store.record_usage(records))
    report = keys("usage", *MAY, "--group-by", "model", "--json")
    assert report.status == 0, report.err
    assert json.loads(report.out) == {
        "from": "2026-05-01T00:00:00Z",
        "to": "2026-06-01T00:00:00Z",
        "group_by": "model",
        "rows": [
            {"group": "large", "requests": 1, "prompt_tokens": 7, "cached_tokens": 0, "completion_tokens": 0,
             "reasoning_tokens": 0, "cost_usd": None, "cost_micros": None, "unpriced_requests": 1},
            {"group": "small", "requests": 2, "prompt_tokens": 1010, "cached_tokens": 200, "completion_tokens": 305,
             "reasoning_tokens": 50, "cost_usd": "0.00124", "cost_micros": 1240, "unpriced_requests": 0},
        ],
    }  # fmt: skip
    by_key = keys("usage", *MAY)
    assert by_key.out.splitlines() == [
        "usage from 2026-05-01T00:00:00Z to 2026-06-01T00:00:00Z (excluded), by key",
        "key           name  requests  prompt  cached  completion  reasoning      cost",
        f"{key_id}  ci-2         3   1,017     200         305         50  $0.00124  unpriced: 1",
    ]

    rotated = keys("rotate", key_id)
    assert rotated.status == 0, rotated.err
    new_whole = rotated.out.removesuffix("\n")
    assert "\n" not in new_whole and new_whole != whole and key_id_of(new_whole) == key_id
    assert refusal(database_url, whole) == "wrong_secret"
    assert authenticate(database_url, new_whole) == dataclasses.replace(
        changed, secret_hash=get(database_url, key_id).secret_hash
    )
    assert rotated.err.splitlines() == [
        f'rotated key {key_id} ("ci-2", inference)',
        "  models:   all",
        "  budget:   $0.25/day",
        f"  expires:  {when(record.expires_at)}",
        f"The old key keeps working on running gateway replicas for at most {TTL} (the default key cache TTL).",
        "The new key above is shown once: store it now.",
    ]

    revoked = keys("revoke", key_id)
    assert revoked.status == 0, revoked.err
    revoked_at = get(database_url, key_id).revoked_at
    assert revoked_at is not None
    assert revoked.out == (
        f"revoked key {key_id} (ci-2) at {when(revoked_at)}; running gateway replicas refuse it within {TTL} "
        "(the default key cache TTL)\n"
    )
    assert refusal(database_url, new_whole) == "revoked"
    again = keys("revoke", key_id)
    assert (again.status, again.out) == (0, f"key {key_id} (ci-2) was already revoked at {when(revoked_at)}\n")
    assert get(database_url, key_id).revoked_at == revoked_at  # the first time is kept

    final = f"modelmax keys: key {key_id} is revoked, which is final: it can be neither updated nor rotated\n"
    assert keys("update", key_id, "--name", "back") == Result(1, "", final)
    assert keys("rotate", key_id) == Result(1, "", final)
    assert get(database_url, key_id).name == "ci-2"
    assert refusal(database_url, new_whole) == "revoked"
    assert keys("list", "--active") == Result(0, "no keys\n", "")
    assert json.loads(keys("list", "--json").out)[0]["status"] == "revoked"


# ---- create ----


@pytest.mark.parametrize(
    ("budget", "micros", "shown"),
    [("5", 5_000_000, "5.00"), ("0.25", 250_000, "0.25"), ("12.50", 12_500_000, "12.50"),
     ("1.000001", 1_000_001, "1.000001"), ("0.000001", 1, "0.000001"), ("2.5e3", 2_500_000_000, "2500.00")],
)  # fmt: skip
def test_a_budget_in_usd_is_kept_exactly_in_micro_usd(keys: Cli, sqlite_url: str, budget: str, micros: int,
                                                       shown: str) -> None:  # fmt: skip
    created = keys("create", "--name", "b", "--budget", budget, "--period", "total")
    assert created.status == 0, created.err
    assert get(sqlite_url, key_id_of(created.out.strip())).budget == Budget(micros, "total")
    assert json.loads(keys("list", "--json").out)[0]["budget"] == {
        "amount_usd": shown,
        "amount_micros": micros,
        "period": "total",
    }
    assert keys("list").out.splitlines()[1].split()[5:7] == [f"${shown}", "total"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "0"], "--budget must be more than 0, got 0 (leave it out for no budget)"),
        (["--budget", "-3"], "--budget must be more than 0, got -3 (leave it out for no budget)"),
        (["--budget", "1.0000001"], "--budget 1.0000001 has more than 6 decimal places (budgets are counted in "
                                    "micro-USD)"),
        (["--budget", "abc"], "--budget is an amount of USD such as 5 or 0.25, got 'abc'"),
        (["--budget", "nan"], "--budget is an amount of USD such as 5 or 0.25, got 'nan'"),
        (["--budget", "1e30"], "--budget 1e30 is more than the store can hold"),
        (["--period", "day"], "--period is the period of a budget: give --budget too"),
        (["--management", "--budget", "5"], "a management key cannot have --budget: it manages keys and never "
                                            "calls models"),
        (["--management", "--models", "a", "--rpm", "3"], "a management key cannot have --models or --rpm: it "
                                                          "manages keys and never calls models"),
        (["--expires", "2020-01-01"], "--expires 2020-01-01 is not in the future (revoke a key to stop it now)"),
        (["--expires", "0d"], "--expires 0d is not in the future (revoke a key to stop it now)"),
        (["--expires", "99999999999d"], "--expires 99999999999d is too far away"),
        (["--expires", "soon"], "--expires takes an ISO-8601 date or time (2026-07-01, 2026-07-01T12:00:00+02:00) "
                                "or a duration (30d, 12h, 45m), got 'soon'"),
        (["--models", " , "], "--models needs one or more model names, comma-separated (leave it out for every "
                              "model)"),
        (["--rpm", "0"], "--rpm must be from 1 to 2147483647, got 0 (leave it out for no limit)"),
        (["--max-concurrent", "2147483648"], "--max-concurrent must be from 1 to 2147483647, got 2147483648 (leave "
                                             "it out for no limit)"),
        (["--name", " "], "--name must not be empty"),
    ],
)  # fmt: skip
def test_create_refuses_bad_values_before_touching_the_store(keys: Cli, tmp_path: Path, flags: list[str],
                                                             message: str) -> None:  # fmt: skip
    assert keys("create", "--name", "k", *flags) == Result(2, "", f"modelmax keys: {message}\n")
    assert not (tmp_path / "policy.sqlite3").exists()  # refused before the store was opened


def test_expiry_as_a_time_or_a_duration(keys: Cli, sqlite_url: str) -> None:
    def expiry(value: str) -> datetime | None:
        created = keys("create", "--name", "e", "--expires", value)
        assert created.status == 0, created.err
        return get(sqlite_url, key_id_of(created.out.strip())).expires_at

    assert expiry("2031-01-02T03:04:05") == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)  # naive: UTC
    assert expiry("2031-01-02T03:04:05+02:00") == datetime(2031, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert expiry("2031-01-02T03:04:05Z") == datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert expiry("2031-01-02") == datetime(2031, 1, 2, tzinfo=UTC)
    for value, length in (("12h", timedelta(hours=12)), ("45m", timedelta(minutes=45)), ("2d", timedelta(days=2))):
        before = datetime.now(UTC)
        got = expiry(value)
        assert got is not None and before + length <= got <= datetime.now(UTC) + length


def test_a_management_key_manages_and_never_infers(keys: Cli, sqlite_url: str) -> None:
    created = keys("create", "--name", "admin", "--owner", "ops", "--management", "--expires", "2031-01-01")
    assert created.status == 0, created.err
    whole = created.out.strip()
    record = authenticate(sqlite_url, whole, kind="management")
    assert (record.kind, record.allowed_models, record.budget, record.rpm) == ("management", None, None, None)
    assert refusal(sqlite_url, whole) == "wrong_kind"
    assert created.err.splitlines() == [
        f'created key {record.id} ("admin", management)',
        "  expires:  2031-01-01T00:00:00Z",
        "The key above is shown once: store it now.",
    ]
    assert keys("list").out.splitlines()[1].split()[:6] == [record.id, "admin", "ops", "management", "-", "-"]
    refused = keys("update", record.id, "--budget", "1", "--rpm", "5")
    assert refused == Result(2, "", f"modelmax keys: key {record.id} is a management key, which cannot have "
                                    "--budget or --rpm\n")  # fmt: skip
    assert get(sqlite_url, record.id) == record


# ---- list and show ----


def test_list_filters_and_statuses(keys: Cli, sqlite_url: str) -> None:
    now = datetime.now(UTC)
    live = create_directly(sqlite_url, KeySpec("live", owner="acme", budget=Budget(1_500_000, "total")))
    expired = create_directly(sqlite_url, KeySpec("old", owner="acme", expires_at=now - timedelta(seconds=1)))
    gone = create_directly(sqlite_url, KeySpec("gone", owner="acme", allowed_models=frozenset({"m"})))
    other = create_directly(sqlite_url, KeySpec("other", owner="", budget=Budget(20_000, "day")))
    on_store(sqlite_url, lambda store: store.revoke_key(gone.id))

    rows = [line.split() for line in keys("list").out.splitlines()]
    assert rows == [
        ["id", "name", "owner", "kind", "models", "budget", "status", "created"],
        [live.id, "live", "acme", "inference", "all", "$1.50", "total", "active", when(live.created_at)],
        [expired.id, "old", "acme", "inference", "all", "-", "expired", when(expired.created_at)],
        [gone.id, "gone", "acme", "inference", "m", "-", "revoked", when(gone.created_at)],
        [other.id, "other", "-", "inference", "all", "$0.02/day", "active", when(other.created_at)],
    ]
    assert [row.split()[0] for row in keys("list", "--owner", "acme", "--active").out.splitlines()] == ["id", live.id]
    listed = json.loads(keys("list", "--owner", "acme", "--json").out)
    assert [(k["id"], k["status"], k["models"]) for k in listed] == [
        (live.id, "active", None),
        (expired.id, "expired", None),
        (gone.id, "revoked", ["m"]),
    ]
    revoked_at = get(sqlite_url, gone.id).revoked_at
    assert revoked_at is not None and listed[2]["revoked_at"] == iso(revoked_at)
    assert keys("list", "--owner", "nobody") == Result(0, "no keys\n", "")
    assert json.loads(keys("list", "--owner", "nobody", "--json").out) == []


def test_show_a_key_without_a_budget(keys: Cli, sqlite_url: str) -> None:
    record = create_directly(sqlite_url, KeySpec("plain", max_concurrent=3, tpm=12_000))
    shown = keys("show", record.id)
    assert shown.out.splitlines()[-6:] == [
        "revoked:        -",
        "models:         all",
        "budget:         -",
        "rpm:            no limit",
        "tpm:            12,000",
        "max concurrent: 3",
    ]
    as_json = json.loads(keys("show", record.id, "--json").out)
    assert (as_json["budget"], as_json["budget_state"], as_json["max_concurrent"]) == (None, None, 3)


# ---- update ----


def test_update_changes_only_what_the_flags_name(keys: Cli, sqlite_url: str) -> None:
    record = create_directly(sqlite_url, KeySpec("k", owner="o", budget=Budget(3_000_000, "day"), rpm=10,
                                                 expires_at=datetime(2031, 1, 1, tzinfo=UTC)))  # fmt: skip

    def update(*flags: str) -> KeyRecord:
        result = keys("update", record.id, *flags)
        assert result.status == 0, result.err
        return get(sqlite_url, record.id)

    assert update("--owner", "p") == dataclasses.replace(record, owner="p")
    assert update("--budget", "2").budget == Budget(2_000_000, "day")  # the period is kept
    assert update("--period", "total").budget == Budget(2_000_000, "total")  # and the amount
    assert update("--models", "a, b,").allowed_models == frozenset({"a", "b"})
    assert update("--expires", "2032-02-02T00:00:00+01:00").expires_at == datetime(2032, 2, 1, 23, tzinfo=UTC)
    final = update("--no-budget", "--no-expiry", "--no-rpm", "--max-concurrent", "2")
    assert final == dataclasses.replace(
        record, owner="p", budget=None, allowed_models=frozenset({"a", "b"}), expires_at=None, rpm=None,
        max_concurrent=2,
    )  # fmt: skip
    no_budget = f"modelmax keys: key {record.id} has no budget to change the period of: give --budget too\n"
    assert keys("update", record.id, "--period", "day") == Result(2, "", no_budget)
    assert update("--budget", "1").budget == Budget(1_000_000, "month")  # a new budget's period: month by default
    with_no_budget = "modelmax keys: --period is the period of a budget: it cannot go with --no-budget\n"
    assert keys("update", record.id, "--no-budget", "--period", "day") == Result(2, "", with_no_budget)
    nothing = "modelmax keys: nothing to change: give at least one flag (see modelmax keys update --help)\n"
    assert keys("update", record.id) == Result(2, "", nothing)
    past = "modelmax keys: --expires 2001-01-01 is not in the future (revoke a key to stop it now)\n"
    assert keys("update", record.id, "--expires", "2001-01-01") == Result(2, "", past)
    assert get(sqlite_url, record.id).budget == Budget(1_000_000, "month")


# ---- usage ----


def test_usage_report_tables_and_unpriced_groups(keys: Cli, sqlite_url: str) -> None:
    alpha = create_directly(sqlite_url, KeySpec("alpha"))
    beta = create_directly(sqlite_url, KeySpec("beta"))
    unknown = "qqqqqqqqqqqq"  # usage for a key this store has never had
    day = datetime(2026, 5, 1, tzinfo=UTC)
    records = [
        usage("r1", alpha.id, "m1", day + timedelta(hours=9), prompt_tokens=1000, cached_tokens=200,
              completion_tokens=300, reasoning_tokens=50, cost_micros=1234),
        usage("r2", alpha.id, "m2", day + timedelta(days=1, hours=10), prompt_tokens=10, completion_tokens=5),
        usage("r3", beta.id, "m1", day + timedelta(days=2, microseconds=-1), prompt_tokens=2_000_000,
              completion_tokens=1, cost_micros=2_500_000),
        usage("r4", unknown, "m3", day + timedelta(days=2)),
        usage("r5", alpha.id, "m1", datetime(2026, 6, 1, tzinfo=UTC), cost_micros=999),
        usage("r6", alpha.id, "m1", day - timedelta(microseconds=1), cost_micros=999),
    ]  # fmt: skip
    on_store(sqlite_url, lambda store: store.record_usage(records))

    by_model = keys("usage", *MAY, "--group-by", "model")
    assert by_model.status == 0, by_model.err
    assert by_model.out.splitlines() == [
        "usage from 2026-05-01T00:00:00Z to 2026-06-01T00:00:00Z (excluded), by model",
        "model  requests     prompt  cached  completion  reasoning       cost",
        "m1            2  2,001,000     200         301         50  $2.501234",
        "m2            1         10       0           5          0          -  unpriced: 1",
        "m3            1          0       0           0          0          -  unpriced: 1",
        "total         4  2,001,010     200         306         50  $2.501234  unpriced: 2",
    ]

    by_day = json.loads(keys("usage", *MAY, "--group-by", "day", "--json").out)["rows"]
    assert [(r["group"], r["requests"], r["cost_usd"], r["cost_micros"], r["unpriced_requests"]) for r in by_day] == [
        ("2026-05-01", 1, "0.001234", 1234, 0),
        ("2026-05-02", 2, "2.50", 2_500_000, 1),
        ("2026-05-03", 1, None, None, 1),
    ]
    day_table = keys("usage", *MAY, "--group-by", "day").out.splitlines()
    assert [line.split()[6:] for line in day_table[2:]] == [
        ["$0.001234"],
        ["$2.50", "unpriced:", "1"],
        ["-", "unpriced:", "1"],
        ["$2.501234", "unpriced:", "2"],
    ]

    expected_by_key = {
        alpha.id: ["alpha", "2", "1,010", "200", "305", "50", "$0.001234", "unpriced:", "1"],
        beta.id: ["beta", "1", "2,000,000", "0", "1", "0", "$2.50"],
        unknown: ["-", "1", "0", "0", "0", "0", "-", "unpriced:", "1"],
    }
    table = keys("usage", *MAY).out.splitlines()
    assert table[1].split() == ["key", "name", "requests", "prompt", "cached", "completion", "reasoning", "cost"]
    assert [line.split() for line in table[2:]] == [
        *([group, *expected_by_key[group]] for group in sorted(expected_by_key)),
        ["total", "4", "2,001,010", "200", "306", "50", "$2.501234", "unpriced:", "2"],
    ]
    rows = json.loads(keys("usage", *MAY, "--json").out)["rows"]
    assert [(r["group"], r["name"], r["cost_usd"]) for r in rows] == sorted(
        [(alpha.id, "alpha", "0.001234"), (beta.id, "beta", "2.50"), (unknown, None, None)]
    )

    june = keys("usage", "--from", "2026-06-01T00:00:00+00:00", "--to", "2026-06-01T00:00:00.000001")
    assert june.out.splitlines()[2].split()[:3] == [alpha.id, "alpha", "1"]
    assert keys("usage", "--from", "2026-07-01", "--to", "2026-08-01").out.splitlines()[1:] == ["no requests"]


def test_usage_by_default_covers_this_month_to_the_next_midnight(keys: Cli, sqlite_url: str) -> None:
    now = datetime.now(UTC)
    start, end = window_start("month", now), window_start("day", now) + timedelta(days=1)
    records = [
        usage("now", "kkkkkkkkkkkk", "m", now, cost_micros=7),
        usage("before", "kkkkkkkkkkkk", "m", start - timedelta(microseconds=1), cost_micros=100),
        usage("tomorrow", "kkkkkkkkkkkk", "m", end, cost_micros=1000),
    ]
    on_store(sqlite_url, lambda store: store.record_usage(records))
    report = json.loads(keys("usage", "--json").out)
    assert (report["from"], report["to"], report["group_by"]) == (iso(start), iso(end), "key")
    assert [(r["group"], r["requests"], r["cost_micros"]) for r in report["rows"]] == [("kkkkkkkkkkkk", 1, 7)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--from", "2026-05-02", "--to", "2026-05-01"], "--from (2026-05-02T00:00:00Z) must be before --to "
                                                         "(2026-05-01T00:00:00Z), which is excluded"),
        (["--from", "May"], "--from takes an ISO-8601 date or time (2026-07-01, 2026-07-01T12:00:00+02:00), got "
                            "'May'"),
        (["--from", "0999-01-01", "--to", "2026-01-01"], "--from must be in 1970 or later, got '0999-01-01'"),
    ],
)  # fmt: skip
def test_usage_refuses_bad_ranges(keys: Cli, flags: list[str], message: str) -> None:
    assert keys("usage", *flags) == Result(2, "", f"modelmax keys: {message}\n")


# ---- errors and the database ----


@pytest.mark.parametrize(
    "argv", [["show", "aaaaaaaaaaaa"], ["update", "aaaaaaaaaaaa", "--name", "x"], ["revoke", "aaaaaaaaaaaa"],
             ["rotate", "aaaaaaaaaaaa"], ["show", "not-an-id"]],
)  # fmt: skip
def test_an_unknown_id_is_an_error(keys: Cli, argv: list[str]) -> None:
    assert keys(*argv) == Result(1, "", f"modelmax keys: no key has the id {argv[1]!r}\n")


def test_a_bad_or_unreachable_database(cli: Cli) -> None:
    bad = "modelmax keys: policy store URL must start with sqlite:/// or postgresql://, got 'mysql'\n"
    assert cli("list", "--database", "mysql://localhost/keys") == Result(2, "", bad)
    down = cli("list", "--database", "postgresql://admin:hunter2@127.0.0.1:1/policy")
    assert (down.status, down.out) == (1, "")
    assert down.err.startswith("modelmax keys: the policy store postgresql://admin:***@127.0.0.1:1/policy failed: ")
    assert "hunter2" not in down.err and "Traceback" not in down.err


def test_the_database_defaults_to_the_environment_then_the_run_file(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULT_DATABASE == f"sqlite:///{DEFAULT_PATH}"  # the file `modelmax run` opens
    monkeypatch.chdir(tmp_path)
    local = key_id_of(cli("create", "--name", "local").out.strip())
    assert get("sqlite:///.modelmax/policy.sqlite3", local).name == "local"  # where `modelmax run` keeps it
    elsewhere = f"sqlite:///{tmp_path / 'env.sqlite3'}"
    monkeypatch.setenv("MODELMAX_DATABASE_URL", elsewhere)
    from_env = key_id_of(cli("create", "--name", "env").out.strip())
    assert [k["id"] for k in json.loads(cli("list", "--json").out)] == [from_env]
    assert [k["id"] for k in json.loads(bind(cli, "sqlite:///.modelmax/policy.sqlite3")("list", "--json").out)] == [
        local
    ]


@pytest.mark.parametrize("command", ["create", "list", "show", "update", "revoke", "rotate", "usage"])
def test_every_command_has_help_and_takes_database(cli: Cli, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(command, "--help")
    assert exited.value.code == 0
    assert "--database URL" in capsys.readouterr().out


def test_a_time_zone_in_the_output_is_always_utc(keys: Cli, sqlite_url: str) -> None:
    created = keys("create", "--name", "tz", "--expires", "2031-06-01T12:00:00-07:00")
    record = get(sqlite_url, key_id_of(created.out.strip()))
    assert json.loads(keys("show", record.id, "--json").out)["expires_at"] == "2031-06-01T19:00:00Z"
    assert record.expires_at == datetime(2031, 6, 1, 12, tzinfo=timezone(timedelta(hours=-7)))
