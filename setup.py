"""Build hook: generate the gRPC stubs from protos/ before the packages are collected.

All metadata lives in pyproject.toml. This file only swaps in a `build_py` command that runs
protos/generate.py first, so that `pip install .`, `pip install -e .` (whose editable wheel runs
build_py in editable mode and then reads the stubs from the source tree) and `python -m build`
all produce the `pagedserve.v1.*_pb2` modules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_stubs() -> list[Path]:
    """Load protos/generate.py by path (protos/ is not a package) and run it."""
    spec = importlib.util.spec_from_file_location("_pagedserve_generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(ROOT / "protos")


class BuildPyWithStubs(build_py):
    """`build_py` that generates the protobuf and gRPC stubs into protos/pagedserve first."""

    def run(self) -> None:
        for path in _generate_stubs():
            self.announce(f"generated {path.relative_to(ROOT)}", level=2)
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
