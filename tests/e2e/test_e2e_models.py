"""`serve --model` with a Hugging Face repo id from the local hub cache, and models it cannot serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from e2e_stack import REPO, require_model

from pagedserve.default_model import default_model_dir
from tests.hub_cache import cache_model

MODEL = Path(default_model_dir())
PROMPT = "def fibonacci(n):"


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pagedserve serve` run to its end: these tests give it a model it must refuse at start."""
    command = [sys.executable, "-m", "clients.cli", "serve", "--port", "0", "--metrics-port", "-1", *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def demo_completion(*flags: str, env: dict[str, str]) -> str:
    """The demo completion `serve` streams with `flags`, read until its closing `---` line."""
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--port", "0", "--metrics-port",
                             "-1", "--demo-prompt", PROMPT, "--demo-max-tokens", "12", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    lines: list[str] = []
    try:
        while (line := proc.stdout.readline()) and not (line.startswith("---") and lines):
            if lines or line.startswith("--- completion of"):
                lines.append(line)
    finally:
        proc.send_signal(2)
        # communicate, not wait: the logs still coming on stderr must be drained, or a full pipe blocks
        # the stack's shutdown and the wait times out.
        _, stderr = proc.communicate(timeout=60)
    assert lines, stderr[-3000:]
    return "".join(lines[1:])               # the prompt and its completion, after the header line


def test_serve_streams_from_a_repo_id_in_the_hub_cache_as_from_the_directory(tmp_path):
    require_model()
    cache_model(tmp_path / "hf", "pagedserve/stdlib-llama", MODEL)
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    from_hub = demo_completion("--model", "pagedserve/stdlib-llama", env=offline)
    assert from_hub.startswith(PROMPT) and len(from_hub) > len(PROMPT)
    assert from_hub == demo_completion("--model", str(MODEL), env=offline)


def test_a_repo_missing_from_the_cache_stops_serve_naming_it_and_where_it_looked(tmp_path):
    done = serve("--model", "org/absent", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()
    failure = [line for line in last if line.startswith("pagedserve serve:")]
    assert len(failure) == 1, done.stderr
    assert "failed to start" in failure[0] and "'org/absent'" in failure[0]
    assert str(tmp_path / "hf" / "hub" / "models--org--absent") in failure[0]


def test_an_unsupported_architecture_stops_serve_listing_the_supported_ones(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["RwkvForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    done = serve("--model", str(model))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert ("pagedserve serve: executor-0 failed to start (exit code 1): pagedserve-executor: cannot start: "
            "architecture 'RwkvForCausalLM' is not supported; supported: GPT2LMHeadModel, LlamaForCausalLM, "
            "MistralForCausalLM, OPTForCausalLM") in done.stderr.splitlines(), done.stderr
