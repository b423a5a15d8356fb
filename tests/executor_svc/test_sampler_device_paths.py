"""The sampler's GPU paths, which never ask the device about values (so the host does not wait for the
forward pass), draw exactly what the checking paths draw. Run here on the CPU by switching the paths on,
over ordinary logits and every kind of extreme row the checks exist for."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from executor_svc import sampler as sampler_module  # noqa: E402
from executor_svc.sampler import Sampler, SamplerOutput, SamplingRow  # noqa: E402
from executor_svc.transfer import to_device, to_host  # noqa: E402

SAMPLER = Sampler()
VOCAB = 97


def make_row(index: int, **fields: object) -> SamplingRow:
    """A sampled row with filters and penalties off, its own seed, overridden by `fields`."""
    defaults = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seed=1000 + index, stream=index % 3,
                    token_index=index, prompt_token_ids=(), output_token_ids=())
    return SamplingRow(**{**defaults, **fields})  # type: ignore[arg-type]


def extreme_logits(rows: int, seed: int) -> torch.Tensor:
    """[rows, VOCAB] float32: ordinary rows, then NaN, +inf, all -inf, huge and peaked rows."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4.0
    logits[1, 5] = math.nan
    logits[2, [3, 40]] = math.inf
    logits[3] = -math.inf
    logits[4] *= 1e37
    logits[5, :90] = -math.inf                    # a handful of tokens left
    logits[6] = 0.0
    logits[6, 17] = 300.0                         # everything else underflows to probability 0
    logits[7, ::2] = math.nan
    return logits


def sample_both_ways(logits: torch.Tensor, rows: list[SamplingRow],
                     monkeypatch: pytest.MonkeyPatch) -> tuple[SamplerOutput, SamplerOutput]:
    """The checking paths' output and the device paths' output for the same batch."""
    checked = SAMPLER(logits, rows)
    with monkeypatch.context() as patch:
        patch.setattr(sampler_module, "_without_host_checks", lambda t: True)
        unchecked = SAMPLER(logits, rows)
    return checked, unchecked


def assert_same(a: SamplerOutput, b: SamplerOutput) -> None:
    """Bit-identical tokens and logprobs (NaN never occurs; -inf equals -inf)."""
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs
    assert a.top_logprobs == b.top_logprobs


ROW_SETTINGS = [
    {},
    {"temperature": 1e-38},
    {"temperature": 1e-45},
    {"temperature": 3.4e38},
    {"temperature": 0.0},
    {"top_k": 5},
    {"top_p": 0.6},
    {"min_p": 0.2},
    {"top_k": 3, "top_p": 0.9, "min_p": 0.05},
    {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2},
    {"repetition_penalty": 1e-30},
    {"suppressed_token_ids": (0, 1, 2)},
    {"num_logprobs": 4},
]


@pytest.mark.parametrize("settings", ROW_SETTINGS, ids=lambda s: ",".join(s) or "plain")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_paths_draw_what_the_checking_paths_draw(settings: dict, seed: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    logits = extreme_logits(12, seed)
    history = {"prompt_token_ids": (1, 5, 9), "output_token_ids": (9, 17, 17, 40)}
    rows = [make_row(i, **history, **settings) for i in range(len(logits))]
    assert_same(*sample_both_ways(logits, rows, monkeypatch))


def test_a_batch_mixing_every_setting_draws_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    count = 3 * len(ROW_SETTINGS)
    logits = torch.cat([extreme_logits(12, 7), torch.randn(count - 12, VOCAB) * 2.0])
    rows = [make_row(i, **ROW_SETTINGS[i % len(ROW_SETTINGS)]) for i in range(count)]
    assert_same(*sample_both_ways(logits, rows, monkeypatch))


def test_many_unfiltered_draws_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race decided on the device over many seeds, including peaked rows the narrow race takes."""
    logits = torch.randn(256, VOCAB, generator=torch.Generator().manual_seed(3)) * 8.0
    logits[::4] *= 20.0                            # most of the vocabulary underflows in these rows
    rows = [make_row(i) for i in range(len(logits))]
    assert_same(*sample_both_ways(logits, rows, monkeypatch))


def test_transfers_on_the_cpu_are_plain_tensors() -> None:
    values = to_device([3, 1, 2], torch.int64, "cpu")
    assert values.dtype == torch.int64 and values.tolist() == [3, 1, 2]
    assert to_device(-math.inf, torch.float32, "cpu").item() == -math.inf
    a, b = to_host(values, values.float())
    assert a is values and b.tolist() == [3.0, 1.0, 2.0]


@pytest.mark.gpu
def test_transfers_to_and_from_a_gpu_round_trip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on_gpu = to_device([5, 6, 7], torch.int64, "cuda")
    assert on_gpu.is_cuda
    (back,) = to_host(on_gpu * 2)
    assert back.device.type == "cpu" and back.tolist() == [10, 12, 14]


@pytest.mark.gpu
@pytest.mark.parametrize("settings", ROW_SETTINGS, ids=lambda s: ",".join(s) or "plain")
def test_a_gpu_draws_what_the_cpu_draws_on_extreme_rows(settings: dict) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = extreme_logits(12, 5)
    rows = [make_row(i, **settings) for i in range(len(logits))]
    on_cpu, on_gpu = SAMPLER(logits, rows), SAMPLER(logits.cuda(), rows)
    assert on_gpu.token_ids == on_cpu.token_ids
    # Row 4's logits are near 1e38: a last-bit difference of the devices' logsumexp is huge there.
    ordinary = [i for i in range(len(rows)) if i != 4]
    assert [on_gpu.logprobs[i] for i in ordinary] == pytest.approx([on_cpu.logprobs[i] for i in ordinary],
                                                                   abs=1e-4)
