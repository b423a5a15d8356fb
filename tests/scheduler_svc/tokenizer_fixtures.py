"""Small tokenizers trained in the test run (no model hub): a byte-level BPE (GPT-2 style) and a
sentencepiece-style BPE with Metaspace and byte fallback (Llama-2 style), saved as HF tokenizer
directories that `scheduler_svc.tokenizer.load_tokenizer` reads."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Mixed text with multi-byte characters (2, 3 and 4 UTF-8 bytes). The vocabularies are kept small, so
# rarer characters are split over several byte tokens.
CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "Le café est très bon, merci beaucoup! Crème brûlée à volonté.",
    "中文文本测试 我们喜欢中文 中文很好",
    "Smile 🙂 please 🙂🙂 and stop when you see the end.",
    "The quick brown fox jumps over the lazy dog.\nNew line, tabs\tand spaces   here.",
    "numbers 0123456789 and symbols !@#$%^&*() <tag> [x] {y}",
]

# Texts for the tests: seen and unseen multi-byte characters (ü, 日本語, 🎉 are not in the corpus).
SAMPLE_TEXTS = [
    "Hello world",
    "café crème brûlée",
    "中文测试 and 日本語",
    "smile 🙂 party 🎉 über",
    " leading space and trailing space ",
    "line one\nline two\n\nend",
    "mixé 中🙂x🎉ü!",
]

BYTE_LEVEL_BOS = "<|bos|>"
BYTE_LEVEL_EOS = "<|eos|>"
METASPACE_BOS = "<s>"
METASPACE_EOS = "</s>"
METASPACE_UNK = "<unk>"


def build_byte_level(directory: Path) -> Path:
    """Train a byte-level BPE with a BOS post-processor and save it as an HF tokenizer in `directory`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[BYTE_LEVEL_BOS, BYTE_LEVEL_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    bos_id = tok.token_to_id(BYTE_LEVEL_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BYTE_LEVEL_BOS} $A", special_tokens=[(BYTE_LEVEL_BOS, bos_id)]
    )
    return _save(tok, directory, bos_token=BYTE_LEVEL_BOS, eos_token=BYTE_LEVEL_EOS)


def build_metaspace(directory: Path) -> Path:
    """Train a sentencepiece-style BPE (Metaspace, prepend "first", byte fallback, BOS) and save it."""
    tok = Tokenizer(models.BPE(unk_token=METASPACE_UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=[METASPACE_UNK, METASPACE_BOS, METASPACE_EOS],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    # Byte-fallback pieces are ordinary tokens, as in Llama-2's vocabulary; the trainer does not make
    # them, so add them to the trained model.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    bos_id = tok.token_to_id(METASPACE_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{METASPACE_BOS} $A", special_tokens=[(METASPACE_BOS, bos_id)]
    )
    return _save(tok, directory, bos_token=METASPACE_BOS, eos_token=METASPACE_EOS, unk_token=METASPACE_UNK)


def _save(tok: Tokenizer, directory: Path, **special_tokens: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **special_tokens
    )
    wrapped.save_pretrained(str(directory))
    return directory
