"""The executor loads --model as a directory or a repo id from the hub cache, as the scheduler does."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor_svc.config import ExecutorConfig
from executor_svc.model_backend import ModelBackend
from pagedserve.default_model import default_model_dir
from pagedserve.model_source import ModelNotFoundError
from tests.hub_cache import cache_model

MODEL = Path(default_model_dir())


def test_a_repo_id_loads_the_weights_of_its_cached_snapshot(hf_home):
    snapshot = cache_model(hf_home, "pagedserve/stdlib-llama", MODEL, refs=("v1",))
    backend = ModelBackend(ExecutorConfig(model="pagedserve/stdlib-llama", revision="v1", device="cpu"))
    assert backend.model_dir == snapshot
    described = backend.describe()
    assert described.model_path == str(snapshot.resolve()) and described.model_name == "stdlib-llama"
    local = ModelBackend(ExecutorConfig(model=str(MODEL), device="cpu"))
    for (name, ours), (_, theirs) in zip(backend.model.state_dict().items(), local.model.state_dict().items(),
                                         strict=True):
        assert ours.equal(theirs), name


def test_a_repo_missing_from_the_cache_fails_before_any_device_is_touched(hf_home, monkeypatch):
    import executor_svc.model_backend as model_backend

    monkeypatch.setattr(model_backend, "resolve_device", lambda *a: pytest.fail("touched a device"))
    with pytest.raises(ModelNotFoundError, match="models--org--absent"):
        ModelBackend(ExecutorConfig(model="org/absent", device="cpu"))
