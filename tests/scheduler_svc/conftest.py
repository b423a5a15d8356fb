"""Fixtures shared by the scheduler's tests: the two trained test tokenizers (tokenizer_fixtures.py)."""

from __future__ import annotations

import pytest
from tokenizer_fixtures import build_byte_level, build_metaspace

from scheduler_svc.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 style)."""
    return load_tokenizer(build_byte_level(tmp_path_factory.mktemp("byte_level")))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    """A metaspace tokenizer with byte fallback (Llama style)."""
    return load_tokenizer(build_metaspace(tmp_path_factory.mktemp("metaspace")))
