"""The sampler is numerically safe for every parameter validation accepts and for any logits: tiny and huge
temperatures and penalties, NaN and infinite logits, and a property test that samples the whole accepted
SamplingParams space (as the scheduler plans it and the executor reads it) mixed with greedy rows."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from executor_svc.runner import ModelRunner  # noqa: E402
from executor_svc.sampler import Sampler, SamplerOutput, SamplingRow  # noqa: E402
from pagedserve.contract.plan import StepPlan  # noqa: E402
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto  # noqa: E402
from pagedserve.contract.sequence_registry import SequenceState  # noqa: E402
from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402
from tests.sampling_strategies import FLOAT32_MAX, FLOAT64_MAX, accepted_sampling_params  # noqa: E402

SAMPLER = Sampler()
TINY_TEMPERATURES = [1e-38, 1e-45, 5e-324, 1e-300]
EOS = 2


def make_row(**fields: object) -> SamplingRow:
    """A sampled row with every filter and penalty off, overridden by `fields`."""
    defaults = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seed=99, stream=0, token_index=0,
                    prompt_token_ids=(), output_token_ids=())
    return SamplingRow(**{**defaults, **fields})  # type: ignore[arg-type]


def logits_of(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] float32 logits from a fixed generator."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits: torch.Tensor, count: int, **fields: object) -> SamplerOutput:
    """`count` draws from the one row of `logits`, each at its own token index."""
    rows = [make_row(token_index=i, **fields) for i in range(count)]
    return SAMPLER(logits.expand(count, -1), rows)


def assert_no_nan(out: SamplerOutput) -> None:
    """Logprobs are numbers or -inf, never NaN or above 0."""
    values = [*out.logprobs, *(lp for top in out.top_logprobs for _, lp in top)]
    assert not any(math.isnan(v) or v > 1e-6 for v in values), values


# 1. Temperature.

@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.5},
                                     {"top_k": 3, "top_p": 0.9, "min_p": 0.1}])
def test_a_tiny_temperature_draws_the_top_token(temperature: float, filters: dict) -> None:
    logits = logits_of(8, 300, seed=1)
    rows = [make_row(temperature=temperature, seed=i, num_logprobs=2, **filters) for i in range(8)]
    out = SAMPLER(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).amax(dim=-1).tolist()
    assert out.logprobs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_tiny_temperature_splits_ties_among_the_top_tokens_reproducibly(temperature: float) -> None:
    logits = logits_of(1, 50, seed=2).clamp(max=1.0)
    logits[0, 3] = logits[0, 7] = 4.0
    first = draws(logits, 200, temperature=temperature)
    assert set(first.token_ids) == {3, 7}
    assert draws(logits, 200, temperature=temperature).token_ids == first.token_ids


@pytest.mark.parametrize("temperature", [FLOAT32_MAX, 1e300, FLOAT64_MAX])
def test_a_huge_temperature_draws_nearly_uniformly(temperature: float) -> None:
    logits = logits_of(1, 10, seed=3)
    out = draws(logits, 2000, temperature=temperature, num_logprobs=3)
    assert set(out.token_ids) == set(range(10))
    assert_no_nan(out)


# 2. Penalties.

def seen_logits() -> torch.Tensor:
    """[1, 40]: small unseen logits; the seen tokens 10, 11, 12 and 13 at 5, 4, 0 and -1."""
    logits = logits_of(1, 40, seed=4).clamp(-1.0, 1.0)
    logits[0, 10:14] = torch.tensor([5.0, 4.0, 0.0, -1.0])
    return logits


@pytest.mark.parametrize("penalty", [1e-38, 1e-45, 5e-324])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-38])
def test_a_tiny_repetition_penalty_lifts_the_seen_positive_tokens(penalty: float, temperature: float) -> None:
    # 5 / 1e-38 overflows float32: it saturates, so both seen positive tokens lead every other one.
    out = draws(seen_logits(), 100, temperature=temperature, repetition_penalty=penalty,
                prompt_token_ids=(10, 11, 12), output_token_ids=(13,), num_logprobs=2)
    assert set(out.token_ids) <= {10, 11}
    if temperature == 0.0:
        assert set(out.token_ids) == {10}      # greedy: the tie of saturated logits goes to the lowest id
    raw = torch.log_softmax(seen_logits()[0], dim=-1)
    assert out.logprobs == pytest.approx([raw[t].item() for t in out.token_ids], abs=1e-5)


@pytest.mark.parametrize("penalty", [1e38, FLOAT32_MAX, 1e300, FLOAT64_MAX])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-38])
def test_a_huge_repetition_penalty_never_draws_a_seen_token(penalty: float, temperature: float) -> None:
    # Seen positive logits shrink to about 0, seen negative ones to -inf, and a seen zero stays 0 (a huge
    # penalty times 0 must not be NaN); the unseen token 20 at 2 leads.
    logits = seen_logits()
    logits[0, 20] = 2.0
    out = draws(logits, 100, temperature=temperature, repetition_penalty=penalty,
                prompt_token_ids=(10, 11, 12), output_token_ids=(13,), num_logprobs=1)
    if temperature == 1.0:                  # the seen positive ones now compete at about 0
        assert 13 not in out.token_ids and max(set(out.token_ids), key=out.token_ids.count) == 20
    else:
        assert out.token_ids == [20] * 100
    assert_no_nan(out)


@pytest.mark.parametrize("penalty", [1e38, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-38])
def test_a_row_its_penalties_leave_no_finite_logit_takes_id_0(penalty: float, temperature: float) -> None:
    # Every token was seen with a negative logit: a huge penalty makes all of them -inf.
    logits = -5.0 - logits_of(1, 16, seed=5).abs()
    out = draws(logits, 20, temperature=temperature, repetition_penalty=penalty,
                prompt_token_ids=tuple(range(16)), num_logprobs=2)
    assert out.token_ids == [0] * 20
    assert_no_nan(out)


def test_every_token_suppressed_takes_id_0() -> None:
    out = draws(logits_of(1, 6, seed=6), 10, suppressed_token_ids=tuple(range(6)))
    assert out.token_ids == [0] * 10


@pytest.mark.parametrize("presence", [1e300, -1e300, FLOAT64_MAX])
def test_huge_presence_and_frequency_penalties_stay_finite(presence: float) -> None:
    # The sampler takes any finite presence and frequency penalty (validation allows [-2, 2]).
    logits = logits_of(1, 30, seed=7)
    out = draws(logits, 50, presence_penalty=presence, frequency_penalty=-presence,
                output_token_ids=(4, 4, 5), num_logprobs=1)
    # presence - frequency * count: token 4 gains (presence > 0) or loses everything; token 5 nets 0.
    if presence > 0:
        assert out.token_ids == [4] * 50
    else:
        assert 4 not in out.token_ids
    assert_no_nan(out)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-45])
def test_a_tiny_top_p_keeps_only_the_top_token(top_p: float) -> None:
    logits = logits_of(1, 100, seed=8)
    out = draws(logits, 50, top_p=top_p)
    assert out.token_ids == [int(logits.argmax())] * 50


# 3. NaN and infinite logits.

def poisoned(kind: str, vocab: int = 64) -> torch.Tensor:
    """One row of logits with NaN or infinities in it."""
    row = logits_of(1, vocab, seed=9)
    if kind == "all nan":
        row[:] = math.nan
    elif kind == "some nan":
        row[0, ::2] = math.nan
    elif kind == "+inf":
        row[0, [5, 9]] = math.inf
    elif kind == "+inf and nan":
        row[0, ::3] = math.nan
        row[0, 10] = math.inf
    elif kind == "all -inf":
        row[:] = -math.inf
    elif kind == "all +inf":
        row[:] = math.inf
    return row


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-38])
@pytest.mark.parametrize("kind", ["all nan", "some nan", "+inf", "+inf and nan", "all -inf", "all +inf"])
def test_nan_and_infinite_logits_give_defined_tokens_and_logprobs(kind: str, temperature: float) -> None:
    logits = poisoned(kind)
    out = draws(logits, 200, temperature=temperature, num_logprobs=3, top_k=[0, 10][temperature > 0])
    tokens = set(out.token_ids)
    assert all(0 <= t < 64 for t in tokens)
    assert_no_nan(out)
    if kind == "some nan":                      # NaN reads as -inf: never drawn
        assert not {t for t in tokens if t % 2 == 0}
        assert all(math.isfinite(v) for v in out.logprobs)
    elif kind in ("+inf", "+inf and nan"):      # +inf tokens share all the probability
        inf_ids = {5, 9} if kind == "+inf" else {10}
        assert tokens <= inf_ids
        assert out.logprobs == pytest.approx([-math.log(len(inf_ids))] * 200)
    else:                                       # no information: uniform
        assert out.logprobs == pytest.approx([-math.log(64)] * 200)
        assert tokens == ({0} if temperature == 0.0 else tokens)
        if temperature > 0:
            assert len(tokens) > 5


def test_a_poisoned_row_changes_no_other_row() -> None:
    clean = logits_of(6, 64, seed=10)
    rows = [make_row(temperature=t, seed=i, top_k=k, num_logprobs=2)
            for i, (t, k) in enumerate([(0.0, 0), (1.0, 0), (0.7, 5), (1e-38, 0), (1.0, 0), (0.0, 0)])]
    expected = SAMPLER(clean, rows)
    for kind in ("all nan", "+inf", "all -inf"):
        logits = clean.clone()
        logits[4] = poisoned(kind)[0]
        out = SAMPLER(logits, rows)
        for i in (0, 1, 2, 3, 5):
            assert (out.token_ids[i], out.logprobs[i], out.top_logprobs[i]) == (
                expected.token_ids[i], expected.logprobs[i], expected.top_logprobs[i])


def test_half_precision_overflow_reads_as_infinity() -> None:
    logits = logits_of(2, 32, seed=11).half()
    logits[0, 7] = math.inf                                 # what an fp16 overflow gives
    out = SAMPLER(logits, [make_row(), make_row(temperature=0.0)])
    assert out.token_ids[0] == 7 and out.logprobs[0] == 0.0
    assert out.token_ids[1] == int(logits[1].float().argmax())


# 4. The whole accepted parameter space, as the scheduler plans it, mixed with greedy rows.

@st.composite
def batches(draw: st.DrawFn) -> tuple[int, list[SamplingParams], list[str], bool, int]:
    """(vocab size, request parameters, the logits kind of each request, whether the plan crosses the
    wire, a seed for the logits)."""
    vocab = draw(st.sampled_from([128, 1000, 4096]))
    params = draw(st.lists(accepted_sampling_params(max_sequences=4), min_size=1, max_size=5))
    greedy = [SamplingParams(temperature=0.0, logprobs=draw(st.integers(0, 3)))
              for _ in range(draw(st.integers(1, 5)))]
    kinds = ["clean"] * len(params) + ["greedy"] * len(greedy)
    extreme_kinds = st.sampled_from(["clean", "clean", "clean", "huge", "tiny", "all nan", "some nan", "+inf",
                                     "all -inf"])
    kinds[:len(params)] = [draw(extreme_kinds) for _ in params]
    order = draw(st.permutations(range(len(kinds))))
    return (vocab, [[*params, *greedy][i] for i in order], [kinds[i] for i in order], draw(st.booleans()),
            draw(st.integers(0, 2**31)))


def planned_rows(vocab: int, params: list[SamplingParams], wire: bool, seed: int
                 ) -> list[tuple[int, SamplingRow]]:
    """(request index, row) for every row the executor samples for these requests' first step, with
    made-up output histories, built the way the executor builds them from the scheduler's plan."""
    scheduler = Scheduler(SchedulerConfig(block_size=16, max_num_batched_tokens=4096), 512, 0, 2048,
                          eos_token_ids=[EOS], vocab_size=vocab, seed=0)
    generator = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        prompt = torch.randint(0, vocab, (1 + i % 7,), generator=generator).tolist()
        scheduler.add_request(f"r{i}", prompt, p)
    plan: StepPlan = scheduler.schedule()
    if wire:                                                # float32 fields, as a remote executor sees
        plan = plan_from_proto(plan_to_proto(plan))
    rows = []
    for work in plan.sequences:
        start = work.start
        assert start is not None
        outputs = torch.randint(0, vocab, (seed % 5,), generator=generator).tolist()
        state = SequenceState(start, start.sample_index, [*work.token_ids, *outputs])
        request = int(start.request_id[1:])
        rows.extend((request, ModelRunner._sampling_row(state, j, work.num_logprobs))
                    for j in range(work.num_samples))
    return rows


