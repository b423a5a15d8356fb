"""The batched sampler against straightforward per-row references: greedy, penalties, filters, the
distribution of draws, logprobs, and reproducibility across batches, row orders and devices."""

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest

torch = pytest.importorskip("torch")

from executor_svc import sampler as sampler_module  # noqa: E402
from executor_svc.sampler import (  # noqa: E402
    Sampler,
    SamplingRow,
    apply_penalties,
    draw_key,
    draw_keys,
    filtered_probs,
    uniform_noise,
)

SAMPLER = Sampler()


def make_row(**fields) -> SamplingRow:
    """A sampled row with every filter and penalty off, overridden by `fields`."""
    defaults = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seed=1234, stream=0, token_index=0,
                    prompt_token_ids=(), output_token_ids=())
    return SamplingRow(**{**defaults, **fields})


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] float32 logits from a fixed generator."""
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def random_row(rng: random.Random, vocab: int) -> SamplingRow:
    """A row with a random mix of parameters, greedy or sampled, filtered or not, penalised or not."""
    return SamplingRow(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.5]), top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 0, 5, 40]), min_p=rng.choice([0.0, 0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]), presence_penalty=rng.choice([0.0, 0.7]),
        frequency_penalty=rng.choice([0.0, 0.3]), seed=rng.randrange(2**63), stream=rng.randrange(4),
        token_index=rng.randrange(500),
        prompt_token_ids=[rng.randrange(vocab) for _ in range(rng.randrange(20))],
        output_token_ids=[rng.randrange(vocab) for _ in range(rng.randrange(20))],
        suppressed_token_ids=tuple(rng.sample(range(vocab), rng.choice([0, 0, 3]))),
        num_logprobs=rng.choice([0, 0, 2, 5]))


def reference_penalised(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """Penalties and suppression of one row [V], token by token."""
    out = logits.double().clone()
    for token in set(row.prompt_token_ids) | set(row.output_token_ids):
        value = out[token].item()
        out[token] = value / row.repetition_penalty if value > 0 else value * row.repetition_penalty
    for token, count in Counter(row.output_token_ids).items():
        out[token] -= row.presence_penalty + row.frequency_penalty * count
    for token in row.suppressed_token_ids:
        out[token] = -math.inf
    return out


def reference_probs(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The normalised distribution one sampled row draws from [V] float64, by walking sorted tokens."""
    probs = torch.softmax(reference_penalised(logits, row) / row.temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda v: -probs[v].item())
    candidates = order[:row.top_k] if row.top_k > 0 else order
    mass = sum(probs[v].item() for v in candidates)
    kept, cumulative = [], 0.0
    for v in candidates:
        if cumulative >= row.top_p * mass:
            break
        kept.append(v)
        cumulative += probs[v].item()
    top = probs[order[0]].item()
    kept = [v for v in kept if probs[v].item() >= row.min_p * top]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Token ids only."""
    return SAMPLER(logits, rows).token_ids


# 1. Greedy.

def test_greedy_rows_take_the_argmax_in_any_float_dtype() -> None:
    logits = random_logits(16, 300, seed=1)
    rows = [make_row(temperature=0.0, seed=i) for i in range(16)]
    expected = logits.argmax(dim=-1).tolist()
    assert sample(logits, rows) == expected
    halves = logits.to(torch.bfloat16)
    assert sample(halves, rows) == halves.float().argmax(dim=-1).tolist()


def test_greedy_with_repetition_penalty_matches_a_per_row_reference() -> None:
    logits = random_logits(12, 50, seed=2)
    rng = random.Random(2)
    rows = []
    for i in range(12):
        best = int(logits[i].argmax())
        history = [best] + [rng.randrange(50) for _ in range(5)]   # the raw argmax is penalised
        rows.append(make_row(temperature=0.0, repetition_penalty=rng.choice([1.5, 3.0, 10.0]),
                             prompt_token_ids=history[:3], output_token_ids=history[3:]))
    expected = [int(reference_penalised(logits[i], r).argmax()) for i, r in enumerate(rows)]
    assert expected != logits.argmax(dim=-1).tolist()   # the penalty matters for some rows
    assert sample(logits, rows) == expected


# 2. Reproducibility (invariant 5).

def test_a_rows_draw_does_not_depend_on_batch_or_row_order() -> None:
    vocab = 2000
    rng = random.Random(3)
    rows = [random_row(rng, vocab) for _ in range(33)]
    logits = random_logits(33, vocab, seed=3, scale=1.0)
    batched = sample(logits, rows)
    alone = [sample(logits[i:i + 1], rows[i:i + 1])[0] for i in range(33)]
    assert batched == alone
    order = list(range(33))
    rng.shuffle(order)
    permuted = sample(logits[order], [rows[i] for i in order])
    assert permuted == [batched[i] for i in order]


def test_draws_ignore_the_global_rng_state() -> None:
    logits = random_logits(8, 500, seed=4, scale=0.5)
    rows = [make_row(seed=7, token_index=i) for i in range(8)]
    torch.manual_seed(1)
    first = sample(logits, rows)
    torch.manual_seed(2)
    torch.rand(1000)
    assert sample(logits, rows) == first


def test_streams_token_indices_and_seeds_give_different_draws() -> None:
    vocab = 1000
    logits = torch.zeros(200, vocab)   # uniform: 200 independent draws give ~181 distinct tokens
    for field in ("stream", "token_index", "seed"):
        draws = sample(logits, [make_row(**{"seed": 5, field: i}) for i in range(200)])
        assert len(set(draws)) > 150, field


def test_other_rows_parameters_never_change_a_rows_draw() -> None:
    vocab = 800
    logits = random_logits(9, vocab, seed=6, scale=1.0)
    target = make_row(temperature=0.9, top_p=0.95, seed=99, token_index=3)
    rng = random.Random(6)
    expected = sample(logits[4:5], [target])[0]
    for _ in range(15):
        rows = [random_row(rng, vocab) for _ in range(9)]
        rows[4] = target
        assert sample(logits, rows)[4] == expected


def test_draw_keys_and_noise_are_well_spread() -> None:
    keys = {draw_key(seed, stream, index) for seed in range(4) for stream in range(4) for index in range(4)}
    assert len(keys) == 64
    assert draw_key(1, 2, 3) != draw_key(1, 3, 2)
    vocabulary = torch.arange(4096)[None, :]
    noise = uniform_noise([draw_key(0, 0, i) for i in range(64)], vocabulary)   # [64, 4096]
    assert bool(((noise > 0) & (noise < 1)).all())
    assert abs(noise.mean().item() - 0.5) < 0.005
    assert abs(noise.std().item() - (1 / 12) ** 0.5) < 0.005
    correlation = torch.corrcoef(noise[:8])                                  # [8, 8]
    assert (correlation - torch.eye(8)).abs().max().item() < 0.06
    assert torch.equal(uniform_noise([draw_key(0, 0, 5)], vocabulary)[0], noise[5])
    assert torch.equal(uniform_noise([draw_key(0, 0, 5)], torch.tensor([[4000, 7]]))[0], noise[5, [4000, 7]])


# 3. The distribution of draws.

DISTRIBUTION_DRAWS = 20000


@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.1},
                                     {"top_k": 8, "top_p": 0.85}],
                         ids=["temperature", "top_k", "top_p", "min_p", "top_k_then_top_p"])
def test_draws_follow_the_filtered_distribution(filters: dict) -> None:
    logits_row = random_logits(1, 32, seed=7, scale=1.5)[0]
    row = make_row(temperature=0.7, seed=11, **filters)
    expected = reference_probs(logits_row, row)                           # [V]
    support = set(expected.nonzero().squeeze(1).tolist())
    assert len(support) >= (5 if filters else 32)

    probs = filtered_probs(logits_row[None], [row])[0].double()
    assert torch.allclose(probs / probs.sum(), expected, atol=1e-6)

    rows = [make_row(temperature=0.7, seed=11, token_index=i, **filters) for i in range(DISTRIBUTION_DRAWS)]
    draws = Counter(sample(logits_row.expand(DISTRIBUTION_DRAWS, -1), rows))
    assert set(draws) == support
    empirical = torch.tensor([draws[v] for v in range(32)], dtype=torch.float64) / DISTRIBUTION_DRAWS
    total_variation = 0.5 * (empirical - expected).abs().sum().item()
    assert total_variation < 0.02


def test_top_k_keeps_tokens_tied_with_the_last_kept_one() -> None:
    logits_row = torch.tensor([5.0, 3.0, 3.0, 0.0, 0.0, -1.0])
    rows = [make_row(top_k=2, token_index=i) for i in range(3000)]
    draws = Counter(sample(logits_row.expand(3000, -1), rows))
    assert set(draws) == {0, 1, 2}
    assert abs(draws[1] - draws[2]) < 150


def test_top_p_beyond_the_probe_agrees_with_a_full_sort() -> None:
    vocab = 3000
    flat = random_logits(2, vocab, seed=8, scale=0.3)        # near uniform: top_p keeps ~top_p * V
    peaked = random_logits(1, vocab, seed=9, scale=4.0)
    logits = torch.cat([flat, peaked])
    # Alone, row 0 cuts beyond the 256-token probe (full sort); beside row 2's top_k=1000 its cut lies
    # inside the widened probe. Row 1 needs the full sort either way.
    rows = [make_row(top_p=0.2), make_row(top_p=0.5), make_row(top_p=0.5, top_k=1000)]
    together = filtered_probs(logits, rows)
    kept = (together > 0).sum(dim=-1).tolist()
    assert 256 < kept[0] < 1000 < kept[1]
    for i in range(3):
        alone = filtered_probs(logits[i:i + 1], rows[i:i + 1])[0]
        assert torch.equal(together[i], alone)
        expected = reference_probs(logits[i], rows[i])
        assert torch.equal(together[i] > 0, expected > 0)


def test_racing_among_kept_tokens_picks_the_vocabulary_race_winner() -> None:
    vocab = 4000
    probs = torch.softmax(random_logits(300, vocab, seed=16, scale=2.0), dim=-1)      # [300, V]
    keep = torch.rand(300, vocab, generator=torch.Generator().manual_seed(16)) < 0.01
    keep[:, 0] = True
    probs = probs * keep
    rows = [make_row(seed=i) for i in range(300)]
    narrow = sampler_module._race_among_kept(probs, rows)
    assert torch.equal(narrow, sampler_module._race_over_vocabulary(probs, rows))
    assert len(set(narrow.tolist())) > 200


# 4. Penalties.

def test_penalties_match_a_per_row_reference() -> None:
    vocab = 40
    logits = random_logits(10, vocab, seed=10)
    rng = random.Random(10)
    rows = []
    for i in range(10):
        rows.append(make_row(
            repetition_penalty=[1.0, 1.4, 0.7][i % 3], presence_penalty=[0.0, 0.5, -0.3, 0.0, 0.2][i % 5],
            frequency_penalty=[0.0, 0.25][i % 2],
            prompt_token_ids=[rng.randrange(vocab) for _ in range(12)],
            output_token_ids=[rng.randrange(vocab // 2) for _ in range(15)]))   # repeats: counts > 1
    penalised = apply_penalties(logits, rows)
    expected = torch.stack([reference_penalised(logits[i], r) for i, r in enumerate(rows)]).float()
    assert torch.allclose(penalised, expected, atol=1e-5)
    assert not torch.allclose(penalised[1:], logits[1:])
    assert torch.equal(penalised[0], logits[0])   # row 0 has no penalty


def test_presence_and_frequency_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 6)
    row = make_row(presence_penalty=1.0, frequency_penalty=0.5, prompt_token_ids=[0, 1],
                   output_token_ids=[1, 2, 2, 2])
    assert apply_penalties(logits, [row])[0].tolist() == [0.0, -1.5, -2.5, 0.0, 0.0, 0.0]


# 5. Suppression.

def test_suppressed_ids_never_appear_even_as_the_argmax() -> None:
    logits_row = torch.zeros(20)
    logits_row[7] = 12.0   # nearly all the mass
    logits_row[3] = 11.0
    greedy = make_row(temperature=0.0, suppressed_token_ids=(7,))
    assert sample(logits_row[None], [greedy]) == [3]

    draws = 2000
    batch = logits_row.expand(draws, -1)
    free = sample(batch, [make_row(token_index=i) for i in range(draws)])
    assert Counter(free)[7] > draws * 0.5
    for filters in ({}, {"top_k": 3}, {"min_p": 0.01}):
        rows = [make_row(token_index=i, suppressed_token_ids=(7, 3), **filters) for i in range(draws)]
        assert not {3, 7} & set(sample(batch, rows)), filters


# 6. Logprobs.

def test_logprobs_are_the_raw_log_softmax_best_first() -> None:
    vocab = 50
    logits = random_logits(6, vocab, seed=12)
    counts = [0, 1, 3, 5, 50, 2]
    rows = [make_row(temperature=[0.0, 0.3, 1.0][i % 3], top_k=[0, 4][i % 2], num_logprobs=n, token_index=i)
            for i, n in enumerate(counts)]
    out = SAMPLER(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)                          # [N, V]
    for i, n in enumerate(counts):
        assert out.logprobs[i] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-5)
        ids = [token for token, _ in out.top_logprobs[i]]
        values = [value for _, value in out.top_logprobs[i]]
        assert len(ids) == n
        assert ids == raw[i].topk(n).indices.tolist()
        assert values == pytest.approx(raw[i].topk(n).values.tolist(), abs=1e-5)
        assert values == sorted(values, reverse=True)


def test_the_chosen_logprob_stays_raw_when_penalties_change_the_choice() -> None:
    logits = random_logits(1, 30, seed=13)
    best = int(logits[0].argmax())
    row = make_row(temperature=0.0, repetition_penalty=50.0, presence_penalty=5.0,
                   output_token_ids=[best], num_logprobs=1)
    out = SAMPLER(logits, [row])
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.token_ids[0] != best
    assert out.logprobs[0] == pytest.approx(raw[out.token_ids[0]].item(), abs=1e-5)
    assert out.top_logprobs[0][0][0] == best


# 7. Mixed batches.

def test_a_mixed_batch_gives_each_row_what_it_gets_alone() -> None:
    vocab = 3000
    rng = random.Random(14)
    rows = [make_row(temperature=0.0),
            make_row(temperature=0.0, repetition_penalty=1.3, output_token_ids=[1, 2]), make_row(),
            make_row(temperature=0.5, top_k=10), make_row(top_p=0.6, seed=3),
            make_row(min_p=0.2, stream=2), make_row(top_k=50, top_p=0.9, min_p=0.05),
            make_row(frequency_penalty=0.5, presence_penalty=0.2, output_token_ids=[5, 5, 9]),
            make_row(temperature=0.0, suppressed_token_ids=(0, 1, 2), num_logprobs=4),
            *[random_row(rng, vocab) for _ in range(15)]]
    logits = random_logits(len(rows), vocab, seed=14)
    together = SAMPLER(logits, rows)
    for i, row in enumerate(rows):
        alone = SAMPLER(logits[i:i + 1], [row])
        assert alone.token_ids[0] == together.token_ids[i]
        assert alone.logprobs[0] == together.logprobs[i]
        assert alone.top_logprobs[0] == together.top_logprobs[i]


def test_an_empty_batch_is_fine() -> None:
    out = SAMPLER(torch.zeros(0, 10), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []


# Validation.

def test_rows_must_match_the_logits() -> None:
    with pytest.raises(ValueError, match="2 sampling rows for 3 rows"):
        SAMPLER(torch.zeros(3, 10), [make_row(), make_row()])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        SAMPLER(torch.zeros(10), [make_row()])
    with pytest.raises(ValueError, match="num_logprobs"):
        SAMPLER(torch.zeros(1, 10), [make_row(num_logprobs=11)])
    with pytest.raises(ValueError, match="suppressed_token_ids"):
        SAMPLER(torch.zeros(1, 10), [make_row(suppressed_token_ids=(10,))])
    with pytest.raises(ValueError, match="token ids"):
        SAMPLER(torch.zeros(1, 10), [make_row(repetition_penalty=1.2, prompt_token_ids=[3, 12])])


@pytest.mark.parametrize("fields", [{"temperature": -0.1}, {"temperature": math.nan}, {"top_p": 0.0},
                                    {"top_p": 1.5}, {"top_k": -1}, {"min_p": 1.5},
                                    {"repetition_penalty": 0.0}, {"seed": -1}, {"seed": 2**63},
                                    {"token_index": -1}, {"num_logprobs": -2}])
def test_bad_parameters_are_rejected(fields: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        make_row(**fields)


# 8. Devices.

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_draw_the_same_tokens() -> None:
    vocab = 32000
    rng = random.Random(15)
    rows = [random_row(rng, vocab) for _ in range(64)]
    logits = random_logits(64, vocab, seed=15)
    on_cpu = SAMPLER(logits, rows)
    on_cuda = SAMPLER(logits.cuda(), rows)
    assert on_cuda.token_ids == on_cpu.token_ids
    assert on_cuda.logprobs == pytest.approx(on_cpu.logprobs, abs=1e-4)


def test_vectorised_draw_keys_equal_the_scalar_ones() -> None:
    seeds = [0, 1, 2**63 - 1, 123456789123456789]
    rows = [make_row(seed=seed, stream=stream, token_index=index)
            for seed in seeds for stream in (0, 5, 2**40) for index in (0, 1, 2**62)]
    assert draw_keys(rows).tolist() == [draw_key(r.seed, r.stream, r.token_index) for r in rows]
