"""The GPU serving suite runs end to end on the CPU against the embedded model: our stack, a
chunked-prefill run and both Hugging Face peers on the same trace, into one JSON and one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.loadgen import WorkloadSpec, build_load_requests
from pagedserve.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_suite_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "device" / "serving_suite.py"), "--model",
               default_model_dir(), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
               "--phases", "main,http,chunked,peers", "--num-requests", "4",
               "--peer-continuous-requests", "3",
               "--peer-static-requests", "3", "--static-batch-size", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "serving_suite.json").read_text())
    by_system = {r["system"]: r for r in results}
    # A peer that fails is left out of the table; its subprocess wrote why to the suite's stderr.
    chunked_systems = {f"pagedserve chunked prefill {budget}" for budget in (2048, 4096)}
    frontends = {"pagedserve over grpc", "pagedserve over openai"}
    expected_systems = {"pagedserve", *frontends, *chunked_systems, "hf-continuous", "hf-static"}
    assert set(by_system) == expected_systems, done.stderr[-3000:]
    ours = by_system["pagedserve"]["runs"][0]
    assert ours["client"]["completed"] == 4 and ours["server"]["iterations"] > 0
    # The same requests through both APIs: the same tokens.
    through = {api: by_system[f"pagedserve over {api}"]["runs"][0]["client"] for api in ("grpc", "openai")}
    assert through["grpc"]["output_tokens"] == through["openai"]["output_tokens"] == \
        ours["client"]["output_tokens"]
    assert all(r["runs"][0]["client"]["failed"] == 0 for r in results)
    # The same trace: each peer generated exactly the tokens our load generator asks for.
    model = by_system["pagedserve"]["model"]
    spec = WorkloadSpec(trace="sharegpt", num_requests=3)
    expected = sum(r.output_len for r in build_load_requests(spec, model["vocab_size"], 256))
    assert by_system["hf-continuous"]["runs"][0]["client"]["output_tokens"] == expected
    assert by_system["hf-static"]["runs"][0]["client"]["output_tokens"] == expected
    table = (out / "serving_suite.md").read_text()
    assert "## main" in table and "## chunked" in table and "## peers" in table and "hf-static" in table
    chunked = by_system["pagedserve chunked prefill 2048"]
    assert chunked["config"]["enable_chunked_prefill"] is True
    assert chunked["runs"][0]["client"]["completed"] == 4
