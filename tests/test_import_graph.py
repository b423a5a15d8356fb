"""The two services are peers that meet in a contract: neither imports the other.

scheduler_svc and executor_svc may import the neutral `pagedserve` package (the gRPC stubs, the
executor contract in `pagedserve.contract`, the utilities both use), and `pagedserve` imports neither
service. Every import statement counts, wherever it sits: at module level, inside a function, under
`if TYPE_CHECKING:`, or as an `importlib.import_module("...")` call with a literal name. Only clients/,
tests/ and benchmarks/ may join both services (clients/simulation.py runs the scheduler against the
simulated executor).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# package -> (its source folder, the top-level packages it must never import)
RULES: dict[str, tuple[Path, frozenset[str]]] = {
    "scheduler_svc": (REPO / "scheduler_svc", frozenset({"executor_svc", "clients"})),
    "executor_svc": (REPO / "executor_svc", frozenset({"scheduler_svc", "clients"})),
    "pagedserve": (REPO / "protos" / "pagedserve", frozenset({"scheduler_svc", "executor_svc", "clients"})),
}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved against `module`."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.append((node.lineno, target))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in {"__import__", "import_module"}))):
            names.append((node.lineno, node.args[0].value))
    return names


def forbidden_imports(package: str, root: Path, banned: frozenset[str]) -> list[str]:
    """`file:line imports name` for every import under `root` whose top-level package is in `banned`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(package, root, path)
        for line, name in imported_names(path.read_text(), module, path.name == "__init__.py"):
            if name.split(".")[0] in banned:
                shown = path.relative_to(REPO if path.is_relative_to(REPO) else root.parent)
                found.append(f"{shown}:{line} imports {name}")
    return found


def test_neither_service_imports_the_other_and_the_contract_imports_neither():
    found = []
    for package, (root, banned) in RULES.items():
        assert (root / "__init__.py").exists(), root
        found += forbidden_imports(package, root, banned)
    assert not found, "imports across the service boundary:\n" + "\n".join(found)


def test_the_check_sees_imports_in_functions_and_type_checking_blocks(tmp_path):
    root = tmp_path / "executor_svc"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from .. import a\nimport scheduler_svc\n")
    (root / "a.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        import pagedserve.contract.plan
        from executor_svc import b
        if TYPE_CHECKING:
            from scheduler_svc.outputs import RequestOutput
        def f():
            import scheduler_svc.engine
            return importlib.import_module("scheduler_svc.scheduler")
        """))
    found = forbidden_imports("executor_svc", root, frozenset({"scheduler_svc"}))
    assert found == ["executor_svc/a.py:5 imports scheduler_svc.outputs",
                     "executor_svc/a.py:7 imports scheduler_svc.engine",
                     "executor_svc/a.py:8 imports scheduler_svc.scheduler",
                     "executor_svc/sub/__init__.py:2 imports scheduler_svc"]


def test_relative_imports_resolve_against_the_importing_module():
    source = "from .. import a\nfrom .c import d\nfrom . import e\n"
    assert imported_names(source, "executor_svc.sub", is_package=True) == [
        (1, "executor_svc"), (2, "executor_svc.sub.c"), (3, "executor_svc.sub")]
    assert imported_names(source, "executor_svc.sub.m", is_package=False) == [
        (1, "executor_svc"), (2, "executor_svc.sub.c"), (3, "executor_svc.sub")]


def _modules_after_importing(modules: list[str]) -> set[str]:
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.path.insert(0, {str(REPO)!r})
        for name in {modules!r}:
            importlib.import_module(name)
        print("\\n".join(sorted(sys.modules)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_executor_server_loads_no_scheduler_module():
    modules = ["executor_svc.__main__", "executor_svc.server", "executor_svc.simulated_backend"]
    if importlib.util.find_spec("torch") is not None:
        modules += ["executor_svc.model_backend", "executor_svc.runner"]
    loaded = _modules_after_importing(modules)
    assert set(modules) <= loaded
    assert not sorted(m for m in loaded if m.split(".")[0] in {"scheduler_svc", "clients"})
    assert "pagedserve.contract.plan_codec" in loaded


def test_the_scheduler_server_loads_no_executor_module_and_no_torch():
    modules = ["scheduler_svc.__main__", "scheduler_svc.server", "scheduler_svc.engine"]
    loaded = _modules_after_importing(modules)
    assert set(modules) <= loaded
    assert not sorted(m for m in loaded if m.split(".")[0] in {"executor_svc", "clients", "torch"})
    assert "pagedserve.contract.plan_codec" in loaded
