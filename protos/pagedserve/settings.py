"""Config dataclass fields described once, and read from flags, environment and a config file.

A field declared with `setting(default, help, ...)` carries its one-line description, its unit (bytes
or seconds, for parsing and for showing the default in human units), its choices and its environment
variable. From that one description come the command-line flag and its --help line, the environment
variable, the config-file key and the tables of docs/configuration.md. A field declared with
`section(cls, title)` composes another config dataclass; its fields keep flat names (`--port`,
`PAGEDSERVE_PORT`), grouped under the title in --help.

A value is taken from the first source that has it: the flag, then the environment variable, then the
config file (`--config FILE`, TOML or YAML), then the field's default. A value that does not parse or
validate raises SettingError, which names the flag and the source of the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import logging
import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pagedserve.errors import InvalidArgumentError

T = TypeVar("T")
log = logging.getLogger("pagedserve.config")

SETTING = "pagedserve.setting"
SECTION = "pagedserve.section"
BYTES = "bytes"
SECONDS = "seconds"
DEFAULT_SOURCE = "the default"
# Binary multiples only: a decimal "GB" would be ambiguous, so it is refused rather than guessed.
_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?b|i)?|(b))?\s*$", re.IGNORECASE)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# PAGEDSERVE_* variables that are not config fields but are read elsewhere (the embedded model's
# location, the client's token, compose's mount, test switches), so they draw no unknown-name warning.
# The executor's variables: its prefix, and the kernel switches, which keep their historical names. A
# service sees the whole stack's environment under `pagedserve serve` and in compose files, so each one
# checks only its own names and leaves the other's to it (neither service imports the other).
EXECUTOR_ENV_PREFIX = "PAGEDSERVE_EXECUTOR_"
EXECUTOR_KERNEL_VARIABLES = frozenset({"PAGEDSERVE_CUDA_KERNELS", "PAGEDSERVE_FUSED_LAYERS",
                                       "PAGEDSERVE_KERNEL_CACHE"})


def is_executor_variable(name: str) -> bool:
    """Whether a PAGEDSERVE_* environment variable is the executor's to read (and to check)."""
    return name.startswith(EXECUTOR_ENV_PREFIX) or name in EXECUTOR_KERNEL_VARIABLES


PROCESS_VARIABLES = frozenset({
    "PAGEDSERVE_DEFAULT_MODEL", "PAGEDSERVE_TOKEN", "PAGEDSERVE_MODELS_DIR",
    "PAGEDSERVE_REQUIRE_DOCKER_TOOLS", "PAGEDSERVE_REQUIRE_PROMETHEUS", "PAGEDSERVE_FUZZ_SEED",
    "PAGEDSERVE_FUZZ_CASES", "PAGEDSERVE_LOG_LEVEL", "PAGEDSERVE_LOG_FORMAT",
    "PAGEDSERVE_LOG_REQUESTS",
})


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """How one config field is described: the metadata `setting()` attaches to it."""

    help: str
    unit: str = ""                      # BYTES or SECONDS: parsed and shown in those units
    env: str = ""                       # its environment variable, when not <PREFIX><FIELD>
    default_text: str = ""              # the default in words, where the value says too little
    choices: tuple[str, ...] = ()       # the accepted values of a string field, as shown
    metavar: str = ""                   # the value's name in --help (FILE, HOST:PORT)


def setting(default: Any, help: str, *, unit: str = "", env: str = "", default_text: str = "",
            choices: Iterable[str] = (), metavar: str = "") -> Any:
    """A config dataclass field with its description; see the module docstring."""
    described = Setting(help, unit, env, default_text, tuple(choices), metavar)
    return dataclasses.field(default=default, metadata={SETTING: described})


def section(cls: type, title: str) -> Any:
    """A field composing the config dataclass `cls` (default: its defaults) under the --help group `title`."""
    return dataclasses.field(default_factory=cls, metadata={SECTION: title})


