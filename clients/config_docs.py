"""The configuration tables of docs/configuration.md, generated from the config dataclasses' field
descriptions.

    python -m clients.config_docs            # print the tables
    python -m clients.config_docs --write    # replace them in docs/configuration.md
    python -m clients.config_docs --check    # exit 1 when docs/configuration.md differs from the tables

Each table sits between `<!-- config-table:NAME -->` and `<!-- /config-table -->` in the page; the
flag, environment variable, default and description of every row come from the field's `setting()`,
as `--help` does, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from executor_svc.config import ENV_PREFIX as EXECUTOR_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.settings import Option, options
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_PREFIX
from scheduler_svc.config import SchedulerServiceConfig

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
TABLES = {"scheduler": (SchedulerServiceConfig, SCHEDULER_PREFIX),
          "executor": (ExecutorConfig, EXECUTOR_PREFIX)}
_BLOCK = re.compile(r"(<!-- config-table:(\w+) -->\n)(.*?)(<!-- /config-table -->)", re.DOTALL)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def row(option: Option) -> str:
    """One table row: flag, environment variable, default, and the description with its choices."""
    meaning = option.setting.help
    if option.choices:
        meaning += "; one of " + ", ".join(f"`{choice}`" for choice in option.choices)
    return (f"| `{option.flag}` | `{option.env}` | {_cell(option.default_text)} | {_cell(meaning)} |")


def table(name: str) -> str:
    """The markdown table of config `name` (scheduler or executor), one row per field, by section."""
    cls, prefix = TABLES[name]
    lines = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + [row(option) for option in options(cls, prefix)]) + "\n"


def render(page: str) -> str:
    """`page` with every marked table replaced by the generated one."""
    def replace(match: re.Match[str]) -> str:
        return match.group(1) + table(match.group(2)) + match.group(4)

    return _BLOCK.sub(replace, page)


def main(argv: Sequence[str] | None = None) -> int:
    """Print, write or check the configuration tables of docs/configuration.md."""
    parser = argparse.ArgumentParser(prog="python -m clients.config_docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="replace the tables in docs/configuration.md")
    action.add_argument("--check", action="store_true",
                        help="exit 1 when docs/configuration.md's tables are stale")
    args = parser.parse_args(argv)
    current = CONFIG_DOC.read_text()
    generated = render(current)
    if args.write:
        CONFIG_DOC.write_text(generated)
    elif args.check:
        if generated != current:
            print("docs/configuration.md's tables are stale: run python -m clients.config_docs --write",
                  file=sys.stderr)
            return 1
    else:
        for name in TABLES:
            print(f"<!-- config-table:{name} -->\n{table(name)}<!-- /config-table -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
