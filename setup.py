"""Build hook: the wheel carries the modelmax.v1 stubs, generated from proto/ at build time (never committed).

Metadata lives in pyproject.toml; this file only adds the generation step, so that `pip install .` from a clean
checkout (no `gen/`) gives a complete, typed install. It runs the protoc line of the Makefile's `proto` target.
Editable installs skip it: there `make proto` writes `gen/`, which the venv's `modelmax-gen.pth` puts on the path.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = "proto"
PROTO_PACKAGE = "modelmax/v1"
# mypy-protobuf's two protoc plugins, by the function its console scripts call.
_PLUGINS = {"protoc-gen-mypy": "main", "protoc-gen-mypy_grpc": "grpc"}


def generate_stubs(out: Path) -> list[Path]:
    """Write `*_pb2.py`, `*_pb2_grpc.py`, their `.pyi` and a `py.typed` under `out/modelmax/v1`; return them."""
    protos = sorted((ROOT / PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {ROOT / PROTO_ROOT / PROTO_PACKAGE}: the stubs cannot be generated")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as plugin_dir:
        # The plugins run with this interpreter, not whatever protoc-gen-mypy is on PATH: under build isolation the
        # isolated environment's scripts are not always on PATH, and without it the venv's may not be.
        plugins = []
        for name, function in _PLUGINS.items():
            plugin = Path(plugin_dir, name)
            code = f"import sys; from mypy_protobuf.main import {function}; sys.exit({function}())"
            plugin.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
            plugin.chmod(0o755)
            plugins.append(f"--plugin={name}={plugin}")
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
             f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}",
             *plugins, *(str(proto.relative_to(ROOT)) for proto in protos)],
            cwd=ROOT,
            check=True,
        )  # fmt: skip
    marker = out / PROTO_PACKAGE / "py.typed"  # PEP 561: in the package itself, as `modelmax` is a namespace
    marker.touch()
    return sorted(path for path in (out / PROTO_PACKAGE).iterdir() if path.is_file())


class BuildPyWithStubs(build_py):
    """build_py, plus the generated stubs in the build tree (so in the wheel)."""

    _stubs: tuple[Path, ...] = ()

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self._stubs = tuple(generate_stubs(Path(self.build_lib)))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *(str(path) for path in self._stubs)]


class SdistWithProtos(sdist):
    """sdist, plus proto/, which the wheel built from the sdist generates its stubs from."""

    def make_distribution(self) -> None:
        self.filelist.extend(
            str(path.relative_to(ROOT)) for path in sorted((ROOT / PROTO_ROOT).rglob("*")) if path.is_file()
        )
        super().make_distribution()


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
