"""Fixtures shared by test folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under a temp HF_HOME, offline: no test may reach for the network."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