class SettingError(InvalidArgumentError):
    """A config value that does not parse or validate, with the flag it belongs to and where it came from.

    Its text is one line, e.g. `--max-model-len (from PAGEDSERVE_MAX_MODEL_LEN): must be at least 2, got -3`;
    a value given as the flag itself names the field instead (`--block-size (block_size, from the command
    line): ...`), which is also its config-file key.
    """

    def __init__(self, field: str, message: str, flag: str, source: str) -> None:
        super().__init__(field, message)
        self.flag = flag
        self.source = source
        origin = f"{field}, from the command line" if source == flag else f"from {source}"
        self.args = (f"{flag} ({origin}): {message}",)


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One leaf field of a (possibly composed) config dataclass, as a flag, a variable and a file key."""

    path: tuple[str, ...]               # attribute path from the outer config
    kind: type                          # bool, int, float, str or an Enum class
    optional: bool                      # whether None is a value (an `int | None` field)
    default: Any
    setting: Setting
    env: str
    group: str                          # the --help group: the section's title

    @property
    def name(self) -> str:
        """The field's name, which is also its config-file key."""
        return self.path[-1]

    @property
    def flag(self) -> str:
        """The command-line flag: the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...]:
        """The values shown as its choices (an enum's values, or the setting's)."""
        if issubclass(self.kind, enum.Enum):
            return tuple(member.value for member in self.kind)
        return self.setting.choices

    @property
    def default_text(self) -> str:
        """The default in human units: `4 GiB`, `120 s`, `on`, or the setting's words."""
        if self.setting.default_text:
            return self.setting.default_text
        return format_value(self.default, self.setting.unit)

    def help_text(self) -> str:
        """The --help line: description, choices, default and environment variable."""
        parts = [f"choices: {', '.join(self.choices)}"] if self.choices else []
        parts += [f"default {self.default_text}", f"env {self.env}"]
        return f"{self.setting.help} ({'; '.join(parts)})".replace("%", "%%")


def options(cls: type, env_prefix: str, group: str = "", path: tuple[str, ...] = ()) -> list[Option]:
    """Every leaf field of `cls`, sections expanded in order; names must be unique across sections."""
    hints = typing.get_type_hints(cls)
    found: list[Option] = []
    for f in dataclasses.fields(cls):
        if SECTION in f.metadata:
            found += options(hints[f.name], env_prefix, f.metadata[SECTION], (*path, f.name))
            continue
        described = f.metadata.get(SETTING) or Setting(help="")
        kind, optional = _kind(hints[f.name], f.default)
        found.append(Option((*path, f.name), kind, optional, f.default, described,
                            described.env or env_prefix + f.name.upper(), group))
    names = [option.name for option in found]
    duplicated = {name for name in names if names.count(name) > 1}
    assert not duplicated, f"{cls.__name__}: fields named alike in two sections: {sorted(duplicated)}"
    return found


def _kind(hint: Any, default: Any) -> tuple[type, bool]:
    """The value type of a field and whether it is optional, from its type hint."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):
        return args[0], True
    return (hint if isinstance(hint, type) else type(default)), False


def env_names(cls: type, env_prefix: str) -> set[str]:
    """The environment variables of every field of `cls`."""
    return {option.env for option in options(cls, env_prefix)}


# ---------------------------------------------------------------- values

def parse_byte_size(text: str) -> int:
    """`4GiB`, `512MiB`, `4G`, `4g`, `1.5GiB` or a plain number of bytes; K, M, G, T are powers of 1024."""
    match = _BYTE_SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a byte size such as 4GiB, 512MiB, 4G or 4294967296, got {text!r}")
    number, prefix, suffix, bare = match.groups()
    if prefix and suffix and suffix.lower() == "b":
        raise ValueError(f"{text!r} is ambiguous (decimal or binary?): write {number}{prefix.upper()}iB")
    value = float(number) * _BYTE_UNITS[(prefix or bare or "").lower()]
    if value != math.floor(value):
        raise ValueError(f"expected a whole number of bytes, got {text!r}")
    return int(value)


def format_bytes(value: int) -> str:
    """The largest binary unit that states `value` exactly: 4294967296 -> `4 GiB`."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} B"


def format_value(value: Any, unit: str = "") -> str:
    """A value as --help, the configuration docs and error messages show it."""
    if value is None or value == "":
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if unit == BYTES:
        return format_bytes(value)
    if unit == SECONDS:
        return f"{value:g} s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_value(option: Option, raw: Any) -> Any:
    """Convert a flag, environment or config-file value to the option's type; ValueError says why not."""
    if raw is None:
        if option.optional:
            return None
        raise ValueError("needs a value")
    if option.kind is bool:
        return parse_bool(raw)
    if isinstance(raw, bool):
        raise ValueError(f"expected {_expected(option)}, got {raw!r}")
    if issubclass(option.kind, enum.Enum):
        try:
            return option.kind(str(raw).lower())
        except ValueError:
            raise ValueError(f"expected one of {', '.join(option.choices)}, got {raw!r}") from None
    if option.setting.unit == BYTES:
        return raw if isinstance(raw, int) else parse_byte_size(str(raw))
    if option.kind is int:
        return _parse_number(int, raw, option)
    if option.kind is float:
        return float(_parse_number(float, raw, option))
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def parse_bool(raw: Any) -> bool:
    """`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` (any case); ValueError for anything else."""
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in _TRUE + _FALSE:
        return str(raw).lower() in _TRUE
    raise ValueError(f"expected true or false (1/0, yes/no, on/off), got {raw!r}")


