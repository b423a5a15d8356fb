"""Where settings come from: flag > environment > config file > default; byte sizes; unknown names warned
about with the closest valid one; a bad value named by its flag and its source, on one line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest

from clients.cli import main as pagedserve_main
from clients.serve_command import add_stack_arguments, build_configs, stack_environment, unknown_settings
from clients.stack import config_environment
from executor_svc.__main__ import main as executor_main
from executor_svc.config import ENV_PREFIX as EXECUTOR_PREFIX
from executor_svc.config import ExecutorConfig
from executor_svc.config import known_environment as executor_known_environment
from pagedserve.settings import (
    EXECUTOR_KERNEL_VARIABLES,
    PROCESS_VARIABLES,
    SettingError,
    env_names,
    from_command_line,
    load_config_file,
    parse_byte_size,
    unknown_environment,
    unknown_file_keys,
)
from scheduler_svc.__main__ import build_parser as scheduler_parser
from scheduler_svc.__main__ import main as scheduler_main
from scheduler_svc.config import (
    ENV_PREFIX,
    PreemptionPolicy,
    SchedulerConfig,
    SchedulerServiceConfig,
    ServingConfig,
    known_environment,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mains read os.environ: a developer's PAGEDSERVE_* variables must not leak in."""
    import os

    for name in list(os.environ):
        if name.startswith("PAGEDSERVE_") and name != "PAGEDSERVE_DEFAULT_MODEL":
            monkeypatch.delenv(name)


def service_config(argv: list[str], environ: dict[str, str], config_file=None) -> SchedulerServiceConfig:
    args = scheduler_parser().parse_args(argv)
    return SchedulerServiceConfig.from_sources(args, environ, config_file)


# ---------------------------------------------------------------- composition

def test_the_service_config_composes_policy_and_serving_settings() -> None:
    config = SchedulerServiceConfig.of(block_size=32, port=0, swap_space_bytes=2**20)
    assert isinstance(config.scheduling, SchedulerConfig) and isinstance(config.serving, ServingConfig)
    assert (config.scheduling.block_size, config.serving.port) == (32, 0)
    assert {f.name for f in dataclasses.fields(SchedulerConfig)}.isdisjoint(
        f.name for f in dataclasses.fields(ServingConfig))
    with pytest.raises(TypeError, match="no field porty"):
        SchedulerServiceConfig.of(porty=1)


def test_flags_follow_the_composition() -> None:
    groups = {group.title: [a.option_strings[0] for a in group._group_actions]
              for group in scheduler_parser()._action_groups}
    assert "--block-size" in groups["scheduling"] and "--swap-space-bytes" in groups["scheduling"]
    assert "--port" in groups["serving"] and "--async-scheduling" in groups["serving"]
    policy_only = argparse.ArgumentParser()
    SchedulerConfig.add_arguments(policy_only)         # what `pagedserve simulate` offers
    flags = {flag for action in policy_only._actions for flag in action.option_strings}
    assert "--block-size" in flags and "--port" not in flags and "--model" not in flags


def test_environment_round_trips_through_the_composition() -> None:
    config = SchedulerServiceConfig.of(port=0, max_model_len=512, preemption_mode=PreemptionPolicy.SWAP)
    environment = config_environment(config, ENV_PREFIX)
    assert environment["PAGEDSERVE_PORT"] == "0" and environment["PAGEDSERVE_PREEMPTION_MODE"] == "swap"
    assert SchedulerServiceConfig.from_sources(None, environment) == config


# ---------------------------------------------------------------- precedence

def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text"), [
    ("c.toml", 'max_num_seqs = 10\nblock_size = 8\nwatermark = 0.05\nmodel = "/m"\n[serving]\nport = 1234\n'),
    ("c.yaml", "max-num-seqs: 10\nblock-size: 8\nwatermark: 0.05\nmodel: /m\nserving:\n  port: 1234\n"),
])
def test_flag_beats_environment_beats_file_beats_default(tmp_path, name, text) -> None:
    config_file = load_config_file(write(tmp_path, name, text))
    config = service_config(["--max-num-seqs", "30"],
                            {"PAGEDSERVE_MAX_NUM_SEQS": "20", "PAGEDSERVE_BLOCK_SIZE": "32"}, config_file)
    assert config.scheduling.max_num_seqs == 30         # flag over environment and file
    assert config.scheduling.block_size == 32           # environment over file
    assert config.scheduling.watermark == 0.05          # file over default
    assert (config.serving.port, config.serving.model) == (1234, "/m")   # a section's table
    assert config.scheduling.max_num_batched_tokens == 8192              # default


