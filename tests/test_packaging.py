"""Packaging: declared dependencies match the imports, the wheel is complete, and the `modelmax` command works."""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.catalog import load_catalog
from services.policy import open_store
from services.policy.cache import KeyCache
from services.policy.keys import parse_key
from services.settings import DEFAULT_CATALOG
from startup import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME = PYPROJECT["project"]["dependencies"]
DEV = PYPROJECT["project"]["optional-dependencies"]["dev"]
BUILD = PYPROJECT["build-system"]["requires"]
CODE = ("services", "bridge", "startup")  # what the wheel ships
FIRST_PARTY = {*CODE, "modelmax"}  # modelmax: the generated stubs
PROTOS = sorted((ROOT / "proto" / "modelmax" / "v1").glob("*.proto"))


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# ---- dependencies: declared as imported ----


class _Imports(ast.NodeVisitor):
    """Absolute imports a module makes at run time (`if TYPE_CHECKING:` blocks are for the type checker only)."""

    def __init__(self) -> None:
        self.modules: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.modules |= {alias.name for alias in node.names}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            # `from google import genai` imports google.genai: keep the name, it may be a module
            self.modules |= {f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*"}


def _imports(packages: tuple[str, ...], first_party: set[str]) -> dict[str, set[str]]:
    """Third-party module -> the files importing it, over every .py file of `packages`."""
    found: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
            for module in visitor.modules:
                top = module.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in first_party:
                    found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def _top_level_owners() -> dict[str, frozenset[str]]:
    return {top: frozenset(names) for top, names in importlib.metadata.packages_distributions().items()}


@functools.cache
def _files(distribution: str) -> tuple[str, ...]:
    return tuple(str(f) for f in importlib.metadata.files(distribution) or [])


@functools.cache
def _providers(module: str) -> frozenset[str]:
    """The installed distributions that provide `module` (canonical names).

    `google.rpc`, `google.genai`, `google.auth` and `google.protobuf` share the `google` namespace and no
    distribution: match the module's path against each candidate's files, the most specific prefix first.
    """
    parts = module.split(".")
    candidates = _top_level_owners().get(parts[0], frozenset())
    if len(candidates) <= 1:
        return frozenset(canonicalize_name(name) for name in candidates)
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        owners = frozenset(
            canonicalize_name(name)
            for name in candidates
            if any(f.startswith((f"{prefix}/", f"{prefix}.")) for f in _files(name))
        )
        if owners:
            return owners
    return frozenset()


def test_every_third_party_import_of_the_code_is_a_declared_runtime_dependency() -> None:
    declared = _names(RUNTIME)
    missing = []
    for module, files in sorted(_imports(CODE, FIRST_PARTY).items()):
        providers = _providers(module)
        if not providers & declared:
            installed = ", ".join(sorted(providers)) or "no installed distribution"
            missing.append(f"{module} (imported by {', '.join(sorted(files))}; provided by {installed})")
    assert not missing, "add to [project].dependencies:\n  " + "\n  ".join(missing)


def test_every_runtime_dependency_is_imported_by_the_code() -> None:
    """What only the tests or the benchmarks use belongs in the dev extra, not in every install."""
    used = {name for module in _imports(CODE, FIRST_PARTY) for name in _providers(module)}
    unused = sorted(_names(RUNTIME) - used)
    assert unused == [], f"declared in [project].dependencies, imported by no module of the code: {unused}"


def test_every_third_party_import_of_the_tests_and_benchmarks_is_declared() -> None:
    declared = _names(RUNTIME) | _names(DEV)
    missing = {
        module: sorted(files)
        for module, files in _imports(("tests", "bench"), FIRST_PARTY | {"tests", "bench"}).items()
        if not _providers(module) & declared
    }
    assert missing == {}, f"add to [project.optional-dependencies].dev: {missing}"


@pytest.mark.parametrize("requirement", RUNTIME + DEV)
def test_every_pin_is_what_the_venv_has(requirement: str) -> None:
    parsed = Requirement(requirement)
    installed = importlib.metadata.version(parsed.name)
    assert parsed.specifier.contains(installed, prereleases=True), f"{parsed.name} {installed} is installed"


def test_the_build_generates_stubs_with_the_dev_pins() -> None:
    build: dict[str, Requirement] = {canonicalize_name(Requirement(r).name): Requirement(r) for r in BUILD}
    dev: dict[str, Requirement] = {canonicalize_name(Requirement(r).name): Requirement(r) for r in DEV}
    for name in ("grpcio-tools", "mypy-protobuf"):
        assert str(build[name].specifier) == str(dev[name].specifier), name


# ---- the wheel ----


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """A wheel built from a copy of the checkout without gen/ (as a clean clone is), the venv as build environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "gen", "build", "dist", "*.egg-info", "__pycache__", "node_modules", ".modelmax",
        ".pytest_cache", ".ruff_cache", "bench-results",
    )  # fmt: skip
    shutil.copytree(ROOT, source, ignore=skip)
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (path,) = out.glob("modelmax-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info(archive: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in archive.namelist() if re.fullmatch(rf"modelmax-[^/]+\.dist-info/{name}", n)]
    return archive.read(path).decode()


def test_the_wheel_carries_the_typed_stubs(wheel: zipfile.ZipFile) -> None:
    stubs = {n for n in wheel.namelist() if n.startswith("modelmax/")}
    expected = {"modelmax/v1/py.typed"}
    for proto in PROTOS:
        expected |= {f"modelmax/v1/{proto.stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
        expected.add(f"modelmax/v1/{proto.stem}_pb2_grpc.pyi")
    assert stubs == expected
    if (ROOT / "gen" / "modelmax" / "v1").is_dir():  # `make proto` and the build generate the same files
        generated = {p for p in (ROOT / "gen" / "modelmax" / "v1").iterdir() if p.name != "__pycache__"}
        assert {f"modelmax/v1/{p.name}" for p in generated} == expected


def test_the_wheel_carries_every_module_and_data_file_of_the_code(wheel: zipfile.ZipFile) -> None:
    """A module in a folder without `__init__.py`, or a data file not in [tool.setuptools.package-data], would be
    left out of the wheel and found missing only once installed."""
    names = set(wheel.namelist())
    files = [p for package in CODE for p in (ROOT / package).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = sorted(str(p.relative_to(ROOT)) for p in files if str(p.relative_to(ROOT)) not in names)
    assert missing == []
    assert str(Path(DEFAULT_CATALOG).relative_to(ROOT)) in names


def test_the_wheel_holds_only_the_code_and_the_stubs(wheel: zipfile.ZipFile) -> None:
    tops = {name.partition("/")[0] for name in wheel.namelist()}  # no tests/, bench/, proto/ or gen/
    assert tops == {*CODE, "modelmax", *(t for t in tops if t.endswith(".dist-info"))}


def test_the_wheel_declares_the_console_scripts_and_the_license(wheel: zipfile.ZipFile) -> None:
    entry_points = _dist_info(wheel, "entry_points.txt")
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", entry_points.partition("[console_scripts]")[2], re.M))
    assert scripts == PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"modelmax", "modelmax-core", "modelmax-bridge"}
    metadata = _dist_info(wheel, "METADATA")
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert _dist_info(wheel, "licenses/LICENSE") == (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in _dist_info(wheel, "licenses/LICENSE")


def test_the_wheels_stubs_import_with_the_installed_runtime(wheel: zipfile.ZipFile, tmp_path: Path) -> None:
    wheel.extractall(tmp_path)
    # -S: without site, so the venv's modelmax-gen.pth cannot put gen/ on the path instead
    path = os.pathsep.join([str(tmp_path), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    code = "import modelmax.v1.completion_service_pb2_grpc as m; print(m.__file__)"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path))


# ---- the modelmax command ----


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("core", "bridge", "run", "check-config"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command


def test_check_config_prints_every_entry_of_the_default_catalog(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "a-key")
    assert cli.main(["check-config", DEFAULT_CATALOG]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = load_catalog(DEFAULT_CATALOG).entries
    assert len(lines) == 1 + len(entries)
    for entry, line in zip(entries, lines[1:], strict=True):
        assert line.split() == [entry.name, entry.provider, "ok"]


def test_check_config_names_an_unset_secret_without_failing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The core serves such an entry as unavailable and every other model as usual: not a fatal problem."""
    assert cli.main(["check-config", DEFAULT_CATALOG]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "gemini" in line.split()]
    assert "unavailable: environment variable GEMINI_API_KEY (option 'api_key_env') is not set" in line


def test_check_config_lists_every_deployments_provider(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "catalog.yaml"
    deployments = [
        {"provider": "openai", "model": "m", "options": {"base_url": "http://a/v1", "api_key_env": "A_KEY"}},
        {"provider": "bedrock", "model": "m"},
    ]
    catalog.write_text(yaml.safe_dump({"models": [{"name": "two", "deployments": deployments}]}))
    assert cli.main(["check-config", str(catalog)]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:3] == ["two", "openai,", "bedrock"]
    assert "deployments[0]: environment variable A_KEY (option 'api_key_env') is not set" in row


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("models:\n  - name: a\n    provder: local\n", "models[0] (a): unknown keys ['provder']"),
        ("models: [\n", "not valid YAML"),
        ("models: []\n", "'models' is empty"),
    ],
)
def test_check_config_exits_1_on_a_broken_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: str, problem: str
) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(document)
    assert cli.main(["check-config", str(catalog)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"modelmax check-config: {catalog}: ")
    assert problem in captured.err


def test_check_config_exits_1_when_the_core_would_refuse_an_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = tmp_path / "catalog.yaml"
    models = [{"name": "fine", "provider": "local", "model": "x.gguf"}, {"name": "typo", "provider": "loca"}]
    catalog.write_text(yaml.safe_dump({"models": models}))
    assert cli.main(["check-config", str(catalog)]) == 1
    captured = capsys.readouterr()
    fine, typo = captured.out.splitlines()[1:]
    assert fine.split() == ["fine", "local", "ok"]
    assert "error: unknown provider 'loca'" in typo
    assert "would refuse to start" in captured.err


def test_run_keeps_a_database_key_private_and_stable_and_replaces_a_revoked_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///.modelmax/policy.sqlite3"
    key = asyncio.run(cli._local_key(url))
    assert parse_key(key) is not None, key  # mm-<id>-<secret>: a key of the database, not a static one
    assert stat.S_IMODE((tmp_path / ".modelmax" / "api-key").stat().st_mode) == 0o600
    assert asyncio.run(cli._local_key(url)) == key

    async def check_and_revoke() -> None:
        store = await open_store(url)
        try:
            record = await KeyCache(store).authenticate(key)
            assert (record.name, record.allowed_models, record.budget) == ("local", None, None)
            await store.revoke_key(record.id)
        finally:
            await store.close()

    asyncio.run(check_and_revoke())
    replaced = asyncio.run(cli._local_key(url))  # the kept key no longer works: a new one, kept in its place
    assert replaced != key and (tmp_path / ".modelmax" / "api-key").read_text().strip() == replaced


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_run_starts_both_prints_the_banner_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"  # a model that needs no download and no credentials to start
    catalog.write_text(yaml.safe_dump({"models": [{"name": "m", "provider": "openai", "model": "m",
                                                   "options": {"base_url": "http://127.0.0.1:9/v1"}}]}))  # fmt: skip
    bridge_port = _free_port()
    env = {
        **os.environ,
        "MODELMAX_CATALOG": str(catalog),
        "MODELMAX_CORE_PORT": str(_free_port()),
        "MODELMAX_BRIDGE_PORT": str(bridge_port),
        "MODELMAX_CORE_METRICS_PORT": "off",
        "MODELMAX_BRIDGE_METRICS_PORT": "off",
    }
    log = tmp_path / "stderr.log"
    # A session of its own, so the Ctrl-C below reaches the command and its children as a terminal's would.
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "startup.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        assert process.stdout is not None
        banner = []
        for line in process.stdout:
            banner.append(line)
            if "Ctrl-C stops the gateway." in line:
                break
        text = "".join(banner)
        assert "Ctrl-C stops the gateway." in text, log.read_text()
        key = (tmp_path / ".modelmax" / "api-key").read_text().strip()
        assert f"URL:  http://127.0.0.1:{bridge_port}/v1" in text
        assert f"Key:  {key}" in text
        request = urllib.request.Request(
            f"http://127.0.0.1:{bridge_port}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:  # the printed key works, through the core
            assert [model["id"] for model in json.load(reply)["data"]] == ["m"]
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 128 + signal.SIGINT
        with pytest.raises(ProcessLookupError):  # nothing of the group is left running
            os.killpg(process.pid, 0)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