def _parse_number(kind: type, raw: Any, option: Option) -> Any:
    if isinstance(raw, int | float) and (kind is float or isinstance(raw, int)):
        return raw
    try:
        return kind(str(raw))
    except ValueError:
        raise ValueError(f"expected {_expected(option)}, got {raw!r}") from None


def _expected(option: Option) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}.get(option.kind, "a string")


# ---------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True, slots=True)
class ConfigFile:
    """The settings of a config file, keys normalized to field names, and the file's name for messages."""

    path: str
    values: Mapping[str, Any]

    @property
    def source(self) -> str:
        """How error messages name it."""
        return f"config file {self.path}"

    def only(self, keys: Iterable[str]) -> ConfigFile:
        """The same file with only these keys: what a command that warned about the others reads."""
        wanted = set(keys)
        return ConfigFile(self.path, {key: value for key, value in self.values.items() if key in wanted})


def load_config_file(path: str | Path) -> ConfigFile:
    """Read a TOML (.toml) or YAML (.yaml, .yml) file of settings.

    Keys are field names, with dashes or underscores (`max-model-len`, `max_model_len`); a table named like
    a section (`[serving]`) holds that section's keys. A file that cannot be read or parsed raises
    SettingError naming --config.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = _parse_document(path, text)
    except (OSError, ValueError) as err:
        raise SettingError("config", f"cannot read {path}: {err}", "--config", str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingError("config", f"{path} must hold a table of settings", "--config", str(path))
    return ConfigFile(str(path), _flatten(data))


def _parse_document(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml  # only a YAML config file needs PyYAML

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(str(err).replace("\n", " ")) from None
    raise ValueError("expected a .toml, .yaml or .yml file")


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Tables (a section's settings) merged into one level; keys with dashes become underscores."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value))
        else:
            flat[str(key).replace("-", "_")] = value
    return flat


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name` (difflib), or None when none is close."""
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _unknown_message(what: str, name: str, candidates: Iterable[str]) -> str:
    suggestion = closest(name, candidates)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return f"unknown {what} {name} is ignored{hint}"


def unknown_environment(environ: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """A warning for each PAGEDSERVE_* variable in `environ` that is neither in `known` nor a process one."""
    names = set(known) | PROCESS_VARIABLES
    return [_unknown_message("environment variable", name, names) for name in sorted(environ)
            if name.startswith("PAGEDSERVE_") and name not in names]


def unknown_file_keys(config_file: ConfigFile, known: Iterable[str]) -> list[str]:
    """A warning for each key of the config file that names no setting."""
    names = set(known)
    return [_unknown_message(f"key in {config_file.source}:", key, names)
            for key in config_file.values if key not in names]


def warn(messages: Iterable[str]) -> None:
    """Log each warning (stderr, before or after logging is configured)."""
    for message in messages:
        log.warning("%s", message)


def resolve(cls: type[T], env_prefix: str, args: argparse.Namespace | None = None,
            environ: Mapping[str, str] | None = None, config_file: ConfigFile | None = None) -> T:
    """Build `cls` taking each field from the flag, else the environment, else the file, else the default."""
    environ = {} if environ is None else environ
    values: dict[tuple[str, ...], Any] = {}
    sources: dict[str, str] = {}
    all_options = options(cls, env_prefix)
    for option in all_options:
        raw, source = _pick(option, args, environ, config_file)
        sources[option.name] = source
        if source != DEFAULT_SOURCE:
            try:
                values[option.path] = parse_value(option, raw)
            except ValueError as err:
                raise SettingError(option.name, str(err), option.flag, source) from None
    try:
        return _build(cls, values, ())
    except SettingError:
        raise
    except InvalidArgumentError as err:
        flags = {option.name: option.flag for option in all_options}
        raise SettingError(err.field, err.message, flags.get(err.field, "--" + err.field.replace("_", "-")),
                           sources.get(err.field, DEFAULT_SOURCE)) from None


def _pick(option: Option, args: argparse.Namespace | None, environ: Mapping[str, str],
          config_file: ConfigFile | None) -> tuple[Any, str]:
    """The raw value of `option` and where it came from: flag > environment > file > default."""
    flag_value = getattr(args, option.name, None) if args is not None else None
    if flag_value is not None:
        return flag_value, option.flag
    if option.env in environ:
        return environ[option.env], option.env
    if config_file is not None and option.name in config_file.values:
        return config_file.values[option.name], config_file.source
    return option.default, DEFAULT_SOURCE


def _build(cls: type[T], values: Mapping[tuple[str, ...], Any], path: tuple[str, ...]) -> T:
    """Construct `cls` and its sections from the values given by attribute path (the rest default)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if SECTION in f.metadata:
            kwargs[f.name] = _build(hints[f.name], values, (*path, f.name))
        elif (*path, f.name) in values:
            kwargs[f.name] = values[(*path, f.name)]
    return cls(**kwargs)


# ---------------------------------------------------------------- flags

def add_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str, title: str = "",
                  exclude: Iterable[str] = ()) -> None:
    """One flag per leaf field of `cls` (but `exclude`), in one --help group per section.

    Every flag defaults to None (not given), so `resolve` can tell a flag given from one left out.
    """
    left_out = set(exclude)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options(cls, env_prefix, title):
        if option.name in left_out:
            continue
        group_title = option.group or title or cls.__name__
        if group_title not in groups:
            groups[group_title] = parser.add_argument_group(group_title)
        add_option(groups[group_title], option)


def add_option(group: argparse._ArgumentGroup | argparse.ArgumentParser, option: Option) -> None:
    """The flag of one option, documented by its setting."""
    if option.kind is bool:
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None,
                           help=option.help_text())
        return
    # Enum choices are checked by argparse, as before; shown choices of strings are checked by the config.
    choices = option.choices if issubclass(option.kind, enum.Enum) else None
    metavar = None if choices else _metavar(option)
    group.add_argument(option.flag, default=None, choices=choices, metavar=metavar, help=option.help_text())


def _metavar(option: Option) -> str:
    if option.setting.metavar:
        return option.setting.metavar
    if option.setting.choices:
        return "{" + ",".join(option.setting.choices) + "}"
    if option.setting.unit == BYTES:
        return "SIZE"
    if option.setting.unit == SECONDS:
        return "SECONDS"
    return {int: "N", float: "X"}.get(option.kind, option.name.upper())


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    """--config FILE: settings from a TOML or YAML file, under flags and environment."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from this TOML (.toml) or YAML (.yaml) file; keys are the flag "
                             "names (dashes or underscores); a flag or environment variable overrides "
                             "the file (default none)")


