"""The executor host-path benchmark runs, measures every stage, and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_host_path_benchmark_times_every_stage(tmp_path):
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "executor_host_path.py"), "--num-seqs",
                           "4,16", "--context", "40", "--steps", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results_ms"]
    assert set(results) == {"4", "16"}
    for stages in results.values():
        assert all(value > 0 for value in stages.values())
        assert abs(stages["total"] - sum(v for k, v in stages.items() if k != "total")) < 1e-6
    assert "| sequences |" in done.stdout