def logits_for(kinds: list[str], vocab: int, seed: int) -> torch.Tensor:
    """One row of logits per row kind: ordinary, huge or tiny in scale, or poisoned."""
    logits = logits_of(len(kinds), vocab, seed, scale=3.0)
    for i, kind in enumerate(kinds):
        if kind == "huge":
            logits[i] *= 1e36
        elif kind == "tiny":
            logits[i] *= 1e-36
        elif kind not in ("clean", "greedy"):
            logits[i] = poisoned(kind, vocab)[0]
    return logits


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_every_accepted_parameter_set_samples_safely_beside_greedy_rows(batch) -> None:
    vocab, params, kinds, wire, seed = batch
    planned = planned_rows(vocab, params, wire, seed)
    rows = [row for _, row in planned]
    row_kinds = [kinds[request] for request, _ in planned]
    logits = logits_for(row_kinds, vocab, seed)
    out = SAMPLER(logits, rows)
    assert_no_nan(out)
    for i, (row, kind) in enumerate(zip(rows, row_kinds, strict=True)):
        token = out.token_ids[i]
        assert 0 <= token < vocab
        assert len(out.top_logprobs[i]) == row.num_logprobs
        if kind in ("clean", "greedy", "tiny"):             # finite logits: a finite logprob, never a
            assert math.isfinite(out.logprobs[i])           # suppressed id (plenty of others are left)
            assert all(math.isfinite(lp) for _, lp in out.top_logprobs[i])
            assert token not in row.suppressed_token_ids
        if kind == "greedy":
            assert token == int(logits[i].argmax())
        # A row's draw is its own (invariant 5). Which of several tied alternatives tops the logprobs
        # may depend on the batch (torch.topk's order of equal values), their values do not.
        alone = SAMPLER(logits[i:i + 1], [row])
        assert (alone.token_ids[0], alone.logprobs[0]) == (token, out.logprobs[i])
        assert [lp for _, lp in alone.top_logprobs[0]] == [lp for _, lp in out.top_logprobs[i]]

