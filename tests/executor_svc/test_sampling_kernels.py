"""The sampler's race-noise kernel (csrc/sampling_kernels.cu) against its torch reference, on a CUDA device:
bit for bit, for keys over the whole 64-bit range, shared and per-row ids, every vocabulary id up to a
large vocabulary and ids near 2**31; and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from executor_svc import ops  # noqa: E402
from executor_svc.sampler import _MASK32_U64, draw_key, uniform_noise, uniform_noise_reference  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"


def halves(keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each uint64 key's low and high 32 bits as int64 device tensors [R]."""
    lo = torch.from_numpy((keys & _MASK32_U64).astype(np.int64)).to(DEVICE)
    hi = torch.from_numpy((keys >> np.uint64(32)).astype(np.int64)).to(DEVICE)
    return lo, hi


def random_keys(rows: int, seed: int) -> np.ndarray:
    """Keys over the whole uint64 range, with the extremes included."""
    keys = np.random.default_rng(seed).integers(0, 2**64, size=rows, dtype=np.uint64)
    extremes = np.array([0, 2**64 - 1, 2**32 - 1], dtype=np.uint64)[:rows]
    keys[:len(extremes)] = extremes
    return keys


@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (7, 1000), (400, 32000), (33, 152064)])
def test_shared_ids_match_the_reference_bit_for_bit(rows: int, vocab: int) -> None:
    lo, hi = halves(random_keys(rows, seed=rows))
    ids = torch.arange(vocab, dtype=torch.int64, device=DEVICE)[None, :]                   # [1, V]
    assert torch.equal(ops.race_uniform_noise(ids, lo, hi), uniform_noise_reference(lo, hi, ids))


def test_per_row_ids_match_the_reference_bit_for_bit() -> None:
    rows, width = 64, 300
    lo, hi = halves(random_keys(rows, seed=5))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**31, (rows, width), generator=generator).to(DEVICE)            # [R, K]
    ids[0, :4] = torch.tensor([0, 1, 2**31 - 1, 2**31 - 2])
    assert torch.equal(ops.race_uniform_noise(ids, lo, hi), uniform_noise_reference(lo, hi, ids))
    # A non-contiguous view of the ids (every other column) gives the noise of those ids.
    strided = ids[:, ::2]
    assert torch.equal(ops.race_uniform_noise(strided, lo, hi), uniform_noise_reference(lo, hi, strided))


def test_the_sampler_takes_the_kernel_on_a_gpu_and_draws_what_the_cpu_draws() -> None:
    keys = [draw_key(seed, stream, index) for seed, stream, index in [(0, 0, 0), (7, 2, 19), (2**63, 1, 5)]]
    ids = torch.arange(4096, dtype=torch.int64)[None, :]
    on_cpu = uniform_noise(keys, ids)
    on_gpu = uniform_noise(keys, ids.to(DEVICE))
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert bool(((on_cpu > 0) & (on_cpu < 1)).all())


def test_bad_arguments_raise_naming_the_argument() -> None:
    lo, hi = halves(random_keys(4, seed=1))
    ids = torch.arange(10, dtype=torch.int64, device=DEVICE)[None, :]
    with pytest.raises(ValueError, match="ids must be an int64"):
        ops.race_uniform_noise(ids.int(), lo, hi)
    with pytest.raises(ValueError, match="key_hi must be a contiguous int64"):
        ops.race_uniform_noise(ids, lo, hi[:3])
    with pytest.raises(ValueError, match="ids must be a CUDA tensor"):
        ops.race_uniform_noise(ids.cpu(), lo, hi)