def test_the_scheduler_main_reads_its_config_file(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, "s.toml", "max_num_seqs = 12\n")
    monkeypatch.setenv("PAGEDSERVE_BLOCK_SIZE", "64")
    args = scheduler_parser().parse_args(["--config", str(path)])
    config = from_command_line(SchedulerServiceConfig, ENV_PREFIX, args, known_environment())
    assert (config.scheduling.max_num_seqs, config.scheduling.block_size) == (12, 64)


def test_serve_takes_scheduler_and_executor_settings_from_one_file(tmp_path) -> None:
    path = write(tmp_path, "serve.toml", 'max_num_seqs = 7\ndtype = "float16"\nswap_space_bytes = "1GiB"\n')
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    scheduler, executors = build_configs(parser.parse_args(["--config", str(path), "--executors", "2"]))
    assert scheduler.scheduling.max_num_seqs == 7 and scheduler.scheduling.swap_space_bytes == 2**30
    assert [e.dtype for e in executors] == ["float16", "float16"]


# ---------------------------------------------------------------- byte sizes

@pytest.mark.parametrize(("text", "value"), [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("4G", 4 * 2**30), ("4g", 4 * 2**30), ("8Gi", 8 * 2**30),
    ("1.5GiB", 3 * 2**29), ("64KiB", 2**16), ("1TiB", 2**40), ("4294967296", 2**32), ("100B", 100),
    (" 2 MiB ", 2 * 2**20), ("0", 0),
])
def test_byte_sizes(text, value) -> None:
    assert parse_byte_size(text) == value


@pytest.mark.parametrize(("text", "why"), [
    ("4GB", "ambiguous"), ("4 gigs", "byte size"), ("-1GiB", "byte size"), ("0.5", "whole number"),
    ("", "size"),
])
def test_bad_byte_sizes_say_why(text, why) -> None:
    with pytest.raises(ValueError, match=why):
        parse_byte_size(text)


def test_byte_size_settings_take_units_from_every_source(tmp_path) -> None:
    assert service_config(["--swap-space-bytes", "512MiB"], {}).scheduling.swap_space_bytes == 512 * 2**20
    assert service_config([], {"PAGEDSERVE_MAX_REQUEST_BYTES": "8MiB"}).serving.max_request_bytes == 8 * 2**20
    config_file = load_config_file(write(tmp_path, "c.toml", "swap_space_bytes = 1048576\n"))
    assert service_config([], {}, config_file).scheduling.swap_space_bytes == 2**20
    executor = ExecutorConfig.from_sources(None, {"PAGEDSERVE_EXECUTOR_CPU_KV_CACHE_BYTES": "2G"})
    assert executor.cpu_kv_cache_bytes == 2 * 2**30


# ---------------------------------------------------------------- unknown names

def test_an_unknown_variable_warns_with_the_closest_name() -> None:
    warnings = unknown_environment({"PAGEDSERVE_MAX_NUM_SEQ": "8", "PAGEDSERVE_EXECUTOR_DEVISE": "cuda",
                                    "PAGEDSERVE_MAX_NUM_SEQS": "8", "PAGEDSERVE_DEFAULT_MODEL": "/m",
                                    "PAGEDSERVE_CUDA_KERNELS": "0", "OTHER": "1"}, stack_environment())
    assert warnings == [
        "unknown environment variable PAGEDSERVE_EXECUTOR_DEVISE is ignored; "
        "did you mean PAGEDSERVE_EXECUTOR_DEVICE?",
        "unknown environment variable PAGEDSERVE_MAX_NUM_SEQ is ignored; "
        "did you mean PAGEDSERVE_MAX_NUM_SEQS?"]
    assert unknown_environment({"PAGEDSERVE_ZZZZZZZZZZZZZZZZZZ": "1"}, stack_environment()) == [
        "unknown environment variable PAGEDSERVE_ZZZZZZZZZZZZZZZZZZ is ignored"]


def test_each_service_checks_its_own_variables_and_leaves_the_others_to_the_other() -> None:
    """Under `serve` and in compose files both services see one environment; neither imports the other,
    so each warns only about names in its own part of it."""
    environ = {"PAGEDSERVE_MAX_NUM_SEQ": "8", "PAGEDSERVE_EXECUTOR_DEVISE": "cuda",
               "PAGEDSERVE_CUDA_KERNELS": "0", "PAGEDSERVE_MAX_NUM_SEQS": "8",
               "PAGEDSERVE_EXECUTOR_DEVICE": "cpu"}
    scheduler = unknown_environment(environ, known_environment(environ))
    executor = unknown_environment(environ, executor_known_environment(environ))
    assert scheduler == ["unknown environment variable PAGEDSERVE_MAX_NUM_SEQ is ignored; "
                         "did you mean PAGEDSERVE_MAX_NUM_SEQS?"]
    assert executor == ["unknown environment variable PAGEDSERVE_EXECUTOR_DEVISE is ignored; "
                        "did you mean PAGEDSERVE_EXECUTOR_DEVICE?"]
    # The executor's variables outside its prefix are exactly the kernel switches the neutral package names.
    names = env_names(ExecutorConfig, EXECUTOR_PREFIX)
    outside = {name for name in names if not name.startswith(EXECUTOR_PREFIX)}
    assert outside == EXECUTOR_KERNEL_VARIABLES


