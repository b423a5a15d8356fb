"""The README's two first commands stay the ones CI and users run."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line.strip() for line in lines[:12] if line.startswith("    ")]


def test_readme_opens_with_a_run_and_a_test_command():
    run, test = readme_commands()[:2]
    assert run.startswith("python3 -m venv .venv") and "pagedserve" in run
    assert test.startswith("python3 -m venv .venv") and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in (line.strip() for line in ci)


def test_the_run_command_serves_the_embedded_model_and_streams_a_completion():
    import shlex

    from clients.cli import build_parser
    from pagedserve.default_model import default_model_dir

    run = readme_commands()[0]
    assert "torch==2.13.0" in run and "[executor]" in run     # the CPU torch before the executor extra
    words = shlex.split(run.split("&&")[-1])
    assert words[0] == ".venv/bin/pagedserve"
    args = build_parser().parse_args(words[1:])
    assert args.command == "serve" and args.demo_prompt        # tests/e2e runs this same command
    assert (Path(default_model_dir()) / "model.safetensors").exists()
