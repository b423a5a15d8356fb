"""Read the deployment files under docker/ the way Docker reads them, for tests that have no Docker engine.

Compose files are merged here with the rules docker-compose applies to the keys these files use
(mappings merge key by key, scalars are replaced, device and port lists are unioned, `extends` copies a
service from another file, `${VAR:-default}` is interpolated); a test compares this merge with the
real `docker-compose config` wherever the tool is installed, so the tests that rely on it check what
Compose would run. Dockerfiles are read for their ENV, COPY, USER, CMD and HEALTHCHECK instructions.

Tools the checks need (docker-compose, hadolint) are skipped where missing, except when
PAGEDSERVE_REQUIRE_DOCKER_TOOLS=1 (CI sets it), where a missing tool fails the test instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests import required_tools

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BASE = DOCKER / "docker-compose.yml"
GPU = DOCKER / "docker-compose.gpu.yml"
CPU = DOCKER / "docker-compose.cpu.yml"
TP2 = DOCKER / "docker-compose.tp2.yml"
REQUIRE_ENV = "PAGEDSERVE_REQUIRE_DOCKER_TOOLS"
SCALE_OUT = "scale-out"


@dataclass(frozen=True)
class Layout:
    """One supported way to run the stack: compose files in order, the profiles enabled, and the
    `pagedserve serve` flags that start the same stack on one machine."""

    name: str
    files: tuple[Path, ...]
    serve_flags: tuple[str, ...]
    profiles: frozenset[str] = field(default_factory=frozenset)

    @property
    def compose_args(self) -> list[str]:
        """`-f FILE ...` (and `--profile P`) as docker-compose takes them."""
        args = [arg for path in self.files for arg in ("-f", str(path))]
        return args + [arg for profile in sorted(self.profiles) for arg in ("--profile", profile)]


LAYOUTS = (
    Layout("base", (BASE,), ()),
    Layout("gpu", (BASE, GPU), ("--device", "cuda")),
    Layout("cpu", (BASE, CPU), ("--device", "cpu", "--dtype", "float32")),
    Layout("tp2", (BASE, GPU, TP2), ("--device", "cuda", "--executors", "2")),
    Layout("gpu-scale-out", (BASE, GPU), ("--device", "cuda"), frozenset({SCALE_OUT})),
    Layout("cpu-scale-out", (BASE, CPU), ("--device", "cpu", "--dtype", "float32"), frozenset({SCALE_OUT})),
)


def layout_named(name: str) -> Layout:
    """The layout called `name` in LAYOUTS."""
    return next(layout for layout in LAYOUTS if layout.name == name)


def require_tool(name: str, install_hint: str) -> str:
    """The path of tool `name`; skips the test where it is missing, or fails it when
    PAGEDSERVE_REQUIRE_DOCKER_TOOLS=1."""
    return required_tools.require_tool(name, install_hint, REQUIRE_ENV)


# ---------------------------------------------------------------- interpolation

_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Substitute `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$` in the strings of `value`."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, default, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        current = environ.get(name)
        if operator == ":-" and not current:
            return default
        if operator == "-" and current is None:
            return default
        return current or ""

    return _VARIABLE.sub(substitute, value)


# ---------------------------------------------------------------- merging

def environment_mapping(value: Any) -> dict[str, str]:
    """A service's `environment` (mapping or KEY=VALUE list) as a mapping of strings."""
    if value is None:
        return {}
    if isinstance(value, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in value)
        return {key: val for key, val in pairs}
    return {key: "" if val is None else str(val) for key, val in value.items()}


def depends_on_mapping(value: Any) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    return {name: dict(spec or {"condition": "service_started"}) for name, spec in value.items()}