def test_every_variable_the_code_reads_is_known() -> None:
    """A PAGEDSERVE_* name used anywhere in the services, the clients or the deployment files is a config
    field's variable or listed in PROCESS_VARIABLES, so that setting it draws no unknown-name warning."""
    repo = Path(__file__).resolve().parents[2]
    suffixes = (".py", ".yml", ".yaml", ".sh", ".Dockerfile", "")
    sources = [path for folder in ("protos", "scheduler_svc", "executor_svc", "clients", "docker")
               for path in (repo / folder).rglob("*")
               if path.suffix in suffixes and path.is_file() and "_pb2" not in path.name]
    name = re.compile(r"PAGEDSERVE_[A-Z0-9_]*[A-Z0-9]")
    used = {found for path in sources for found in name.findall(path.read_text(errors="ignore"))}
    prefixes = {ENV_PREFIX.rstrip("_"), EXECUTOR_PREFIX.rstrip("_")}
    assert sorted(used - stack_environment() - PROCESS_VARIABLES - prefixes) == []


def test_an_unknown_file_key_warns_with_the_closest_key(tmp_path) -> None:
    config_file = load_config_file(write(tmp_path, "c.toml", "max-num-seq = 8\nblock_size = 8\n"))
    known = {"max_num_seqs", "block_size"}
    assert unknown_file_keys(config_file, known) == [
        f"unknown key in config file {config_file.path}: max_num_seq is ignored; did you mean max_num_seqs?"]


def test_the_mains_log_the_warnings(tmp_path, monkeypatch, caplog) -> None:
    path = write(tmp_path, "c.yaml", "max_num_seq: 8\n")
    monkeypatch.setenv("PAGEDSERVE_BLOK_SIZE", "8")
    args = scheduler_parser().parse_args(["--config", str(path)])
    with caplog.at_level(logging.WARNING, logger="pagedserve.config"):
        config = from_command_line(SchedulerServiceConfig, ENV_PREFIX, args, known_environment())
    assert config.scheduling.max_num_seqs == SchedulerConfig().max_num_seqs      # ignored, not guessed
    messages = [record.getMessage() for record in caplog.records]
    assert any("max_num_seq is ignored; did you mean max_num_seqs?" in m for m in messages)
    assert any("PAGEDSERVE_BLOK_SIZE is ignored; did you mean PAGEDSERVE_BLOCK_SIZE?" in m for m in messages)


def test_serve_knows_the_executor_keys_it_passes_on(tmp_path) -> None:
    config_file = load_config_file(write(tmp_path, "c.toml", 'dtype = "float16"\nrank = 1\ndtyp = "x"\n'))
    warnings = unknown_settings(config_file, environ={})
    assert len(warnings) == 2 and "rank is ignored" in warnings[0] and "did you mean dtype?" in warnings[1]


def test_serve_ignores_the_keys_it_warns_about(tmp_path) -> None:
    path = write(tmp_path, "c.toml", "max_message_bytes = 1\nrank = 5\n")     # the launcher's to decide
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    _, executors = build_configs(parser.parse_args(["--config", str(path)]))
    assert (executors[0].rank, executors[0].max_message_bytes) == (0, ExecutorConfig().max_message_bytes)


# ---------------------------------------------------------------- errors

def test_a_bad_value_names_its_flag_and_the_environment_variable() -> None:
    with pytest.raises(SettingError) as err:
        service_config([], {"PAGEDSERVE_MAX_MODEL_LEN": "-3"})
    assert str(err.value) == "--max-model-len (from PAGEDSERVE_MAX_MODEL_LEN): must be at least 2, got -3"
    assert err.value.field == "max_model_len"


def test_a_bad_value_names_the_config_file(tmp_path) -> None:
    path = write(tmp_path, "x.toml", "max_model_len = -3\n")
    with pytest.raises(SettingError) as err:
        service_config([], {}, load_config_file(path))
    assert str(err.value) == f"--max-model-len (from config file {path}): must be at least 2, got -3"


