"""Map a frozen config dataclass onto command-line flags and environment variables.

One `--flag` per field (underscores become dashes); each flag defaults to `<PREFIX><FIELD>` from the
environment; a flag given on the command line wins over the environment, which wins over the field's
default. Values are parsed to the type of the field's default; a value that does not parse raises
InvalidArgumentError naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pagedserve.errors import InvalidArgumentError

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str, title: str,
                         exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (but `exclude`), documented with its environment variable."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = default.value if isinstance(default, enum.Enum) else default
        help_text = f"(env {env_prefix}{f.name.upper()}; default {shown})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = [m.value for m in type(default)] if isinstance(default, enum.Enum) else None
            group.add_argument(flag, default=None, choices=choices, help=help_text)


def config_from_sources(cls: type[T], args: argparse.Namespace | None, environ: Mapping[str, str] | None,
                        env_prefix: str, int_fields: tuple[str, ...] = ()) -> T:
    """Build `cls` from flags, then environment, then defaults. `int_fields` lists int | None fields."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(env_prefix + f.name.upper())
        if raw is not None:
            values[f.name] = _parse(f.name, raw, f.default, f.name in int_fields)
    return cls(**values)


def _parse(name: str, raw: object, default: object, is_int: bool) -> object:
    """Convert a flag or environment string to the type of the field's default."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, enum.Enum):
            return type(default)(raw.lower())
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int) or is_int:
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise InvalidArgumentError(name, f"cannot parse {raw!r}") from None
    return raw
