"""Real conversations for `pagedserve bench --dataset-path`: a ShareGPT-format JSON or JSONL file.

Sampled as `vllm bench serve --dataset-name sharegpt` samples: conversations with at least two turns,
the first turn the prompt and the second the reference completion, both tokenized with the served
model's tokenizer; the output length is the completion's token count. Conversations are shuffled with
the seed and taken in that order, skipping a pair that is too short (prompt or output under 4 tokens),
too long (prompt over 1024 tokens, or prompt + output over 2048), or longer than the model's context.

A file is a JSON list of conversations, or JSON Lines with one per line; each conversation is
`{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedserve.errors import InvalidArgumentError

# vLLM's limits for ShareGPT pairs (benchmarks/datasets.py: is_valid_sequence).
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True, slots=True)
class DatasetSample:
    """One request from the dataset: its prompt's tokens and how many tokens to generate."""

    prompt_token_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True, slots=True)
class Sampling:
    """The samples taken, and how many conversations were looked at and skipped to find them."""

    samples: tuple[DatasetSample, ...]
    examined: int
    skipped: int
    available: int          # conversations with two turns in the file


def read_conversations(path: Path) -> list[tuple[str, str]]:
    """The first two turns (prompt, completion) of every conversation in the file that has two."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidArgumentError("dataset_path", f"cannot read {path}: {err.strerror or err}") from None
    records = _parse(text, path)
    pairs = [pair for record in records if (pair := _first_turns(record)) is not None]
    if not pairs:
        raise InvalidArgumentError("dataset_path", f"{path} has no conversation with two turns "
                                   '(expected {"conversations": [{"value": ...}, {"value": ...}]})')
    return pairs


def _parse(text: str, path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (one object per non-blank line)."""
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return json.loads(stripped)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InvalidArgumentError("dataset_path", f"{path} is neither a JSON list nor JSON Lines: "
                                   f"{err.msg} at line {err.lineno}") from None


def _first_turns(record: Any) -> tuple[str, str] | None:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    prompt, reply = (turn.get("value") if isinstance(turn, dict) else None for turn in turns[:2])
    if not (isinstance(prompt, str) and isinstance(reply, str)):
        return None
    return prompt, reply


def is_valid_pair(prompt_len: int, output_len: int, max_model_len: int) -> bool:
    """Whether vLLM's ShareGPT sampling keeps this pair, and the model can serve it."""
    return (prompt_len >= MIN_LEN and output_len >= MIN_LEN and prompt_len <= MAX_PROMPT_LEN
            and prompt_len + output_len <= min(MAX_TOTAL_LEN, max_model_len))


def sample(conversations: Sequence[tuple[str, str]], encode: Encode, num_requests: int, max_model_len: int,
           seed: int = 0, reserved_prompt_len: int = 0) -> Sampling:
    """`num_requests` pairs, shuffled with `seed`, tokenized with `encode`, the unfit ones skipped.

    `reserved_prompt_len` tokens go in front of every prompt (a shared prefix), so they count against
    the model's context too. Raises InvalidArgumentError when the file has too few usable pairs.
    """
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    taken: list[DatasetSample] = []
    examined = 0
    for index in order:
        if len(taken) == num_requests:
            break
        examined += 1
        prompt, completion = conversations[index]
        prompt_ids, output_len = tuple(encode(prompt)), len(encode(completion))
        if is_valid_pair(len(prompt_ids) + reserved_prompt_len, output_len, max_model_len):
            taken.append(DatasetSample(prompt_ids, output_len))
    if len(taken) < num_requests:
        raise InvalidArgumentError(
            "num_requests", f"the dataset has {len(taken)} usable conversations of {len(conversations)} "
            f"(prompt and output at least {MIN_LEN} tokens, prompt at most {MAX_PROMPT_LEN}, both at most "
            f"{min(MAX_TOTAL_LEN, max_model_len)}), fewer than the {num_requests} requests asked for")
    return Sampling(tuple(taken), examined, examined - len(taken), len(conversations))


def tokenizer_encoder(model_dir: str | Path) -> Encode:
    """The model's tokenizer as vLLM's benchmark applies it: special tokens (a BOS) included."""
    from scheduler_svc.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as err:
        raise InvalidArgumentError("tokenizer", f"cannot load a tokenizer from {model_dir}: {err}") from None
    return lambda text: tokenizer(text).input_ids
