"""The README's configuration tables, generated from the config dataclasses' field descriptions.

    python -m clients.config_docs            # print the tables
    python -m clients.config_docs --write    # replace them in README.md
    python -m clients.config_docs --check    # exit 1 when README.md differs from the generated tables

Each table sits between `<!-- config-table:NAME -->` and `<!-- /config-table -->` in README.md; the
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

README = Path(__file__).resolve().parents[1] / "README.md"
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


def render(readme: str) -> str:
    """`readme` with every marked table replaced by the generated one."""
    def replace(match: re.Match[str]) -> str:
        return match.group(1) + table(match.group(2)) + match.group(4)

    return _BLOCK.sub(replace, readme)


def main(argv: Sequence[str] | None = None) -> int:
    """Print, write or check the README's configuration tables."""
    parser = argparse.ArgumentParser(prog="python -m clients.config_docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="replace the tables in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 when README.md's tables are stale")
    args = parser.parse_args(argv)
    current = README.read_text()
    generated = render(current)
    if args.write:
        README.write_text(generated)
    elif args.check:
        if generated != current:
            print("README.md's configuration tables are stale: run python -m clients.config_docs --write",
                  file=sys.stderr)
            return 1
    else:
        for name in TABLES:
            print(f"<!-- config-table:{name} -->\n{table(name)}<!-- /config-table -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
