"""Where a model's files are: a local directory, or a Hugging Face repo id resolved through huggingface_hub.

Both services resolve `--model` (the executor its weights, the scheduler its `--tokenizer`, which
defaults to the model) with `resolve_model`, so they find the same snapshot. A repo id is looked up in
the local hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub) at
`--revision` (a branch, tag or commit; default main): with `HF_HUB_OFFLINE=1`, or when the hub is out
of reach, the cached snapshot is used as it is; otherwise missing files are downloaded into the cache
first. Torch-free: the scheduler imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# What each service needs from a repository: the scheduler its tokenizer, the executor everything.
TOKENIZER_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")
MODEL_FILES = (*TOKENIZER_FILES, "*.safetensors")
LEGACY_WEIGHT_FILES = ("*.bin",)        # fetched only for a repository without safetensors
_TRUE = ("1", "true", "yes", "on")


class ModelNotFoundError(FileNotFoundError):
    """`--model` (or `--tokenizer`) names neither a local directory nor a repository in the hub cache."""


def resolve_model(model: str, revision: str = "", files: Sequence[str] = MODEL_FILES) -> Path:
    """The directory holding `model`'s files: `model` itself when it is a local directory, else the
    snapshot of Hugging Face repo id `model` at `revision` (see the module docstring).

    `files` are the patterns fetched when the hub is reachable and the snapshot lacks them. Raises
    ModelNotFoundError naming what is missing and where it looked.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model {model!r} is a file; give a model directory or a Hugging Face "
                                 "repo id")
    if not is_repo_id(model):
        raise ModelNotFoundError(f"model directory {model!r} does not exist (and it is not a Hugging Face "
                                 "repo id such as org/name)")
    return _snapshot(model, revision or "main", files)


def is_repo_id(model: str) -> bool:
    """Whether `model` is a valid Hugging Face repo id (`name` or `org/name`), not a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "~", "/")) or model.count("/") > 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub reads it from the environment, read now (not at import)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` asks never to contact the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _snapshot(repo_id: str, revision: str, files: Sequence[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()
    endpoint = os.environ.get("HF_ENDPOINT") or None      # read now, like the cache (a mirror, a test)
    try:
        # Online, huggingface_hub itself falls back to the cached snapshot when the hub is unreachable.
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                          local_files_only=offline, allow_patterns=list(files)))
        if not offline and files is MODEL_FILES and not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                              allow_patterns=list(LEGACY_WEIGHT_FILES)))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelNotFoundError(_not_found(repo_id, revision, cache, offline, err)) from None
    return snapshot


def _not_found(repo_id: str, revision: str, cache: Path, offline: bool, err: Exception) -> str:
    """What is missing, where it was looked for, and how to get it."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        missing = f"no {folder}"
    elif not (folder / "refs" / revision).is_file() and not (folder / "snapshots" / revision).is_dir():
        missing = f"no revision {revision!r} in {folder} (neither refs/{revision} nor snapshots/{revision})"
    else:
        missing = f"an incomplete snapshot in {folder}"
    reason = "HF_HUB_OFFLINE is set" if offline else f"the hub did not provide it: {_first_line(err)}"
    return (f"model {repo_id!r} at revision {revision!r} is not a local directory and not in the Hugging "
            f"Face cache ({missing}; {reason}); download it with `huggingface-cli download {repo_id}` where "
            "the hub is reachable, point HF_HOME at a cache that holds it, or give a local directory")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
