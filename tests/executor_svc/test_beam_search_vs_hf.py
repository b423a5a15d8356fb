"""Beam search through the real scheduler and model backend against HF transformers' beam search.

A tiny model is served on the CPU in float32 and the same weights run HF `generate(num_beams=...)`
for each `early_stopping` (True, False, "never"), every hypothesis returned (n = beam width). The EOS
token ids are chosen per case among tokens the model ranks high, so that hypotheses finish early and
the three modes end the search in different places.

One convention differs on purpose (scheduler_svc/beam_search.py): a finished hypothesis is scored
here by its length without the EOS that ended it, while HF counts the EOS. With length_penalty 0 the
length does not matter and everything must equal unmodified HF: token ids, order and scores. With a
length penalty the comparison is made against HF with its scored length switched to ours (the EOS
candidates' logprobs rescaled on their way into HF's bookkeeping of finished beams); a last test
shows that unmodified HF does rank differently there, by exactly that length. Everything else agrees
as it is, hypotheses cut off at max_new_tokens included: both keep the top `width` candidates of the
last step, scored by all their tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, build_hf_model, tiny_config  # noqa: E402

from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

BLOCK_SIZE = 4
MAX_NEW = 16
MODES = (True, False, "never")
# (prompt, EOS token ids, beam width). With a length penalty: when the two tokens the model ranks
# highest after the prompt both end it, two hypotheses finish at once, False stops there and "never"
# goes on to longer ones that score better; with the first and third, True stops where False finds
# a better second hypothesis later.
CASES = [
    ([24, 29, 34, 39, 44], (115, 1), 2),
    ([24, 29, 34, 39, 44], (1, 38), 2),
    ([24, 29, 34, 39, 44], (116,), 2),
    ([59, 64, 69, 74, 79], (36, 53), 2),
    ([59, 64, 69, 74, 79], (36,), 3),
]

Beam = tuple[tuple[int, ...], float]          # output token ids, score


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The HF model and a PagedServe model backend over the same saved weights."""
    from executor_svc.config import ExecutorConfig
    from executor_svc.model_backend import ModelBackend

    model = build_hf_model(tiny_config("llama_gqa_llama3"), seed=0)
    model.generation_config.eos_token_id = None       # each case names its own EOS
    path = tmp_path_factory.mktemp("beam_llama")
    model.save_pretrained(path)
    backend = ModelBackend(ExecutorConfig(model=str(path), device="cpu", dtype="float32",
                                          cpu_kv_cache_bytes=1 << 22))
    backend.init_cache(BLOCK_SIZE, 0.9, 0)
    return model, backend


def paged_beams(backend, prompt: list[int], eos: tuple[int, ...], width: int, length_penalty: float,
                early_stopping: object, min_tokens: int = 0) -> list[Beam]:
    """All `width` hypotheses of PagedServe's beam search, best first, with their scores."""
    backend.reset_sequences()
    config = SchedulerConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=128, watermark=0.0)
    scheduler = Scheduler(config, 256, 0, 128, eos_token_ids=list(eos), vocab_size=VOCAB, seed=0)
    scheduler.add_request("beam", prompt, SamplingParams(
        n=width, beam_width=width, temperature=0.0, max_tokens=MAX_NEW, length_penalty=length_penalty,
        early_stopping=early_stopping, min_tokens=min_tokens))
    final = None
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        outputs = scheduler.pop_outputs()
        if not plan.is_empty:
            outputs += scheduler.process_result(backend.execute(plan))
        final = next((o for o in outputs if o.finished), final)
    assert final is not None and final.error is None
    return [(tuple(o.token_ids), _score(o.cumulative_logprob, len(o.token_ids) - (o.token_ids[-1] in eos),
                                        length_penalty)) for o in final.outputs]


def _score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    return cumulative_logprob / max(length, 1) ** length_penalty


