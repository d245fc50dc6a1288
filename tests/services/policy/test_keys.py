"""The key format, its hash and the KeyRecord rules, with no store involved."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.policy.keys import (
    Budget,
    KeyRecord,
    KeySpec,
    generate_key,
    hash_key,
    new_record,
    parse_key,
    verify_key,
    window_start,
    with_new_secret,
)

NOW = datetime(2026, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)


def test_generated_key_round_trips_through_parse() -> None:
    key_id, whole = generate_key()
    assert re.fullmatch(r"[a-z2-7]{12}", key_id)
    assert whole.startswith(f"mm-{key_id}-")
    parsed = parse_key(whole)
    assert parsed is not None and parsed.key_id == key_id
    assert f"mm-{parsed.key_id}-{parsed.secret}" == whole
    assert len(parsed.secret) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", parsed.secret)
    assert parsed.secret not in repr(parsed)


def test_keys_are_unique_and_rotation_keeps_the_id() -> None:
    keys = {generate_key()[1] for _ in range(1000)}
    assert len(keys) == 1000
    rotated = with_new_secret("abcdefgh2345")
    assert parse_key(rotated) is not None and rotated.startswith("mm-abcdefgh2345-")


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "mm-test-key-0123456789abcdef",  # the fixed key of the older tests: not this format
        "sk-abcdefgh2345-" + "a" * 43,
        "mm-ABCDEFGH2345-" + "a" * 43,  # ids are lowercase
        "mm-abcdefgh234-" + "a" * 43,  # 11 characters
        "mm-abcdefgh2345-" + "a" * 31,  # secret too short
        "mm-abcdefgh2345-" + "a" * 42 + "=",  # not url-safe base64
        "mm-abcdefgh2345-" + "a" * 43 + "\n",
    ],
)
def test_parse_refuses_malformed_keys(presented: str) -> None:
    assert parse_key(presented) is None


def test_a_secret_containing_dashes_parses() -> None:
    parsed = parse_key("mm-abcdefgh2345-" + "-_" * 20)
    assert parsed is not None and parsed.key_id == "abcdefgh2345" and parsed.secret == "-_" * 20


def test_hash_is_sha256_of_the_whole_key_and_verify_compares_it() -> None:
    _, whole = generate_key()
    digest = hash_key(whole)
    assert digest == hashlib.sha256(whole.encode()).hexdigest()
    assert verify_key(whole, digest)
    assert not verify_key(whole[:-1] + ("A" if whole[-1] != "A" else "B"), digest)


def test_new_record_holds_the_hash_and_never_the_secret() -> None:
    record, whole = new_record(KeySpec("ci", owner="team-a"), NOW)
    assert record.secret_hash == hash_key(whole)
    secret = whole.rsplit("-", 1)[-1]
    assert secret not in repr(record) and record.secret_hash not in repr(record)
    assert record.kind == "inference" and record.allowed_models is None and record.created_at == NOW


def test_record_activity_and_model_permission() -> None:
    record, _ = new_record(KeySpec("k", expires_at=NOW + timedelta(hours=1), allowed_models=frozenset({"a"})), NOW)
    assert record.is_active(NOW) and not record.is_active(NOW + timedelta(hours=1))
    assert record.allows_model("a") and not record.allows_model("b")
    everything, _ = new_record(KeySpec("k"), NOW)
    assert everything.allows_model("anything")


@pytest.mark.parametrize(
    ("period", "start"),
    [
        ("day", datetime(2026, 3, 14, tzinfo=UTC)),
        ("month", datetime(2026, 3, 1, tzinfo=UTC)),
        ("total", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_window_start(period: str, start: datetime) -> None:
    assert window_start(period, NOW) == start  # type: ignore[arg-type]
    # an instant given in another zone has the same UTC window
    assert window_start(period, NOW.astimezone(timezone(timedelta(hours=-11)))) == start  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Budget(0, "day"),
        lambda: Budget(10, "week"),  # type: ignore[arg-type]
        lambda: KeySpec("k", kind="admin"),  # type: ignore[arg-type]
        lambda: KeySpec("k", rpm=0),
        lambda: KeySpec("k", expires_at=datetime(2030, 1, 1)),  # naive
        lambda: KeyRecord("i", "n", "o", "inference", datetime(2030, 1, 1), "h"),  # naive
    ],
)
def test_invalid_values_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]