def _union(base: list[Any], override: list[Any]) -> list[Any]:
    merged = list(base)
    for item in override:
        if item not in merged:
            merged.append(item)
    return merged


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged onto `base` as docker-compose merges one service over another."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key == "environment":
            merged[key] = {**environment_mapping(merged.get(key)), **environment_mapping(value)}
        elif key == "depends_on":
            merged[key] = {**depends_on_mapping(merged.get(key)), **depends_on_mapping(value)}
        elif key in ("ports", "volumes", "profiles"):
            merged[key] = _union(merged.get(key, []), value)
        elif key == "deploy":
            merged[key] = _merge_deploy(merged.get(key, {}), value)
        elif key in ("build", "healthcheck") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_deploy(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    base_devices = base.get("resources", {}).get("reservations", {}).get("devices", [])
    override_devices = override.get("resources", {}).get("reservations", {}).get("devices", [])
    merged = {**copy.deepcopy(base), **{k: v for k, v in override.items() if k != "resources"}}
    if base_devices or override_devices:
        merged.setdefault("resources", {}).setdefault("reservations", {})["devices"] = _union(
            base_devices, override_devices)
    return merged


def _read(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), environ)


def load_compose(files: Iterable[Path], environ: Mapping[str, str] | None = None,
                 profiles: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The services the compose `files` define together, with `profiles` enabled (others are dropped).

    `environ` is what `${...}` sees (empty by default: every variable takes its default).
    """
    environ = {} if environ is None else environ
    services: dict[str, dict[str, Any]] = {}
    for path in files:
        for name, service in (_read(path, environ).get("services") or {}).items():
            service = dict(service or {})
            if "extends" in service:
                extends = service.pop("extends")
                source = path.parent / extends.get("file", path.name)
                parent = dict(_read(source, environ)["services"][extends["service"]])
                parent.pop("depends_on", None)     # never inherited through extends
                service = merge_service(parent, service)
            services[name] = merge_service(services[name], service) if name in services else service
    enabled = set(profiles)
    return {name: service for name, service in services.items()
            if not service.get("profiles") or enabled & set(service["profiles"])}


def docker_compose_config(layout: Layout, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose ... config` of `layout` (the real tool's merge), parsed; fails on a non-zero exit."""
    binary = require_tool("docker-compose", "apt-get install docker-compose")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(environ or {})}
    result = subprocess.run([binary, *layout.compose_args, "config"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"docker-compose config failed for {layout.name}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def gpu_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The device requests a service reserves (an empty list: no GPU)."""
    return list(service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []))


def volume_mounts(service: Mapping[str, Any], compose_dir: Path = DOCKER) -> dict[PurePosixPath, Path]:
    """A service's bind mounts: container path -> host path (relative sources resolved from `compose_dir`)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[PurePosixPath(target)] = (compose_dir / source).resolve()
    return mounts


# ---------------------------------------------------------------- Dockerfiles

@dataclass(frozen=True)
class Dockerfile:
    """The instructions of a Dockerfile's final stage that the tests look at."""

    path: Path
    env: dict[str, str]
    copies: list[tuple[Path, PurePosixPath]]    # (file or directory of the repository, its path in the image)
    users: list[str]
    cmd: list[str]
    entrypoint: list[str] | None
    healthcheck: str
    runs: list[str]
    workdir: str


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    pairs = [[*line.split(None, 1), ""][:2] for line in joined]
    return [(name.upper(), args) for name, args in pairs]


def read_dockerfile(path: Path) -> Dockerfile:
    """Parse the final stage of the Dockerfile at `path`."""
    instructions = _instructions(path.read_text())
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    env: dict[str, str] = {}
    copies, users, runs = [], [], []
    cmd: list[str] = []
    entrypoint = None
    healthcheck = ""
    workdir = "/"
    for name, args in instructions[last_from + 1:]:
        if name == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
        elif name == "COPY" and not args.startswith("--from"):
            *sources, destination = shlex.split(args)
            into_directory = destination.endswith("/") or len(sources) > 1
            target = PurePosixPath(workdir) / destination
            for source in sources:
                host = (REPO / source).resolve()
                copies.append((host, target / host.name if into_directory and host.is_file() else target))
        elif name == "USER":
            users.append(args.strip())
        elif name == "CMD":
            cmd = json.loads(args)
        elif name == "ENTRYPOINT":
            entrypoint = json.loads(args)
        elif name == "HEALTHCHECK":
            healthcheck = args
        elif name == "RUN":
            runs.append(args)
        elif name == "WORKDIR":
            workdir = args.strip()
    return Dockerfile(path, env, copies, users, cmd, entrypoint, healthcheck, runs, workdir)


def image_path_on_host(dockerfile: Dockerfile, container_path: str) -> Path | None:
    """The file of the build context that an image path came from by COPY, or None."""
    target = PurePosixPath(container_path)
    for host, image in dockerfile.copies:
        if target == image or (host.is_dir() and image in target.parents):
            return host / target.relative_to(image)
    return None


def service_dockerfile(service: Mapping[str, Any]) -> Path | None:
    """The Dockerfile a compose service builds its image from (None for a pulled image)."""
    build = service.get("build")
    if not build:
        return None
    return (DOCKER / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()


# ---------------------------------------------------------------- PagedServe services

@dataclass(frozen=True)
class PagedServeService:
    """A compose service that runs a PagedServe image, with the configuration it starts with."""

    name: str
    kind: str                           # "scheduler" or "executor"
    service: dict[str, Any]             # the merged compose service
    dockerfile: Dockerfile
    environment: dict[str, str]         # the image's ENV overlaid with the service's environment
    settings: Any                       # SchedulerServiceConfig or ExecutorConfig, parsed from `environment`

    @property
    def config(self) -> Any:
        """Where the service listens and what it connects to: the scheduler's serving settings, or the
        executor's whole config."""
        return self.settings.serving if self.kind == "scheduler" else self.settings

    def host_path(self, container_path: str) -> Path | PurePosixPath:
        """Where a path the container sees comes from on the host: a bind mount, or a file the image
        copied from the repository; the container path itself when neither."""
        path = PurePosixPath(container_path)
        for target, source in sorted(volume_mounts(self.service).items(), key=lambda m: -len(m[0].parts)):
            if path == target or target in path.parents:
                return (source / path.relative_to(target)).resolve()
        return image_path_on_host(self.dockerfile, container_path) or path


DOCKERFILE_KINDS = {"scheduler.Dockerfile": "scheduler", "executor.Dockerfile": "executor"}


def config_from_environment(kind: str, environment: Mapping[str, str]) -> Any:
    """The config a PagedServe process of `kind` builds from `environment` alone, as it would in a container
    whose environment that is (the embedded model's location included)."""
    from unittest import mock

    from executor_svc.config import ExecutorConfig
    from scheduler_svc.config import SchedulerServiceConfig

    cls = SchedulerServiceConfig if kind == "scheduler" else ExecutorConfig
    # default_model_dir() reads the process environment, not the mapping given to from_sources.
    with mock.patch.dict(os.environ):
        os.environ.pop("PAGEDSERVE_DEFAULT_MODEL", None)
        if "PAGEDSERVE_DEFAULT_MODEL" in environment:
            os.environ["PAGEDSERVE_DEFAULT_MODEL"] = environment["PAGEDSERVE_DEFAULT_MODEL"]
        return cls.from_sources(None, environment)


def pagedserve_services(layout: Layout, environ: Mapping[str, str] | None = None,
                        overrides: Mapping[str, Mapping[str, str]] | None = None
                        ) -> dict[str, PagedServeService]:
    """The layout's PagedServe services by name. `overrides` adds environment to named services (tests of
    the tests use it to change one side only)."""
    services = {}
    for name, service in load_compose(layout.files, environ, layout.profiles).items():
        path = service_dockerfile(service)
        if path is None or path.name not in DOCKERFILE_KINDS:
            continue
        kind = DOCKERFILE_KINDS[path.name]
        dockerfile = read_dockerfile(path)
        environment = {**dockerfile.env, **environment_mapping(service.get("environment")),
                       **(overrides or {}).get(name, {})}
        services[name] = PagedServeService(name, kind, service, dockerfile, environment,
                                           config_from_environment(kind, environment))
    return services
