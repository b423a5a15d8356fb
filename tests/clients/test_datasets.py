"""ShareGPT files for `pagedserve bench --dataset-path`: JSON and JSONL read alike, the first two turns
taken, pairs too short or too long skipped as vLLM's benchmark skips them, tokenized with the model's
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.datasets import MAX_PROMPT_LEN, is_valid_pair, read_conversations, sample, tokenizer_encoder
from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError

FIXTURE = Path(__file__).parent / "data" / "sharegpt_small.json"
USABLE = 4          # of the fixture's 8: one has a single turn, one a non-text turn, one a 2-token
                    # output and one a 1,201-token prompt


def words(text: str) -> list[int]:
    """A stand-in tokenizer: one token per word."""
    return list(range(len(text.split())))


def test_the_first_two_turns_of_each_conversation_with_two_are_read():
    pairs = read_conversations(FIXTURE)
    assert len(pairs) == 6                      # the single-turn and the non-text one are left out
    assert pairs[0][0].startswith("Write a function") and pairs[0][1].startswith("def total(values):")
    assert pairs[1][1].startswith("with open(path)")        # the third and fourth turns are not used


def test_json_lines_read_as_the_json_list(tmp_path):
    records = json.loads(FIXTURE.read_text())
    lines = tmp_path / "sharegpt.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert read_conversations(lines) == read_conversations(FIXTURE)


@pytest.mark.parametrize("content", ["", "[]", '{"conversations": [{"value": "only one"}]}', "not json"])
def test_a_file_without_usable_conversations_is_refused_naming_the_flag(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError) as err:
        read_conversations(path)
    assert err.value.field == "dataset_path" and str(path) in str(err.value)


def test_a_missing_file_is_refused():
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        read_conversations(Path("/nonexistent/sharegpt.json"))


def test_vllms_length_rules_and_the_model_context():
    assert is_valid_pair(4, 4, 2048) and not is_valid_pair(3, 100, 2048) and not is_valid_pair(100, 3, 2048)
    assert is_valid_pair(MAX_PROMPT_LEN, 1024, 4096) and not is_valid_pair(MAX_PROMPT_LEN + 1, 10, 4096)
    assert not is_valid_pair(1000, 1049, 4096)              # over 2,048 in all
    assert not is_valid_pair(500, 525, 1024)                # over the model's context


def test_the_model_tokenizer_measures_the_fixture_and_skips_what_vllm_skips():
    encode = tokenizer_encoder(default_model_dir())
    taken = sample(read_conversations(FIXTURE), encode, USABLE, max_model_len=1024, seed=0)
    assert (len(taken.samples), taken.available) == (USABLE, 6)
    assert taken.skipped == taken.examined - USABLE <= 2
    valid = [p for p, _ in read_conversations(FIXTURE)]
    valid = {tuple(encode(p)) for p in valid if not p.startswith(("Say nothing", "import os"))}
    assert {s.prompt_token_ids for s in taken.samples} == valid     # every usable one, no other
    assert all(s.output_len >= 4 for s in taken.samples)


def test_sampling_is_seeded_and_refuses_asking_for_more_than_the_file_holds():
    pairs = read_conversations(FIXTURE)
    first = sample(pairs, words, 3, 1024, seed=1)
    assert sample(pairs, words, 3, 1024, seed=1) == first
    assert sample(pairs, words, 3, 1024, seed=2) != first
    with pytest.raises(InvalidArgumentError) as err:
        sample(pairs, words, 10, 1024)
    assert err.value.field == "num_requests" and "fewer than the 10 requests" in str(err.value)


def test_a_shared_prefix_counts_against_the_prompt_limit():
    pairs = [("one two three four five", "a b c d e")]
    assert len(sample(pairs, words, 1, 4096, reserved_prompt_len=MAX_PROMPT_LEN - 5).samples) == 1
    with pytest.raises(InvalidArgumentError):
        sample(pairs, words, 1, 4096, reserved_prompt_len=MAX_PROMPT_LEN - 4)
