"""`modelmax keys`: create, list, show, change, revoke and rotate API keys, and report usage, on the policy store.

Tenant management needs no running gateway: each command opens the store the core reads (`--database`, else
$MODELMAX_DATABASE_URL, else the SQLite file `modelmax run` uses), does one thing and closes it. A whole key is printed
once, alone on stdout, so that `KEY=$(modelmax keys create ...)` captures it; what create and rotate say about it
goes to stderr. The policy store is imported only inside the commands, as `startup.cli` imports the core only inside
its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Container, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from services.policy.keys import KeyRecord, Period
    from services.policy.store import BudgetState, Store, UsageTotals

DEFAULT_DATABASE = "sqlite:///.modelmax/policy.sqlite3"  # services.policy.sqlite.DEFAULT_PATH, as `modelmax run` uses
_DURATION = re.compile(r"(\d+)([dhm])")
_DURATION_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
_MAX_MICROS = 2**63 - 1  # budget_micros is a 64-bit integer in both schemas
_MAX_LIMIT = 2**31 - 1  # rpm, tpm and max_concurrent are PostgreSQL `integer` columns
# The SQLite store writes times as text and compares them as text, which needs four-digit years; no key or usage
# record predates 1970 anyway.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_INFERENCE_ONLY = ("--models", "--budget", "--period", "--rpm", "--tpm", "--max-concurrent")

Work: TypeAlias = "Callable[[Store], Awaitable[None]]"
Plan: TypeAlias = "Callable[[argparse.Namespace, datetime], Work]"


class _Invalid(Exception):
    """A value on the command line that the command refuses (exit status 2)."""


# ---- the parser ----


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `keys` and its subcommands to the `modelmax` parser."""
    keys = commands.add_parser(
        "keys",
        help="manage API keys on the policy store: create, list, show, update, revoke, rotate; report usage",
        description="Manage API keys and report usage on the policy store, with no gateway running. Every command "
        f"takes --database URL: a sqlite:///path or postgresql:// URL, by default $MODELMAX_DATABASE_URL, else "
        f"{DEFAULT_DATABASE} (under the current directory, the file `modelmax run` uses). Money is in USD.",
    )
    sub = keys.add_subparsers(title="commands", metavar="COMMAND", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--database",
        metavar="URL",
        help=f"the policy store (default: $MODELMAX_DATABASE_URL, else {DEFAULT_DATABASE})",
    )

    create = sub.add_parser(
        "create",
        parents=[store],
        help="create a key; prints the whole key alone on stdout (shown once)",
        description="Create a key. The whole key is printed alone on stdout, the only time it is shown (so "
        "KEY=$(modelmax keys create ...) keeps it); a summary goes to stderr.",
    )
    create.add_argument("--name", required=True, help="what the key is for (shown in lists and usage reports)")
    create.add_argument("--owner", default="", metavar="TEXT", help="the project or customer the key belongs to")
    create.add_argument("--models", metavar="M1,M2", help="the only models the key may call (default: every model)")
    create.add_argument("--budget", metavar="USD", help="a spending cap in USD, such as 5 or 0.25 (6 decimals at most)")
    create.add_argument("--period", choices=["day", "month", "total"], help="the budget's period, UTC (default: month)")
    create.add_argument("--expires", metavar="WHEN", help=_WHEN_HELP)
    _limit_arguments(create)
    create.add_argument(
        "--management",
        action="store_true",
        help="a management key (for managing keys, never for model calls): no models, budget or limits",
    )
    create.set_defaults(command=_command(_plan_create))

    listing = sub.add_parser(
        "list", parents=[store], help="list keys", description="List keys, oldest first, revoked ones included."
    )
    listing.add_argument("--owner", metavar="TEXT", help="only the keys of this owner")
    listing.add_argument("--active", action="store_true", help="only the keys neither revoked nor expired")
    listing.add_argument("--json", action="store_true", help="a JSON array (models null: every model)")
    listing.set_defaults(command=_command(_plan_list))

    show = sub.add_parser(
        "show",
        parents=[store],
        help="show one key and its budget this period",
        description="Show one key and, when it has a budget, the budget's current period: settled spend, what "
        "requests in flight hold, and what remains.",
    )
    show.add_argument("id", metavar="ID", help="the key's id (the part after mm-)")
    show.add_argument("--json", action="store_true", help="a JSON object")
    show.set_defaults(command=_command(_plan_show))

    update = sub.add_parser(
        "update",
        parents=[store],
        help="change a key's name, owner, models, budget, expiry or limits",
        description="Change what the flags name and nothing else. Running gateways see the change within their "
        "key cache TTL. A revoked key cannot be changed.",
    )
    update.add_argument("id", metavar="ID", help="the key's id")
    update.add_argument("--name", help="a new name")
    update.add_argument("--owner", metavar="TEXT", help="a new owner")
    models = update.add_mutually_exclusive_group()
    models.add_argument("--models", metavar="M1,M2", help="the only models the key may call")
    models.add_argument("--all-models", action="store_true", help="let the key call every model")
    budget = update.add_mutually_exclusive_group()
    budget.add_argument("--budget", metavar="USD", help="a new spending cap in USD (keeps the period unless --period)")
    budget.add_argument("--no-budget", action="store_true", help="remove the budget")
    update.add_argument(
        "--period",
        choices=["day", "month", "total"],
        help="the budget's period; alone, changes the period of the key's budget (default with a new budget: month)",
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires", metavar="WHEN", help=_WHEN_HELP)
    expiry.add_argument("--no-expiry", action="store_true", help="the key never expires")
    _limit_arguments(update, removable=True)
    update.set_defaults(command=_command(_plan_update))

    revoke = sub.add_parser(
        "revoke",
        parents=[store],
        help="revoke a key (final)",
        description="Revoke a key. Revocation is final; running gateways refuse the key within their key cache TTL.",
    )
    revoke.add_argument("id", metavar="ID", help="the key's id")
    revoke.set_defaults(command=_command(_plan_revoke))

    rotate = sub.add_parser(
        "rotate",
        parents=[store],
        help="give a key a new secret; prints the whole new key alone on stdout",
        description="Give a key a new secret, keeping its id, settings and usage. The whole new key is printed alone "
        "on stdout, the only time it is shown; the old one stops working within the key cache TTL.",
    )
    rotate.add_argument("id", metavar="ID", help="the key's id")
    rotate.set_defaults(command=_command(_plan_rotate))

    usage = sub.add_parser(
        "usage",
        parents=[store],
        help="requests, tokens and cost per key, model or day",
        description="Totals of the requests started from --from (included) to --to (excluded). A DATE is YYYY-MM-DD "
        "(midnight UTC) or an ISO-8601 time (UTC unless it says otherwise): --from 2026-05-01 --to 2026-06-01 is May. "
        "By default, from the 1st of this month to the next midnight UTC (today included). A cost of - means no "
        "request in the row had a price; 'unpriced: N' counts the requests the cost leaves out.",
    )
    usage.add_argument(
        "--from", dest="start", metavar="DATE", help="the start, included (default: the 1st of this month, UTC)"
    )
    usage.add_argument("--to", dest="end", metavar="DATE", help="the end, excluded (default: the next midnight UTC)")
    usage.add_argument(
        "--group-by",
        choices=["key", "model", "day"],
        default="key",
        help="one row per key, model or UTC day (default: key)",
    )
    usage.add_argument("--json", action="store_true", help='a JSON object: {"from", "to", "group_by", "rows"}')
    usage.set_defaults(command=_command(_plan_usage))


_WHEN_HELP = "when the key stops working: an ISO-8601 time (UTC unless it says otherwise) or a duration: 30d, 12h, 45m"


def _limit_arguments(parser: argparse.ArgumentParser, *, removable: bool = False) -> None:
    for flag, dest, what in (
        ("--rpm", "rpm", "requests per minute"),
        ("--tpm", "tpm", "tokens per minute"),
        ("--max-concurrent", "max_concurrent", "requests at once"),
    ):
        if not removable:
            parser.add_argument(flag, type=int, metavar="N", help=f"at most N {what}")
            continue
        group = parser.add_mutually_exclusive_group()
        group.add_argument(flag, type=int, metavar="N", help=f"at most N {what}")
        group.add_argument(f"--no-{flag[2:]}", dest=f"no_{dest}", action="store_true", help=f"no limit on {what}")


# ---- running a command ----


def _command(plan: Plan) -> Callable[[argparse.Namespace], int]:
    """A subcommand from its plan, which checks the arguments before the store is opened and returns the work to do
    on it. The work runs in one event loop; every error becomes one line on stderr and an exit status."""

    def command(args: argparse.Namespace) -> int:
        from services.policy.store import KeyNotFound, KeyRevoked, StoreError

        url = args.database or os.environ.get("MODELMAX_DATABASE_URL", "").strip() or DEFAULT_DATABASE
        try:
            asyncio.run(_on_store(url, plan(args, datetime.now(UTC))))
        except _Invalid as exc:
            return _fail(str(exc), 2)
        except KeyNotFound as exc:
            return _fail(f"no key has the id {str(exc)!r}", 1)
        except KeyRevoked as exc:
            return _fail(f"key {exc} is revoked, which is final: it can be neither updated nor rotated", 1)
        except StoreError as exc:
            return _fail(str(exc), 1)
        except ValueError as exc:  # a malformed URL, or a value the store's own checks refuse
            return _fail(str(exc), 2)
        except KeyboardInterrupt:
            return _fail("interrupted", 130)
        except Exception as exc:  # the database itself: unreachable, unreadable, refusing the connection...
            return _fail(f"the policy store {_redacted(url)} failed: {type(exc).__name__}: {exc}", 1)
        return 0

    return command


async def _on_store(url: str, work: Work) -> None:
    from services.policy import open_store

    store = await open_store(url)
    try:
        await work(store)
    finally:
        await store.close()


async def _get(store: Store, key_id: str) -> KeyRecord:
    from services.policy.store import KeyNotFound

    record = await store.get_key(key_id)
    if record is None:
        raise KeyNotFound(key_id)
    return record


def _fail(message: str, status: int) -> int:
    print(f"modelmax keys: {message}", file=sys.stderr)
    return status


def _redacted(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, separator, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


# ---- the commands ----


def _plan_create(args: argparse.Namespace, now: datetime) -> Work:
    from services.policy.keys import Budget, KeySpec

    if args.management:
        given = [flag for flag in _INFERENCE_ONLY if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            raise _Invalid(f"a management key cannot have {_and(given)}: it manages keys and never calls models")
    if args.period is not None and args.budget is None:
        raise _Invalid("--period is the period of a budget: give --budget too")
    spec = KeySpec(
        name=_name(args.name),
        owner=args.owner,
        kind="management" if args.management else "inference",
        expires_at=None if args.expires is None else _expiry(args.expires, now),
        allowed_models=None if args.models is None else _models(args.models),
        budget=None if args.budget is None else Budget(_budget_micros(args.budget), args.period or "month"),
        rpm=_limit("--rpm", args.rpm),
        tpm=_limit("--tpm", args.tpm),
        max_concurrent=_limit("--max-concurrent", args.max_concurrent),
    )

    async def work(store: Store) -> None:
        record, whole = await store.create_key(spec)
        print(whole, flush=True)
        _summary(f"created key {record.id}", record, "The key above is shown once: store it now.")

    return work


def _plan_list(args: argparse.Namespace, now: datetime) -> Work:
    async def work(store: Store) -> None:
        records = await store.list_keys(owner=args.owner, include_revoked=not args.active)
        if args.active:
            records = [r for r in records if r.is_active(now)]
        if args.json:
            print(json.dumps([_key_json(r, now) for r in records], indent=2))
        elif not records:
            print("no keys")
        else:
            header = ("id", "name", "owner", "kind", "models", "budget", "status", "created")
            rows = [
                (r.id, r.name, r.owner or "-", r.kind, _models_text(r), _budget_text(r), _status(r, now),
                 _when(r.created_at))
                for r in records
            ]  # fmt: skip
            print("\n".join(_table(header, rows)))

    return work


def _plan_show(args: argparse.Namespace, now: datetime) -> Work:
    async def work(store: Store) -> None:
        record = await _get(store, args.id)
        state = None
        if record.budget is not None:
            state = await store.budget_state(record.id, record.budget.window_start(now))
        if args.json:
            shown = _key_json(record, now)
            shown["budget_state"] = None if state is None else _state_json(record, state, now)
            print(json.dumps(shown, indent=2))
            return
        lines = _details(record, now)
        if state is not None:
            assert record.budget is not None
            lines += [
                ("this period", f"since {_when(record.budget.window_start(now))}"),
                ("  spent", _usd(state.spent_micros)),
                ("  held", f"{_usd(state.held_micros)} (requests in flight)"),
                ("  remaining", _usd(_remaining(record.budget.amount_micros, state))),
            ]
        _print_fields(lines)

    return work


def _plan_update(args: argparse.Namespace, now: datetime) -> Work:
    from services.policy.keys import Budget
    from services.policy.store import KeyChanges, KeyRevoked

    changes = KeyChanges()
    if args.name is not None:
        changes = dataclasses.replace(changes, name=_name(args.name))
    if args.owner is not None:
        changes = dataclasses.replace(changes, owner=args.owner)
    if args.models is not None:
        changes = dataclasses.replace(changes, allowed_models=_models(args.models))
    elif args.all_models:
        changes = dataclasses.replace(changes, allowed_models=None)
    if args.expires is not None:
        changes = dataclasses.replace(changes, expires_at=_expiry(args.expires, now))
    elif args.no_expiry:
        changes = dataclasses.replace(changes, expires_at=None)
    rpm, tpm = _limit("--rpm", args.rpm), _limit("--tpm", args.tpm)
    max_concurrent = _limit("--max-concurrent", args.max_concurrent)
    if rpm is not None or args.no_rpm:
        changes = dataclasses.replace(changes, rpm=rpm)
    if tpm is not None or args.no_tpm:
        changes = dataclasses.replace(changes, tpm=tpm)
    if max_concurrent is not None or args.no_max_concurrent:
        changes = dataclasses.replace(changes, max_concurrent=max_concurrent)
    if args.no_budget:
        if args.period is not None:
            raise _Invalid("--period is the period of a budget: it cannot go with --no-budget")
        changes = dataclasses.replace(changes, budget=None)
    amount = None if args.budget is None else _budget_micros(args.budget)
    if changes == KeyChanges() and amount is None and args.period is None:
        raise _Invalid("nothing to change: give at least one flag (see modelmax keys update --help)")

    async def work(store: Store) -> None:
        # A new amount keeps the budget's period, and a new period its amount, so the current record is read first.
        # Another update landing in between could be overwritten: acceptable for an operator's command.
        current = await _get(store, args.id)
        if current.revoked_at is not None:
            raise KeyRevoked(current.id)
        final = changes
        if amount is not None or args.period is not None:
            period: Period = args.period or (current.budget.period if current.budget else "month")
            if amount is not None:
                final = dataclasses.replace(final, budget=Budget(amount, period))
            elif current.budget is not None:
                final = dataclasses.replace(final, budget=Budget(current.budget.amount_micros, period))
            else:
                raise _Invalid(f"key {current.id} has no budget to change the period of: give --budget too")
        if current.kind == "management":
            values = (args.models, args.budget, args.period, args.rpm, args.tpm, args.max_concurrent)
            given = [flag for flag, value in zip(_INFERENCE_ONLY, values, strict=True) if value is not None]
            if given:
                raise _Invalid(f"key {current.id} is a management key, which cannot have {_and(given)}")
        record = await store.update_key(current.id, final)
        print(f"updated key {record.id}")
        _print_fields(_details(record, now))

    return work


def _plan_revoke(args: argparse.Namespace, now: datetime) -> Work:
    from services.policy.cache import DEFAULT_TTL

    async def work(store: Store) -> None:
        current = await _get(store, args.id)
        if current.revoked_at is not None:
            print(f"key {current.id} ({current.name}) was already revoked at {_when(current.revoked_at)}")
            return
        record = await store.revoke_key(current.id)
        assert record.revoked_at is not None
        print(
            f"revoked key {record.id} ({record.name}) at {_when(record.revoked_at)}; running gateway replicas refuse "
            f"it within {DEFAULT_TTL:g} s (the default key cache TTL)"
        )

    return work


def _plan_rotate(args: argparse.Namespace, now: datetime) -> Work:
    from services.policy.cache import DEFAULT_TTL

    async def work(store: Store) -> None:
        record, whole = await store.rotate_key(args.id)
        print(whole, flush=True)
        _summary(
            f"rotated key {record.id}",
            record,
            f"The old key keeps working on running gateway replicas for at most {DEFAULT_TTL:g} s (the default key "
            "cache TTL).\nThe new key above is shown once: store it now.",
        )

    return work


def _plan_usage(args: argparse.Namespace, now: datetime) -> Work:
    from services.policy.keys import window_start

    start = window_start("month", now) if args.start is None else _instant("--from", args.start)
    end = window_start("day", now) + timedelta(days=1) if args.end is None else _instant("--to", args.end)
    if start >= end:
        raise _Invalid(f"--from ({_when(start)}) must be before --to ({_when(end)}), which is excluded")

    async def work(store: Store) -> None:
        rows = await store.usage_report(start, end, args.group_by)
        names = {r.id: r.name for r in await store.list_keys()} if args.group_by == "key" else {}
        if args.json:
            shown = [_usage_json(row, names, args.group_by) for row in rows]
            print(
                json.dumps({"from": _iso(start), "to": _iso(end), "group_by": args.group_by, "rows": shown}, indent=2)
            )
            return
        print(f"usage from {_when(start)} to {_when(end)} (excluded), by {args.group_by}")
        if not rows:
            print("no requests")
            return
        named = args.group_by == "key"
        header = (args.group_by, *(("name",) if named else ()), *_USAGE_COLUMNS)
        cells = [_usage_cells(row, names.get(row.group, "-") if named else None) for row in rows]
        if len(rows) > 1:
            cells.append(_usage_cells(_total(rows), "" if named else None))
        numbers = range(2 if named else 1, len(header) - 1)
        print("\n".join(_table(header, cells, right=numbers)))

    return work


_USAGE_COLUMNS = ("requests", "prompt", "cached", "completion", "reasoning", "cost", "")


# ---- reading the command line ----


def _name(text: str) -> str:
    if not text.strip():
        raise _Invalid("--name must not be empty")
    return text


def _models(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",")) - {""}
    if not names:
        raise _Invalid("--models needs one or more model names, comma-separated (leave it out for every model)")
    return names


def _budget_micros(text: str) -> int:
    """USD as written (`5`, `0.25`) in micro-USD, exactly: Decimal, never a float."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite():
        raise _Invalid(f"--budget is an amount of USD such as 5 or 0.25, got {text!r}")
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite Decimal's is
    if exponent < -6:
        raise _Invalid(f"--budget {text} has more than 6 decimal places (budgets are counted in micro-USD)")
    if amount <= 0:
        raise _Invalid(f"--budget must be more than 0, got {text} (leave it out for no budget)")
    if amount > Decimal(_MAX_MICROS).scaleb(-6):
        raise _Invalid(f"--budget {text} is more than the store can hold")
    micros = amount.scaleb(6)  # exact: at most 6 decimal places and at most 19 digits
    return int(micros)


def _limit(flag: str, value: int | None) -> int | None:
    if value is not None and not 0 < value <= _MAX_LIMIT:
        raise _Invalid(f"{flag} must be from 1 to {_MAX_LIMIT}, got {value} (leave it out for no limit)")
    return value


def _expiry(text: str, now: datetime) -> datetime:
    duration = _DURATION.fullmatch(text.strip())
    try:
        when = now + int(duration[1]) * _DURATION_UNITS[duration[2]] if duration else _instant("--expires", text)
    except OverflowError:
        raise _Invalid(f"--expires {text} is too far away") from None
    if when <= now:
        raise _Invalid(f"--expires {text} is not in the future (revoke a key to stop it now)")
    return when


def _instant(flag: str, text: str) -> datetime:
    """An ISO-8601 date or time; a naive one is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Invalid(
            f"{flag} takes an ISO-8601 date or time (2026-07-01, 2026-07-01T12:00:00+02:00)"
            f"{' or a duration (30d, 12h, 45m)' if flag == '--expires' else ''}, got {text!r}"
        ) from None
    when = when if when.utcoffset() is not None else when.replace(tzinfo=UTC)
    if when < _EARLIEST:
        raise _Invalid(f"{flag} must be in 1970 or later, got {text!r}")
    return when


# ---- what the commands print ----


def _summary(headline: str, record: KeyRecord, footer: str) -> None:
    """What create and rotate say on stderr, stdout being the key alone."""
    lines = [f"{headline} ({json.dumps(record.name)}, {record.kind})"]
    if record.kind == "inference":
        lines += [f"  models:   {_models_text(record)}", f"  budget:   {_budget_text(record)}"]
    lines += [f"  expires:  {_when(record.expires_at) if record.expires_at else 'never'}", footer]
    print("\n".join(lines), file=sys.stderr)


def _details(record: KeyRecord, now: datetime) -> list[tuple[str, str]]:
    def limit(value: int | None) -> str:
        return "no limit" if value is None else f"{value:,}"

    return [
        ("id", record.id),
        ("name", record.name),
        ("owner", record.owner or "-"),
        ("kind", record.kind),
        ("status", _status(record, now)),
        ("created", _when(record.created_at)),
        ("expires", _when(record.expires_at) if record.expires_at else "never"),
        ("revoked", _when(record.revoked_at) if record.revoked_at else "-"),
        ("models", _models_text(record)),
        ("budget", _budget_text(record)),
        ("rpm", limit(record.rpm)),
        ("tpm", limit(record.tpm)),
        ("max concurrent", limit(record.max_concurrent)),
    ]


def _print_fields(fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in fields) + 1
    for label, value in fields:
        print(f"{label + ':':<{width}} {value}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Container[int] = ()) -> list[str]:
    """Columns two spaces apart, those in `right` aligned right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    ]


def _usage_cells(row: UsageTotals, name: str | None) -> list[str]:
    unpriced = f"unpriced: {row.unpriced_requests:,}" if row.unpriced_requests else ""
    counts = (row.requests, row.prompt_tokens, row.cached_tokens, row.completion_tokens, row.reasoning_tokens)
    cost = "-" if row.cost_micros is None else _usd(row.cost_micros)
    return [row.group, *(() if name is None else (name,)), *(f"{n:,}" for n in counts), cost, unpriced]


def _total(rows: Sequence[UsageTotals]) -> UsageTotals:
    from services.policy.store import UsageTotals

    costs = [row.cost_micros for row in rows if row.cost_micros is not None]
    return UsageTotals(
        group="total",
        requests=sum(row.requests for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        cached_tokens=sum(row.cached_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        reasoning_tokens=sum(row.reasoning_tokens for row in rows),
        cost_micros=sum(costs) if costs else None,
        unpriced_requests=sum(row.unpriced_requests for row in rows),
    )


def _usage_json(row: UsageTotals, names: dict[str, str], group_by: str) -> dict[str, Any]:
    shown: dict[str, Any] = {"group": row.group}
    if group_by == "key":
        shown["name"] = names.get(row.group)  # None: a key no longer (or never) in this store
    return shown | {
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "cached_tokens": row.cached_tokens,
        "completion_tokens": row.completion_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cost_usd": None if row.cost_micros is None else _decimal_usd(row.cost_micros),
        "cost_micros": row.cost_micros,
        "unpriced_requests": row.unpriced_requests,
    }


def _key_json(record: KeyRecord, now: datetime) -> dict[str, Any]:
    budget = record.budget
    return {
        "id": record.id,
        "name": record.name,
        "owner": record.owner,
        "kind": record.kind,
        "models": None if record.allowed_models is None else sorted(record.allowed_models),
        "budget": None
        if budget is None
        else {
            "amount_usd": _decimal_usd(budget.amount_micros),
            "amount_micros": budget.amount_micros,
            "period": budget.period,
        },  # fmt: skip
        "status": _status(record, now),
        "created_at": _iso(record.created_at),
        "expires_at": None if record.expires_at is None else _iso(record.expires_at),
        "revoked_at": None if record.revoked_at is None else _iso(record.revoked_at),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
    }


def _state_json(record: KeyRecord, state: BudgetState, now: datetime) -> dict[str, Any]:
    assert record.budget is not None
    remaining = _remaining(record.budget.amount_micros, state)
    return {
        "period_start": _iso(record.budget.window_start(now)),
        "spent_usd": _decimal_usd(state.spent_micros),
        "spent_micros": state.spent_micros,
        "held_usd": _decimal_usd(state.held_micros),
        "held_micros": state.held_micros,
        "remaining_usd": _decimal_usd(remaining),
        "remaining_micros": remaining,
    }


def _remaining(amount_micros: int, state: BudgetState) -> int:
    """What is left of the budget, never below 0 (the last request admitted may take the spend past the cap)."""
    return max(0, amount_micros - state.spent_micros - state.held_micros)


def _status(record: KeyRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    return "expired" if record.expires_at is not None and now >= record.expires_at else "active"


def _models_text(record: KeyRecord) -> str:
    if record.kind == "management":
        return "-"  # it calls no model
    if record.allowed_models is None:
        return "all"
    return ",".join(sorted(record.allowed_models)) or "none"


def _budget_text(record: KeyRecord) -> str:
    if record.budget is None:
        return "-"
    amount = _usd(record.budget.amount_micros)
    return f"{amount} total" if record.budget.period == "total" else f"{amount}/{record.budget.period}"


def _usd(micros: int) -> str:
    """`$5.00`, `$0.25`, `$0.001234`: cents always, then as many of the 6 decimals as are not trailing zeros."""
    return f"{'-' if micros < 0 else ''}${_decimal_usd(abs(micros))}"


def _decimal_usd(micros: int) -> str:
    """Micro-USD as an exact decimal string of USD, trimmed as `_usd` is: 5000000 is "5.00", 1234 "0.001234"."""
    dollars, fraction = divmod(abs(micros), 1_000_000)
    return f"{'-' if micros < 0 else ''}{dollars}.{f'{fraction:06d}'.rstrip('0'):0<2}"


def _when(value: datetime) -> str:
    """A time for people: UTC, to the second."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(value: datetime) -> str:
    """A time for programs: ISO-8601 UTC, to the microsecond when there are any."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