def config_file_from_args(args: argparse.Namespace | None) -> ConfigFile | None:
    """The file --config names, read; None without one."""
    path = getattr(args, "config", None) if args is not None else None
    return None if path is None else load_config_file(path)


def package_version() -> str:
    """The installed pagedserve distribution's version (`unknown` when run from a tree never installed)."""
    from importlib import metadata

    try:
        return metadata.version("pagedserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """--version: print `PROG VERSION` and exit."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and adds a flag's choices and default where its help leaves them out.

    Flags of config fields state both already (Option.help_text); this covers every other flag the same way.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        extra = []
        if action.choices and "choices" not in text and not isinstance(action, argparse._SubParsersAction):
            extra.append("choices: " + ", ".join(map(str, action.choices)))
        if "default" not in text and _shows_default(action):
            shown = format_value(action.default)
            extra.append(f"default {str(shown).replace('%', '%%')}")
        return f"{text} ({'; '.join(extra)})" if extra else text


def _shows_default(action: argparse.Action) -> bool:
    """Whether the default says something: not for switches, --help, --version or a flag with no default."""
    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                argparse._VersionAction, argparse._AppendAction)
    return (not isinstance(action, switches) and action.default not in (None, argparse.SUPPRESS)
            and bool(action.option_strings))


def values_of(config: Any, env_prefix: str) -> list[tuple[Option, Any]]:
    """Every leaf option of `config` with its value (sections walked)."""
    found = []
    for option in options(type(config), env_prefix):
        value = config
        for name in option.path:
            value = getattr(value, name)
        found.append((option, value))
    return found


def environment_of(config: Any, env_prefix: str) -> dict[str, str]:
    """`config` as the environment variables that rebuild it (None values left out)."""
    env = {}
    for option, value in values_of(config, env_prefix):
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[option.env] = str(value)
    return env


def from_command_line(cls: type[T], env_prefix: str, args: argparse.Namespace,
                      known_environment: Iterable[str], environ: Mapping[str, str] | None = None) -> T:
    """A service's config as its main builds it: the --config file read, unknown file keys and PAGEDSERVE_*
    variables warned about (with the closest valid name), then every field resolved."""
    environ = os.environ if environ is None else environ
    config_file = config_file_from_args(args)
    if config_file is not None:
        warn(unknown_file_keys(config_file, {option.name for option in options(cls, env_prefix)}))
    warn(unknown_environment(environ, known_environment))
    return resolve(cls, env_prefix, args, environ, config_file)


def error_line(prog: str, err: InvalidArgumentError) -> str:
    """The one line a command prints for a bad setting: `PROG: error: --flag (from SOURCE): why`."""
    return f"{prog}: error: {err}" if isinstance(err, SettingError) else f"{prog}: invalid {err}"


def build(cls: type[T], **fields: Any) -> T:
    """`cls` from fields given by their flat names, each put into its section (the rest default)."""
    paths = {option.name: option.path for option in options(cls, "")}
    unknown = sorted(set(fields) - set(paths))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return _build(cls, {paths[name]: value for name, value in fields.items()}, ())
