"""The compose services run what `pagedserve serve` runs: the same entry points, configured the same way.

For every layout (base, GPU, CPU, TP=2, scale-out) the launcher is fed the flags that describe the same
deployment (`--device cuda`, `--executors 2`, ...); each compose service's environment (its image's ENV
overlaid with the compose file's) is parsed by the config dataclass the service parses it with, and
compared field by field with the launcher's config for the same process. Only the network fields
differ by necessity (containers vs processes on one host); they are listed below and checked for
consistency instead: the scheduler names its executors by service name and port, in rank order, and
the ranks of a group meet at rank 0's rendezvous. Model paths are compared as the host directories the
containers see through their mounts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.serve_command import add_stack_arguments, build_configs
from clients.stack import ServiceSpec, stack_specs
from executor_svc.config import ENV_PREFIX as EXECUTOR_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.settings import env_names, values_of
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_PREFIX
from scheduler_svc.config import SchedulerServiceConfig
from tests.docker.deployment_files import (
    LAYOUTS,
    REPO,
    Layout,
    PagedServeService,
    config_from_environment,
    layout_named,
    pagedserve_services,
)

# Fields that differ between containers and processes on one host, checked for consistency instead.
NETWORK_FIELDS = {
    "scheduler": ("host", "port", "http_port", "metrics_port", "executor_addresses"),
    "executor": ("host", "port", "metrics_port", "distributed_init_address"),
}
# Fields holding paths: the container's path is compared as the host path it maps to.
PATH_FIELDS = ("model",)
# Fields of the machine rather than the deployment: the image ships its kernels prebuilt in its own cache.
MACHINE_FIELDS = {"scheduler": (), "executor": ("kernel_cache",)}
# PAGEDSERVE_* variables that are process settings rather than config fields.
PROCESS_VARIABLES = {
    "scheduler": {"PAGEDSERVE_DEFAULT_MODEL"},
    "executor": {"PAGEDSERVE_DEFAULT_MODEL"},
}
CONFIG_CLASSES = {"scheduler": (SchedulerServiceConfig, SCHEDULER_PREFIX),
                  "executor": (ExecutorConfig, EXECUTOR_PREFIX)}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The launcher falls back on this process's PAGEDSERVE_* variables; a developer's must not leak in."""
    for name in list(os.environ):
        if name.startswith("PAGEDSERVE_"):
            monkeypatch.delenv(name)
    yield


@dataclasses.dataclass(frozen=True)
class LauncherStack:
    """What `pagedserve serve FLAGS` starts: the scheduler's spec and config, and each rank's."""

    scheduler: tuple[ServiceSpec, SchedulerServiceConfig]
    executors: list[tuple[ServiceSpec, ExecutorConfig]]


def launcher_stack(flags: tuple[str, ...]) -> LauncherStack:
    """Build the launcher's processes for `flags` exactly as `pagedserve serve` does, without starting them.

    Each config is parsed back from its process's environment, as the child process does.
    """
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    scheduler, executors = build_configs(parser.parse_args(list(flags)))
    specs = {spec.name: spec for spec in stack_specs(scheduler, executors)}
    scheduler_spec = specs.pop("scheduler")
    ranks = sorted(specs.values(), key=lambda spec: int(spec.environment[EXECUTOR_PREFIX + "RANK"]))
    return LauncherStack(
        (scheduler_spec, config_from_environment("scheduler", scheduler_spec.environment)),
        [(spec, config_from_environment("executor", spec.environment)) for spec in ranks])


Replica = tuple[PagedServeService, list[PagedServeService]]


def replicas(services: dict[str, PagedServeService]) -> list[Replica]:
    """Each scheduler service with the executor services it names, in rank order."""
    found = []
    for scheduler in (s for s in services.values() if s.kind == "scheduler"):
        names = [address.rpartition(":")[0] for address in scheduler.config.executor_list]
        found.append((scheduler, [services[name] for name in names if name in services]))
    return found


