"""The scale-out profile's Envoy: its config parses against Envoy's own API (xds-protos), balances gRPC
over HTTP/2 across exactly the scheduler replicas the compose files run, health-checks them with the gRPC
health protocol, and listens where the compose service publishes it."""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

import pytest
import yaml

from tests.docker.deployment_files import DOCKER, REQUIRE_ENV, layout_named, load_compose, pagedserve_services

ENVOY_CONFIG = DOCKER / "envoy" / "envoy.yaml"
# The typed_config messages the config uses: json_format resolves an `@type` only once its module is loaded.
TYPED_CONFIG_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)


def envoy_config() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def cluster(config: dict[str, Any]) -> dict[str, Any]:
    (only,) = config["static_resources"]["clusters"]
    return only


def parse_bootstrap(config: dict[str, Any]) -> Any:
    """`config` as an envoy.config.bootstrap.v3.Bootstrap message (raises ParseError on unknown fields)."""
    try:
        from google.protobuf import json_format

        bootstrap_pb2 = importlib.import_module("envoy.config.bootstrap.v3.bootstrap_pb2")
        for module in TYPED_CONFIG_MODULES:
            importlib.import_module(module)
    except ImportError:
        message = "xds-protos is not installed (pip install xds-protos, in the dev extra)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1 requires it")
        pytest.skip(message)
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


def test_the_config_is_a_valid_envoy_bootstrap() -> None:
    bootstrap = parse_bootstrap(envoy_config())
    assert bootstrap.static_resources.clusters[0].health_checks[0].HasField("grpc_health_check")


def test_a_misspelled_field_is_rejected() -> None:
    """The schema check is real: Envoy's API has no `grpc_healthcheck`."""
    from google.protobuf import json_format

    config = copy.deepcopy(envoy_config())
    cluster(config)["health_checks"][0]["grpc_healthcheck"] = cluster(config)["health_checks"][0].pop(
        "grpc_health_check")
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(config)


def test_envoy_balances_exactly_the_scheduler_replicas() -> None:
    schedulers = {(s.name, s.config.port) for layout in ("gpu-scale-out", "cpu-scale-out")
                  for s in pagedserve_services(layout_named(layout)).values() if s.kind == "scheduler"}
    assert len(schedulers) >= 2
    endpoints = {(e["endpoint"]["address"]["socket_address"]["address"],
                  e["endpoint"]["address"]["socket_address"]["port_value"])
                 for group in cluster(envoy_config())["load_assignment"]["endpoints"]
                 for e in group["lb_endpoints"]}
    assert endpoints == schedulers


def test_replicas_are_health_checked_over_grpc_and_http2() -> None:
    upstream = cluster(envoy_config())
    assert upstream["type"] == "STRICT_DNS"     # compose service names, re-resolved as replicas restart
    (check,) = upstream["health_checks"]
    # Service "" is the whole server, which a scheduler reports NOT_SERVING while a rank is down.
    assert check["grpc_health_check"].get("service_name", "") == ""
    (options,) = upstream["typed_extension_protocol_options"].values()
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert upstream["common_lb_config"]["healthy_panic_threshold"]["value"] == 0


def test_the_compose_service_runs_this_config_in_the_scale_out_profile_only() -> None:
    config = envoy_config()
    compose = load_compose(layout_named("gpu-scale-out").files, profiles={"scale-out"})
    envoy = compose["envoy"]
    assert envoy["profiles"] == ["scale-out"]
    assert "envoy" not in load_compose(layout_named("gpu").files)
    mount = next(v for v in envoy["volumes"] if v.startswith("./envoy/"))
    source, target = mount.split(":")[:2]
    assert (DOCKER / source).resolve() == ENVOY_CONFIG.resolve()
    assert envoy["command"][envoy["command"].index("--config-path") + 1] == target
    (listener,) = config["static_resources"]["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    assert f"{port}:{port}" in envoy["ports"]
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    assert f"127.0.0.1:{admin}:{admin}" in envoy["ports"], "the admin API stays on the host's loopback"
    assert set(envoy["depends_on"]) == {"scheduler", "scheduler-2"}
