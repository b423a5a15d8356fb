"""The scheduler's tokenizer: --tokenizer (default --model), a directory or a repo id from the hub cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from scheduler_svc.config import ServingConfig
from scheduler_svc.server import _tokenizer
from tests.hub_cache import cache_model

MODEL = Path(default_model_dir())
PROMPT = "def fibonacci(n):"


def test_a_model_repo_id_gives_the_tokenizer_of_its_cached_snapshot(hf_home):
    cache_model(hf_home, "pagedserve/stdlib-llama", MODEL)
    local = _tokenizer(ServingConfig(model=str(MODEL)))
    from_hub = _tokenizer(ServingConfig(model="pagedserve/stdlib-llama"))
    assert from_hub.encode(PROMPT) == local.encode(PROMPT)


def test_the_tokenizer_can_come_from_elsewhere_than_the_model(hf_home):
    cache_model(hf_home, "org/tokenizer-only", MODEL)
    # The scheduler never reads the model's weights: a model it cannot find is not its concern here.
    tokenizer = _tokenizer(ServingConfig(model="org/weights-elsewhere", tokenizer="org/tokenizer-only"))
    assert tokenizer.encode(PROMPT) == _tokenizer(ServingConfig(model=str(MODEL))).encode(PROMPT)


def test_a_missing_tokenizer_repo_names_the_flag_the_repo_and_the_cache(hf_home):
    with pytest.raises(InvalidArgumentError) as raised:
        _tokenizer(ServingConfig(tokenizer="org/absent"))
    assert raised.value.field == "tokenizer"
    assert "'org/absent'" in raised.value.message
    assert str(hf_home / "hub" / "models--org--absent") in raised.value.message


def test_a_missing_model_repo_names_the_model_flag(hf_home):
    with pytest.raises(InvalidArgumentError) as raised:
        _tokenizer(ServingConfig(model="org/absent", revision="v1"))
    assert raised.value.field == "model"
    assert "'org/absent' at revision 'v1'" in raised.value.message