def setting_differences(service: PagedServeService, launcher_config: Any) -> list[str]:
    """Fields (network fields excepted) where the compose service's config differs from the launcher's."""
    differences = []
    prefix = CONFIG_CLASSES[service.kind][1]
    compose_values = {option.name: value for option, value in values_of(service.settings, prefix)}
    for option, theirs in values_of(launcher_config, prefix):
        name = option.name
        if name in NETWORK_FIELDS[service.kind] or name in MACHINE_FIELDS[service.kind]:
            continue
        ours = compose_values[name]
        if name in PATH_FIELDS:
            ours, theirs = service.host_path(ours), Path(theirs).resolve()
        if ours != theirs:
            differences.append(f"{service.name}: {name} is {ours!r} in compose, {theirs!r} in the launcher")
    return differences


def unknown_variables(service: PagedServeService) -> list[str]:
    """PAGEDSERVE_* names in a service's environment that its config does not read."""
    cls, prefix = CONFIG_CLASSES[service.kind]
    known = env_names(cls, prefix) | PROCESS_VARIABLES[service.kind]
    return sorted(name for name in service.environment
                  if name.startswith("PAGEDSERVE_") and name not in known)


def layout_differences(layout: Layout, environ: dict[str, str] | None = None,
                       overrides: dict[str, dict[str, str]] | None = None,
                       flags: tuple[str, ...] | None = None) -> list[str]:
    """Every setting where `layout`'s services and the launcher (given `flags`, by default the layout's)
    disagree, and every executor count that differs."""
    launcher = launcher_stack(layout.serve_flags if flags is None else flags)
    differences = []
    for scheduler, executors in replicas(pagedserve_services(layout, environ, overrides)):
        differences += setting_differences(scheduler, launcher.scheduler[1])
        if len(executors) != len(launcher.executors):
            differences.append(f"{scheduler.name} has {len(executors)} executor services, the launcher "
                               f"{len(launcher.executors)}")
        for service, (_, config) in zip(executors, launcher.executors, strict=False):
            differences += setting_differences(service, config)
    return differences


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_services_run_the_launchers_entry_points(layout: Layout) -> None:
    """The image's command is the console script whose target is the module the launcher runs with -m."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    launcher = launcher_stack(layout.serve_flags)
    launcher_commands = {"scheduler": launcher.scheduler[0].command,
                         "executor": launcher.executors[0][0].command}
    for service in pagedserve_services(layout).values():
        entrypoint = service.service.get("entrypoint", service.dockerfile.entrypoint) or []
        command = [*entrypoint, *service.service.get("command", service.dockerfile.cmd)]
        python, dash_m, module = launcher_commands[service.kind]
        assert (python, dash_m) == (sys.executable, "-m")
        # No flags: the service is configured by its environment alone, as the launcher's processes are.
        assert len(command) == 1, f"{service.name} runs {command}: flags would bypass the environment"
        assert scripts.get(command[0]) == f"{module}.__main__:main", (
            f"{service.name} runs {command[0]!r}, which is not `python -m {module}`")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_every_pagedserve_variable_is_a_known_setting(layout: Layout) -> None:
    services = pagedserve_services(layout)
    assert {s.kind for s in services.values()} == {"scheduler", "executor"}
    unknown = {name: names for name, service in services.items() if (names := unknown_variables(service))}
    assert not unknown, f"variables no config reads (a typo, or a setting of the other service): {unknown}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_every_setting_matches_the_launcher(layout: Layout) -> None:
    assert layout_differences(layout) == []


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_network_settings_connect_the_services(layout: Layout) -> None:
    services = pagedserve_services(layout)
    named: list[str] = []
    for scheduler, executors in replicas(services):
        addresses = scheduler.config.executor_list
        assert len(executors) == len(addresses), f"{scheduler.name} names missing services: {addresses}"
        for rank, (address, executor) in enumerate(zip(addresses, executors, strict=True)):
            assert executor.kind == "executor"
            assert address == f"{executor.name}:{executor.config.port}"
            assert (executor.config.rank, executor.config.world_size) == (rank, len(addresses))
        if len(executors) > 1:
            rendezvous = {e.config.distributed_init_address for e in executors}
            assert len(rendezvous) == 1, f"{scheduler.name}'s ranks name different rendezvous: {rendezvous}"
            host = next(iter(rendezvous)).rpartition(":")[0]
            assert host == executors[0].name, f"the rendezvous is on {host}, not on rank 0"
        named += [e.name for e in executors]
        published = [str(port) for port in scheduler.service.get("ports", [])]
        config = scheduler.config
        listening = {str(config.port), str(config.http_port), str(config.metrics_port)}
        assert all(p.rsplit(":", 1)[-1] in listening
                   for p in published), f"{scheduler.name} publishes ports it does not listen on: {published}"
    assert sorted(named) == sorted(s.name for s in services.values() if s.kind == "executor"), (
        "every executor service serves exactly one scheduler")
    for service in services.values():
        # Reachable from the other containers, on fixed ports Prometheus and the others can name.
        assert service.config.host == "0.0.0.0"
        assert service.config.port > 0 and service.config.metrics_port > 0
        assert service.service["healthcheck"]["test"] == [
            "CMD", "pagedserve", "healthcheck", "--target", f"127.0.0.1:{service.config.port}"]


def test_the_launcher_side_of_the_comparison_is_what_serve_runs() -> None:
    """The comparison's launcher half: rank order, the rendezvous, and the executors' model follow serve."""
    launcher = launcher_stack(("--executors", "2"))
    scheduler = launcher.scheduler[1].serving
    assert [f"{c.host}:{c.port}" for _, c in launcher.executors] == list(scheduler.executor_list)
    assert [c.rank for _, c in launcher.executors] == [0, 1]
    assert len({c.distributed_init_address for _, c in launcher.executors}) == 1
    assert all(c.model == scheduler.model for _, c in launcher.executors)


def test_a_model_mounted_from_the_host_reaches_every_service(tmp_path: Path) -> None:
    """PAGEDSERVE_MODELS_DIR and PAGEDSERVE_MODEL select the model the launcher would get with --model."""
    models = tmp_path / "hf"
    (models / "Llama-2-7b-hf").mkdir(parents=True)
    environ = {"PAGEDSERVE_MODELS_DIR": str(models), "PAGEDSERVE_MODEL": "/models/Llama-2-7b-hf"}
    for layout in LAYOUTS:
        flags = (*layout.serve_flags, "--model", str(models / "Llama-2-7b-hf"))
        assert layout_differences(layout, environ, flags=flags) == [], layout.name
    # ... and not the embedded model, which the same comparison without --model would expect.
    assert layout_differences(layout_named("gpu"), environ) != []


def test_a_setting_changed_on_one_side_only_is_reported() -> None:
    """The comparison is not vacuous: one changed or misspelled variable in one service fails it."""
    gpu = layout_named("gpu")
    changed = layout_differences(gpu, overrides={"executor-0": {"PAGEDSERVE_EXECUTOR_DTYPE": "float16"}})
    assert changed == ["executor-0: dtype is 'float16' in compose, 'auto' in the launcher"]
    assert layout_differences(gpu, overrides={"scheduler": {"PAGEDSERVE_MAX_NUM_SEQS": "64"}}) != []
    # A launcher flag the compose files do not mirror is a difference too.
    assert layout_differences(gpu, flags=(*gpu.serve_flags, "--block-size", "32")) != []
    typo = pagedserve_services(gpu, overrides={"executor-0": {"PAGEDSERVE_EXECUTOR_DEVISE": "cuda"},
                                               "scheduler": {"PAGEDSERVE_EXECUTOR_DEVICE": "cuda"}})
    assert unknown_variables(typo["executor-0"]) == ["PAGEDSERVE_EXECUTOR_DEVISE"]
    assert unknown_variables(typo["scheduler"]) == ["PAGEDSERVE_EXECUTOR_DEVICE"]