@pytest.mark.parametrize(("argv", "environ", "text"), [
    (["--max-num-seqs", "many"], {},
     "--max-num-seqs (max_num_seqs, from the command line): expected an integer, got 'many'"),
    ([], {"PAGEDSERVE_ENABLE_CHUNKED_PREFILL": "maybe"},
     "--enable-chunked-prefill (from PAGEDSERVE_ENABLE_CHUNKED_PREFILL): expected true or false"),
    ([], {"PAGEDSERVE_SWAP_SPACE_BYTES": "4GB"}, "--swap-space-bytes (from PAGEDSERVE_SWAP_SPACE_BYTES): "
                                                 "'4GB' is ambiguous"),
    ([], {"PAGEDSERVE_PREEMPTION_MODE": "evict"},
     "--preemption-mode (from PAGEDSERVE_PREEMPTION_MODE): expected one of auto, swap, recompute"),
    # A default that fails only beside another value names where the default came from.
    (["--max-model-len", "16384"], {}, "--max-num-batched-tokens (from the default): must be at least"),
])
def test_parse_and_validation_errors_name_flag_and_source(argv, environ, text) -> None:
    with pytest.raises(SettingError, match="^" + text.replace("(", r"\(").replace(")", r"\)")):
        service_config(argv, environ)


def test_a_file_value_of_the_wrong_type_names_the_file(tmp_path) -> None:
    path = write(tmp_path, "c.toml", 'max_num_seqs = "lots"\nenable_prefix_caching = 3\n')
    with pytest.raises(SettingError, match=r"--max-num-seqs \(from config file .*c.toml\): expected an int"):
        service_config([], {}, load_config_file(path))


@pytest.mark.parametrize(("name", "text", "why"), [
    ("c.toml", "max_num_seqs = = 1", "cannot read"), ("c.yaml", "- 1\n- 2\n", "must hold a table"),
    ("c.ini", "x=1", "expected a .toml, .yaml or .yml file"), ("c.yaml", "a: [1,\n", "cannot read"),
])
def test_a_config_file_that_cannot_be_read_names_config(tmp_path, name, text, why) -> None:
    with pytest.raises(SettingError, match=f"^--config .*{why}"):
        load_config_file(write(tmp_path, name, text))
    with pytest.raises(SettingError, match=r"^--config .*cannot read"):
        load_config_file(tmp_path / "missing.toml")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def test_scheduler_main_exits_2_with_one_line(tmp_path, capsys) -> None:
    path = write(tmp_path, "x.toml", "max_model_len = -3\n")
    assert scheduler_main(["--config", str(path)]) == 2
    assert one_line_error(capsys) == (
        f"pagedserve-scheduler: error: --max-model-len (from config file {path}): must be at least 2, got -3")


def test_executor_main_exits_2_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PAGEDSERVE_EXECUTOR_MAX_MESSAGE_BYTES", "1MiB")
    assert executor_main(["--backend", "simulated"]) == 2
    assert one_line_error(capsys) == ("pagedserve-executor: error: --max-message-bytes (from "
                                      "PAGEDSERVE_EXECUTOR_MAX_MESSAGE_BYTES): must be at least 4 MiB")


def test_serve_exits_2_with_one_line_before_starting_anything(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PAGEDSERVE_MAX_MODEL_LEN", "-3")
    assert pagedserve_main(["serve"]) == 2
    assert one_line_error(capsys) == ("pagedserve serve: error: --max-model-len (from "
                                      "PAGEDSERVE_MAX_MODEL_LEN): must be at least 2, got -3")


# ---------------------------------------------------------------- the executor's kernel switches

def test_kernel_switches_are_config_fields_read_from_their_variables() -> None:
    assert (ExecutorConfig().cuda_kernels, ExecutorConfig().fused_layers, ExecutorConfig().kernel_cache) == (
        True, True, "")
    environ = {"PAGEDSERVE_CUDA_KERNELS": "0", "PAGEDSERVE_FUSED_LAYERS": "0",
               "PAGEDSERVE_KERNEL_CACHE": "/opt/k"}
    config = ExecutorConfig.from_sources(None, environ)
    assert (config.cuda_kernels, config.fused_layers, config.kernel_cache) == (False, False, "/opt/k")
    environment = config_environment(config, EXECUTOR_PREFIX)
    assert environment["PAGEDSERVE_CUDA_KERNELS"] == "false"
    assert "PAGEDSERVE_EXECUTOR_CUDA_KERNELS" not in environment
    assert ExecutorConfig.from_sources(None, environment) == config


def test_the_readme_example_config_file_is_valid(tmp_path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("```toml\n# pagedserve serve --config serve.toml\n", 1)[1].split("```", 1)[0]
    path = write(tmp_path, "serve.toml", example)
    assert unknown_settings(load_config_file(path), environ={}) == []
    parser = argparse.ArgumentParser()
    add_stack_arguments(parser)
    scheduler, _ = build_configs(parser.parse_args(["--config", str(path)]))
    assert (scheduler.scheduling.max_num_seqs, scheduler.scheduling.swap_space_bytes) == (64, 8 * 2**30)
    assert scheduler.scheduling.enable_prefix_caching and scheduler.serving.port == 50052
