"""Loading tokenizers without torch, prompt encoding, and the texts of single tokens."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tokenizer_fixtures import METASPACE_BOS, build_byte_level, build_metaspace

from scheduler_svc.tokenizer import TokenTexts, encode_prompt, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    return build_byte_level(tmp_path_factory.mktemp("byte_level"))


@pytest.fixture(scope="module")
def metaspace_dir(tmp_path_factory) -> Path:
    return build_metaspace(tmp_path_factory.mktemp("metaspace"))


@pytest.fixture(scope="module")
def byte_level(byte_level_dir):
    return load_tokenizer(byte_level_dir)


@pytest.fixture(scope="module")
def metaspace(metaspace_dir):
    return load_tokenizer(metaspace_dir)


class CountingTokenizer:
    """Counts decode() calls."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.decodes = 0

    def decode(self, ids, **kwargs):
        self.decodes += 1
        return self.tok.decode(ids, **kwargs)

    def encode(self, text, **kwargs):
        return self.tok.encode(text, **kwargs)


# ------------------------------------------------------------------------------------------ loading


def test_load_tokenizer_accepts_str_and_path(byte_level_dir):
    for where in (byte_level_dir, str(byte_level_dir)):
        tok = load_tokenizer(where)
        assert tok.decode(tok.encode("café 中文 🙂", add_special_tokens=False)) == "café 中文 🙂"


@pytest.mark.parametrize("which", ["byte_level", "metaspace"])
def test_encode_prompt_adds_bos_like_the_model_expects(request, which):
    tok = request.getfixturevalue(which)
    ids = encode_prompt(tok, "Hello café 中文 🎉")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello café 中文 🎉"


def test_loading_and_detokenizing_never_imports_torch(byte_level_dir, metaspace_dir):
    # A fresh interpreter: this pytest process may have imported torch for other tests. The check is
    # meaningful where torch is installed (it is in the dev environment), as AutoTokenizer would then
    # import it.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from scheduler_svc.detokenizer import IncrementalDetokenizer, decode_whole
        from scheduler_svc.tokenizer import TokenTexts, encode_prompt, load_tokenizer
        for where in ({str(byte_level_dir)!r}, {str(metaspace_dir)!r}):
            tok = load_tokenizer(where)
            ids = encode_prompt(tok, "Hello café 中文 🎉")
            texts = TokenTexts(tok)
            assert [texts.text(i) for i in ids]
            det = IncrementalDetokenizer(tok, ids[:3], stop=["xyz"])
            det.add_tokens(ids[3:])
            det.flush()
            decode_whole(tok, ids[:3], ids[3:])
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path.name)):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "{}", json.dumps({"added_tokens": []})])
def test_unreadable_tokenizer_json_is_a_value_error_naming_the_directory(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=f"cannot load the tokenizer in .*{tmp_path.name}"):
        load_tokenizer(tmp_path)


def test_without_tokenizer_json_falls_back_to_auto_tokenizer_with_a_warning(tmp_path, monkeypatch, caplog):
    import transformers

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    calls = []
    sentinel = object()

    def fake_from_pretrained(path, **kwargs):
        # Stands in for the real call, which may import torch into this process.
        calls.append((path, kwargs))
        return sentinel

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with caplog.at_level(logging.WARNING, logger="scheduler_svc.tokenizer"):
        assert load_tokenizer(tmp_path) is sentinel
    assert calls == [(str(tmp_path), {"local_files_only": True})]
    assert "may import torch" in caplog.text and "tokenizer.json" in caplog.text


def test_auto_tokenizer_failure_is_a_value_error_naming_the_directory(tmp_path, monkeypatch):
    import transformers

    (tmp_path / "vocab.txt").write_text("")

    def failing_from_pretrained(path, **kwargs):
        raise OSError("cannot read vocab.txt")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", failing_from_pretrained)
    with pytest.raises(ValueError, match=f"{tmp_path.name}.*cannot read vocab.txt"):
        load_tokenizer(tmp_path)


# -------------------------------------------------------------------------------------- TokenTexts


def test_byte_level_token_texts_are_their_own_decodes(byte_level):
    texts = TokenTexts(byte_level)
    for token_id in range(len(byte_level)):
        assert texts.text(token_id) == byte_level.decode([token_id], clean_up_tokenization_spaces=False)


def test_partial_byte_tokens_read_as_replacement_characters(byte_level, metaspace):
    for tok in (byte_level, metaspace):
        # The emoji's byte tokens (after the metaspace tokenizer's "▁" word start).
        emoji = [t for t in tok.encode("🎉", add_special_tokens=False) if tok.convert_ids_to_tokens(t) != "▁"]
        assert len(emoji) > 1
        texts = TokenTexts(tok)
        assert all(texts.text(t) == FFFD for t in emoji)


def test_metaspace_token_texts_keep_the_leading_space(metaspace):
    texts = TokenTexts(metaspace)
    word = metaspace.encode("Hello", add_special_tokens=False)[0]
    assert metaspace.convert_ids_to_tokens(word).startswith("▁")
    assert metaspace.decode([word]) == texts.text(word).lstrip(" ")  # decode alone drops the space
    assert texts.text(word).startswith(" ")
    inner = metaspace.encode("Hello", add_special_tokens=False)[1]
    assert not metaspace.convert_ids_to_tokens(inner).startswith("▁")
    assert texts.text(inner) == metaspace.decode([inner])


def test_special_tokens_keep_their_text(metaspace):
    texts = TokenTexts(metaspace)
    assert texts.text(metaspace.bos_token_id) == METASPACE_BOS


def test_token_texts_are_cached(byte_level):
    counting = CountingTokenizer(byte_level)
    texts = TokenTexts(counting)
    token = byte_level.encode("Hello", add_special_tokens=False)[0]
    before = counting.decodes
    first = texts.text(token)
    after_first = counting.decodes
    assert after_first > before
    assert texts.text(token) == first
    assert counting.decodes == after_first
