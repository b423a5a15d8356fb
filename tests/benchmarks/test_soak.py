"""The soak benchmark, shortened: a mixed load with one executor kill loses no request, leaks no block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_short_soak_with_an_executor_kill_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--minutes", "0.5",
                           "--rate", "8", "--kill-every", "12", "--json", str(out)],
                          capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["executor_kills"] >= 1 and report["requests"] > 50
    assert report["lost"] == 0 and report["leaked_blocks"] == {"gpu": 0, "cpu": 0}
    kinds = {key.split("/")[0] for key in report["outcomes"]}
    assert kinds == {"stream", "parallel", "beam", "cancel", "abort", "bad_field", "bad_bytes"}
    assert "lost requests" in done.stdout
