"""Regression tests for the hardening issue's findings, one test named for each.

The bridge runs under real uvicorn in front of the recording fake core of test_pipeline, so a test sees both
what the client got and what the core was sent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.policy.gate import StaticKeys
from services.settings import Settings as CoreSettings
from tests.bridge.test_pipeline import AUTH, CHAT, RecordingCore, bridge
from tests.bridge.test_pipeline import core as core  # noqa: F401  (the fixture, under its own name)
from tests.conftest import API_KEY

GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


@pytest.mark.parametrize("byte", [0xA1, 0xC0, 0xE9, 0xFF], ids=lambda b: f"{b:#x}")
async def test_a_request_id_with_bytes_a1_to_ff_is_replaced_not_a_500(
    core: tuple[RecordingCore, str],  # noqa: F811
    byte: int,
) -> None:
    bad = b"req-" + bytes([byte]) + b"-1"
    headers = [(b"authorization", AUTH["Authorization"].encode()), (b"x-request-id", bad)]
    async with bridge(core) as http:
        response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200, response.text
    returned = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(returned), returned
    [(rpc, metadata)] = core[0].metadata
    assert rpc == "CreateCompletion" and metadata["x-request-id"] == returned


async def test_a_printable_ascii_request_id_is_still_kept(core: tuple[RecordingCore, str]) -> None:  # noqa: F811
    async with bridge(core) as http:
        response = await http.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "X-Request-Id": "abc-123~!"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "abc-123~!"


async def test_duplicate_authorization_headers_are_a_400(core: tuple[RecordingCore, str]) -> None:  # noqa: F811
    """Two Authorization headers (the first used to win silently): a 400 naming the header, before any core call."""
    other = b"Bearer mm-another-key-0123456789abcdef"
    for headers in (
        [(b"authorization", AUTH["Authorization"].encode()), (b"authorization", other)],
        [(b"authorization", other), (b"authorization", AUTH["Authorization"].encode())],
    ):
        async with bridge(core) as http:
            response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "duplicate_header")
        assert "Authorization header was sent more than once" in error["message"]
        assert core[0].metadata == []  # the core never heard of it
    async with bridge(core) as http:  # one header, as ever
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=AUTH)).status_code == 200


def test_an_indented_comment_in_the_keys_file_is_not_a_key(tmp_path: Path) -> None:
    """The keys file is the core's setting now (the core checks every key); a comment is never a key there."""
    comment = "# a comment longer than sixteen chars"
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"   {comment}\n\t{comment} (tab)\n{API_KEY}\n# flush-left comment, also long\n")
    settings = CoreSettings.from_env({"MODELMAX_API_KEYS_FILE": str(keys_file)})
    assert settings.api_keys == (API_KEY,)
    keys = StaticKeys(settings.api_keys)
    assert keys.find(comment.encode()) is None
    found = keys.find(API_KEY.encode())
    assert found is not None and found.key_id.startswith("static-")
