"""docker-compose accepts every supported combination of the compose files, merges them as the other
tests assume, and places GPUs as intended: none without the GPU file, one distinct GPU per executor with it.

`docker-compose config` (Debian's 1.29, which CI installs) validates and merges without a Docker engine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.docker.deployment_files import (
    LAYOUTS,
    SCALE_OUT,
    Layout,
    depends_on_mapping,
    docker_compose_config,
    environment_mapping,
    gpu_devices,
    layout_named,
    load_compose,
    pagedserve_services,
    volume_mounts,
)

GPU_LAYOUTS = {
    "gpu": {"executor-0": ["0"]},
    "gpu-scale-out": {"executor-0": ["0"], "executor-2-0": ["1"]},
    "tp2": {"executor-0": ["0"], "executor-1": ["1"]},
}


def _comparable(service: dict[str, Any]) -> dict[str, Any]:
    """The parts of a service the tests rely on, in one normal form for both merges."""
    return {
        "environment": environment_mapping(service.get("environment")),
        "depends_on": depends_on_mapping(service.get("depends_on")),
        "devices": sorted(json.dumps(d, sort_keys=True) for d in gpu_devices(service)),
        "profiles": sorted(service.get("profiles", [])),
        "healthcheck": service.get("healthcheck", {}).get("test"),
        "command": service.get("command"),
        "image": service.get("image"),
        "dockerfile": (service.get("build") or {}).get("dockerfile"),
        "build_args": (service.get("build") or {}).get("args", {}),
        "volumes": volume_mounts(service),
    }


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_docker_compose_accepts_the_layout(layout: Layout) -> None:
    config = docker_compose_config(layout)
    assert {"scheduler", "executor-0", "prometheus", "grafana"} <= set(config["services"])


MODEL_VARIABLES = {"PAGEDSERVE_MODELS_DIR": "/data/hf", "PAGEDSERVE_MODEL": "/models/x"}


@pytest.mark.parametrize("environ", [{}, MODEL_VARIABLES], ids=["defaults", "model-variables"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_the_tests_merge_the_files_as_docker_compose_does(layout: Layout, environ: dict[str, str]) -> None:
    real = docker_compose_config(layout, environ)["services"]
    # docker-compose 1.29's `config` prints every service whatever the profiles; so does this merge here.
    ours = load_compose(layout.files, environ, profiles={SCALE_OUT})
    assert set(real) == set(ours)
    for name in real:
        assert _comparable(ours[name]) == _comparable(real[name]), name


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_gpus_are_reserved_only_with_the_gpu_file(layout: Layout) -> None:
    services = docker_compose_config(layout)["services"]
    enabled = pagedserve_services(layout)
    expected = GPU_LAYOUTS.get(layout.name, {})
    for name, service in services.items():
        if name not in enabled and name not in expected:
            continue
        devices = gpu_devices(service)
        if name not in expected:
            assert devices == [], f"{layout.name}: {name} reserves {devices}"
            continue
        assert devices == [{"driver": "nvidia", "device_ids": expected[name], "capabilities": ["gpu"]}], name
        # A rank that holds a GPU must use it, not fall back to the CPU silently.
        assert enabled[name].config.device == "cuda"
    unreserved = [s for n, s in enabled.items() if s.kind == "executor" and n not in expected]
    assert all(s.config.device != "cuda" for s in unreserved)


def test_the_cpu_layout_runs_the_cpu_image() -> None:
    services = docker_compose_config(layout_named("cpu-scale-out"))["services"]
    for name in ("executor-0", "executor-2-0"):
        assert services[name]["image"] == "pagedserve-executor:cpu"
        assert services[name]["build"]["args"]["BUILD_KERNELS"] == "0"
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert docker_compose_config(layout_named("gpu"))["services"]["executor-0"]["image"] == \
        "pagedserve-executor:latest"