def hf_beams(model, prompt: list[int], eos: tuple[int, ...], width: int, length_penalty: float,
             early_stopping: object, min_tokens: int = 0) -> list[Beam]:
    """All `width` hypotheses of HF's beam search, best first, with HF's scores."""
    config = transformers.GenerationConfig(
        num_beams=width, num_return_sequences=width, early_stopping=early_stopping,
        length_penalty=length_penalty, max_new_tokens=MAX_NEW, min_new_tokens=min_tokens, do_sample=False,
        eos_token_id=list(eos), pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    beams = []
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        tokens = sequence[len(prompt):].tolist()
        ends = [i for i, token in enumerate(tokens) if token in eos]
        if ends:                             # HF pads a hypothesis that ended early
            tokens = tokens[:ends[0] + 1]
        beams.append((tuple(tokens), score.item()))
    return beams


@contextlib.contextmanager
def hf_scoring_without_the_eos(model, eos: tuple[int, ...], monkeypatch) -> Iterator[None]:
    """HF's beam search with PagedServe's scored length: an EOS hypothesis divides by its length
    without the EOS.

    HF divides every candidate that ends in a step by the same length, the generated tokens
    including the new one (`cur_len + 1 - prompt`), in `_update_finished_beams`; multiplying an EOS
    candidate's logprob by ((L + 1) / L) ** length_penalty on the way in makes that division ours
    (an EOS as the first token divides by 1 either way). Nothing else in HF's search reads those
    logprobs.
    """
    original = getattr(type(model), "_update_finished_beams", None)
    assert original is not None, "HF's beam search changed: re-derive hf_scoring_without_the_eos"

    def update(**kwargs):
        length = kwargs["cur_len"] - kwargs["decoder_prompt_len"]        # without the new token
        new_tokens = kwargs["topk_running_sequences"][:, :, kwargs["cur_len"]]
        ended_by_eos = torch.isin(new_tokens, torch.tensor(eos))
        scale = ((length + 1) / max(length, 1)) ** kwargs["length_penalty"]
        kwargs["topk_log_probs"] = torch.where(ended_by_eos, kwargs["topk_log_probs"] * scale,
                                               kwargs["topk_log_probs"])
        return original(model, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model, "_update_finished_beams", update)
        yield


def assert_same_beams(ours: list[Beam], theirs: list[Beam], label: str) -> None:
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in theirs], label
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4), label


def test_without_a_length_penalty_every_mode_equals_hf(models):
    model, backend = models
    results = {}
    for prompt, eos, width in CASES:
        for mode in MODES:
            ours = paged_beams(backend, prompt, eos, width, 0.0, mode)
            assert_same_beams(ours, hf_beams(model, prompt, eos, width, 0.0, mode), f"{prompt} {mode}")
            results[(tuple(prompt), eos, width, mode)] = ours
    # Without a length penalty scores only fall as beams grow, so False is already exact.
    assert all(results[(tuple(p), e, w, False)] == results[(tuple(p), e, w, "never")] for p, e, w in CASES)


def test_min_tokens_equals_hf_min_new_tokens(models):
    # Both EOS ids lead after this prompt: min_tokens keeps them out of the first two steps.
    model, backend = models
    prompt, eos, width = CASES[0]
    for mode in MODES:
        ours = paged_beams(backend, prompt, eos, width, 0.0, mode, min_tokens=2)
        assert_same_beams(ours, hf_beams(model, prompt, eos, width, 0.0, mode, min_tokens=2), str(mode))
        assert all(len(tokens) > 2 for tokens, _ in ours)
        assert ours != paged_beams(backend, prompt, eos, width, 0.0, mode)


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_with_a_length_penalty_every_mode_equals_hf_scoring_as_we_do(models, monkeypatch, length_penalty):
    model, backend = models
    results = {}
    for prompt, eos, width in CASES:
        with hf_scoring_without_the_eos(model, eos, monkeypatch):
            for mode in MODES:
                ours = paged_beams(backend, prompt, eos, width, length_penalty, mode)
                theirs = hf_beams(model, prompt, eos, width, length_penalty, mode)
                assert_same_beams(ours, theirs, f"{prompt} eos={eos} {mode}")
                results[(tuple(prompt), eos, width, mode)] = ours
    cases = [(tuple(p), e, w) for p, e, w in CASES]
    assert any(results[(*c, True)] != results[(*c, False)] for c in cases)
    assert any(results[(*c, False)] != results[(*c, "never")] for c in cases)


def test_unmodified_hf_counts_the_eos_in_the_scored_length(models):
    model, backend = models
    differs = 0
    for prompt, eos, width in CASES:
        ours = paged_beams(backend, prompt, eos, width, 1.0, "never")
        theirs = hf_beams(model, prompt, eos, width, 1.0, "never")
        ours_by_tokens = dict(ours)
        for tokens, score in theirs:
            if tokens in ours_by_tokens and tokens[-1] in eos:     # HF: cumulative / (length + 1)
                length = len(tokens) - 1
                cumulative = ours_by_tokens[tokens] * max(length, 1)
                assert score * (length + 1) == pytest.approx(cumulative, abs=1e-4)
        differs += [t for t, _ in ours] != [t for t, _ in theirs]
    assert differs                           # the convention does change which hypotheses win
