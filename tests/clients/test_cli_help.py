"""Every flag of every command documents itself: a description, its choices, its default in human units
and, for a config field, its environment variable; every command prints its version; the
configuration tables of docs/configuration.md are the generated ones."""

from __future__ import annotations

import argparse
from importlib import metadata

import pytest

from clients import config_docs
from clients.cli import COMMANDS
from clients.cli import build_parser as pagedserve_parser
from clients.cli import main as pagedserve_main
from executor_svc.__main__ import build_parser as executor_parser
from executor_svc.__main__ import main as executor_main
from executor_svc.config import ENV_PREFIX as EXECUTOR_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.settings import HelpFormatter, Option, options
from scheduler_svc.__main__ import build_parser as scheduler_parser
from scheduler_svc.__main__ import main as scheduler_main
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_PREFIX
from scheduler_svc.config import SchedulerServiceConfig

SKIPPED_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
SCHEDULER_OPTIONS = {option.flag: option for option in options(SchedulerServiceConfig, SCHEDULER_PREFIX)}
EXECUTOR_OPTIONS = {option.flag: option for option in options(ExecutorConfig, EXECUTOR_PREFIX)}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """`pagedserve COMMAND` for every subcommand."""
    parser = pagedserve_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {f"pagedserve {name}": sub for name, sub in subparsers.choices.items()}


def all_parsers() -> dict[str, tuple[argparse.ArgumentParser, dict[str, Option]]]:
    """Every command's parser with the config options its flags come from (executor ones for the executor,
    the scheduler's first elsewhere: `serve` shares --model and the like with the scheduler)."""
    parsers = {"pagedserve": (pagedserve_parser(), {}),
               "pagedserve-scheduler": (scheduler_parser(), SCHEDULER_OPTIONS),
               "pagedserve-executor": (executor_parser(), EXECUTOR_OPTIONS)}
    for name, parser in subcommand_parsers().items():
        parsers[name] = (parser, {**EXECUTOR_OPTIONS, **SCHEDULER_OPTIONS})
    return parsers


def flag_cases() -> list[tuple[str, argparse.Action, Option | None]]:
    cases = []
    for command, (parser, known) in all_parsers().items():
        for action in parser._actions:
            if isinstance(action, SKIPPED_ACTIONS):
                continue
            # A flag is a config field's when its help is that field's (`--seed` of generate is not).
            option = next((known[flag] for flag in action.option_strings
                           if flag in known and action.help == known[flag].help_text()), None)
            cases.append((command, action, option))
    return cases


CASES = flag_cases()


def help_line(action: argparse.Action) -> str:
    return HelpFormatter("prog")._expand_help(action)


def test_every_subcommand_is_walked() -> None:
    assert {name.removeprefix("pagedserve ") for name in subcommand_parsers()} == set(COMMANDS)
    assert len(CASES) > 150


def case_id(case: tuple[str, argparse.Action, Option | None]) -> str:
    command, action, _ = case
    return f"{command}:{action.option_strings[0] if action.option_strings else action.dest}"


@pytest.mark.parametrize(("command", "action", "option"), CASES, ids=[case_id(case) for case in CASES])
def test_every_flag_has_a_description_its_choices_and_its_default(command, action, option) -> None:
    text = help_line(action)
    assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings}: no help"
    assert len(action.help) >= 10, f"{command} {action.option_strings}: {text!r} says too little"
    for choice in action.choices or ():
        assert str(choice) in text, f"{command} {action.option_strings}: choice {choice} not shown"
    if option is not None:
        assert f"default {option.default_text}" in text
        assert f"env {option.env}" in text
        for choice in option.choices:
            assert choice in text
    elif action.option_strings and action.default not in (None, False, True, argparse.SUPPRESS, []):
        assert "default" in text, f"{command} {action.option_strings}: default {action.default!r} not shown"


def test_defaults_are_shown_in_human_units() -> None:
    texts = {flag: help_line(a) for a in scheduler_parser()._actions for flag in a.option_strings}
    assert "default 4 GiB" in texts["--swap-space-bytes"] and "4294967296" not in texts["--swap-space-bytes"]
    assert "default 4 MiB" in texts["--max-request-bytes"]
    assert "default 120 s" in texts["--executor-step-timeout-seconds"]
    assert "choices: auto, swap, recompute" in texts["--preemption-mode"]
    executor = {flag: help_line(a) for a in executor_parser()._actions for flag in a.option_strings}
    assert "default 256 MiB" in executor["--max-message-bytes"]
    assert "choices: auto, float32, float16, bfloat16" in executor["--dtype"]
    assert "choices: auto, cpu, cuda[:N]" in executor["--device"]
    assert "choices: auto, dummy" in executor["--load-format"]
    assert "env PAGEDSERVE_CUDA_KERNELS" in executor["--cuda-kernels"]


def test_full_help_of_every_command_renders(capsys) -> None:
    for command, (parser, _) in all_parsers().items():
        parser.print_help()
        out = capsys.readouterr().out
        assert out.startswith("usage: "), command


@pytest.mark.parametrize(("entry", "argv", "prog"), [
    (pagedserve_main, ["--version"], "pagedserve"),
    *[(pagedserve_main, [name, "--version"], f"pagedserve {name}") for name in COMMANDS],
    (scheduler_main, ["--version"], "pagedserve-scheduler"),
    (executor_main, ["--version"], "pagedserve-executor"),
])
def test_every_command_prints_its_version(entry, argv, prog, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {metadata.version('pagedserve')}"


def test_the_configuration_page_tables_are_the_generated_ones() -> None:
    page = config_docs.CONFIG_DOC.read_text()
    assert "<!-- config-table:scheduler -->" in page and "<!-- config-table:executor -->" in page
    assert config_docs.render(page) == page, "run python -m clients.config_docs --write"


def test_the_tables_list_every_field_once() -> None:
    for name, (cls, prefix) in config_docs.TABLES.items():
        rows = config_docs.table(name).splitlines()[2:]
        assert [row.split("`")[1] for row in rows] == [o.flag for o in options(cls, prefix)]
    row = "| `--swap-space-bytes` | `PAGEDSERVE_SWAP_SPACE_BYTES` | 4 GiB |"
    assert row in config_docs.table("scheduler")


def test_the_docs_check_fails_on_a_stale_table(tmp_path, monkeypatch, capsys) -> None:
    stale = config_docs.CONFIG_DOC.read_text().replace("| 4 GiB |", "| 4294967296 |", 1)
    page = tmp_path / "configuration.md"
    page.write_text(stale)
    monkeypatch.setattr(config_docs, "CONFIG_DOC", page)
    assert config_docs.main(["--check"]) == 1
    assert config_docs.main(["--write"]) == 0
    assert config_docs.main(["--check"]) == 0
    assert "| 4 GiB |" in page.read_text()
