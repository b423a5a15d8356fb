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
