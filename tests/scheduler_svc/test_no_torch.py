"""Invariant 1: the scheduler never imports torch, so its container needs no CUDA.

The scheduler imports the neutral `pagedserve` package (the executor contract and shared utilities),
so its modules are checked here as well.
"""

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pagedserve
import scheduler_svc

REPO = Path(__file__).resolve().parents[2]


def test_importing_every_scheduler_module_never_imports_torch(tmp_path):
    # A decoy torch package first on the path records any import attempt, so the test fails even on
    # a machine where the real torch is not installed.
    decoy = tmp_path / "decoy" / "torch"
    decoy.mkdir(parents=True)
    marker = tmp_path / "torch-was-imported"
    (decoy / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    modules = sorted(m.name for m in pkgutil.walk_packages(scheduler_svc.__path__, "scheduler_svc."))
    modules += sorted(m.name for m in pkgutil.walk_packages(pagedserve.__path__, "pagedserve."))
    assert "scheduler_svc.scheduler" in modules and "scheduler_svc.engine" in modules
    assert "pagedserve.contract.plan_codec" in modules and "pagedserve.contract.sequence_registry" in modules
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.path[:0] = [{str(tmp_path / 'decoy')!r}, {str(REPO)!r}]
        for name in {modules!r}:
            importlib.import_module(name)
        assert "torch" not in sys.modules, "torch in sys.modules"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "a scheduler_svc or pagedserve module imported torch"


def test_the_decoy_would_notice_an_import(tmp_path):
    decoy = tmp_path / "decoy" / "torch"
    decoy.mkdir(parents=True)
    marker = tmp_path / "imported"
    (decoy / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'decoy')!r}); "
                    "import torch"], check=True)
    assert marker.exists()
