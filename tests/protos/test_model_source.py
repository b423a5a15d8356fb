"""--model and --tokenizer: a local directory as given, or a Hugging Face repo id from the local cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.default_model import default_model_dir
from pagedserve.model_source import ModelNotFoundError, hub_cache_dir, is_repo_id, resolve_model
from tests.hub_cache import COMMIT, cache_model

MODEL = Path(default_model_dir())


def test_a_local_directory_is_used_as_given(hf_home):
    assert resolve_model(str(MODEL)) == MODEL


def test_a_repo_id_resolves_to_its_cached_snapshot_through_refs_main(hf_home):
    snapshot = cache_model(hf_home, "pagedserve/stdlib-llama", MODEL)
    resolved = resolve_model("pagedserve/stdlib-llama")
    assert resolved == snapshot
    assert (resolved / "config.json").read_bytes() == (MODEL / "config.json").read_bytes()


def test_a_revision_picks_its_snapshot(hf_home):
    cache_model(hf_home, "org/model", MODEL)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    tagged = cache_model(hf_home, "org/model", MODEL, commit=other, refs=("v2",))
    assert resolve_model("org/model", revision="v2") == tagged
    assert resolve_model("org/model", revision=other) == tagged         # a commit hash, without a ref
    assert resolve_model("org/model").name == COMMIT


def test_a_missing_repo_names_what_is_missing_and_where_it_looked(hf_home):
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model("org/absent")
    message = str(raised.value)
    assert "model 'org/absent' at revision 'main'" in message
    assert str(hf_home / "hub" / "models--org--absent") in message
    assert "HF_HUB_OFFLINE is set" in message and "huggingface-cli download org/absent" in message


def test_a_missing_revision_is_named(hf_home):
    cache_model(hf_home, "org/model", MODEL)
    with pytest.raises(ModelNotFoundError, match=r"no revision 'v9' in .*models--org--model"):
        resolve_model("org/model", revision="v9")


def test_a_path_that_does_not_exist_is_not_taken_for_a_repo_id(hf_home, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model directory .* does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./models/nowhere")


def test_repo_ids_and_paths_are_told_apart():
    assert is_repo_id("meta-llama/Llama-2-7b-hf") and is_repo_id("gpt2")
    assert not is_repo_id("/abs/path") and not is_repo_id("./rel") and not is_repo_id("a/b/c")
    assert not is_repo_id("~/models/x")


def test_the_cache_follows_hf_hub_cache_then_hf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_the_cached_snapshot_serves_when_the_hub_is_out_of_reach(hf_home, monkeypatch):
    """Not offline, but nothing answers at the hub's address: the cache is used as it is."""
    snapshot = cache_model(hf_home, "org/model", MODEL)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # the discard port: connection refused
    assert resolve_model("org/model") == snapshot
    with pytest.raises(ModelNotFoundError, match="the hub did not provide it"):
        resolve_model("org/absent")
