"""The scheduler config is validated once; flags beat environment, which beats defaults."""

import argparse

import pytest

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.config import PreemptionPolicy, ReservationMode, SchedulerConfig


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"block_size": 12}, "block_size"),
    ({"block_size": 512}, "block_size"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"max_model_len": 16384}, "max_num_batched_tokens"),
    ({"watermark": 0.7}, "watermark"),
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
    ({"swap_space_bytes": -1}, "swap_space_bytes"),
])
def test_bad_config_names_its_field(kwargs, field):
    with pytest.raises(InvalidArgumentError) as err:
        SchedulerConfig(**kwargs)
    assert err.value.field == field


def test_chunked_prefill_allows_long_models():
    config = SchedulerConfig(max_model_len=16384, enable_chunked_prefill=True)
    assert config.max_model_len == 16384


def _parse(argv):
    parser = argparse.ArgumentParser()
    SchedulerConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_beat_environment_which_beats_defaults():
    env = {"PAGEDSERVE_MAX_NUM_SEQS": "32", "PAGEDSERVE_BLOCK_SIZE": "32",
           "PAGEDSERVE_PREEMPTION_MODE": "SWAP", "PAGEDSERVE_ENABLE_CHUNKED_PREFILL": "true"}
    config = SchedulerConfig.from_sources(_parse(["--block-size", "8", "--reservation", "reserve-pow2"]), env)
    assert config.block_size == 8                       # flag
    assert config.max_num_seqs == 32                    # environment
    assert config.preemption_mode is PreemptionPolicy.SWAP
    assert config.enable_chunked_prefill is True
    assert config.reservation is ReservationMode.RESERVE_POW2
    assert config.watermark == SchedulerConfig().watermark   # default


def test_boolean_flag_and_max_model_len():
    config = SchedulerConfig.from_sources(_parse(["--no-enable-chunked-prefill", "--max-model-len", "512"]),
                                          {"PAGEDSERVE_ENABLE_CHUNKED_PREFILL": "1"})
    assert config.enable_chunked_prefill is False
    assert config.max_model_len == 512


@pytest.mark.parametrize(("env", "field"), [
    ({"PAGEDSERVE_MAX_NUM_SEQS": "many"}, "max_num_seqs"),
    ({"PAGEDSERVE_PREEMPTION_MODE": "evict"}, "preemption_mode"),
    ({"PAGEDSERVE_ENABLE_CHUNKED_PREFILL": "maybe"}, "enable_chunked_prefill"),
])
def test_unparsable_environment_names_its_field(env, field):
    with pytest.raises(InvalidArgumentError) as err:
        SchedulerConfig.from_sources(None, env)
    assert err.value.field == field
