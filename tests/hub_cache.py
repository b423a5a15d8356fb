"""A fake Hugging Face hub cache: huggingface_hub's `models--org--name` layout, built under a temp HF_HOME."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hf_home: Path, repo_id: str, source: Path, commit: str = COMMIT,
                refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of model directory `source` into the cache under `hf_home` as snapshot `commit` of
    `repo_id`, with each of `refs` pointing at it (blobs/ holds the files, snapshots/ links to them, as
    huggingface_hub lays them out); returns the snapshot directory."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, file in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{commit[:8]}{i:032x}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
