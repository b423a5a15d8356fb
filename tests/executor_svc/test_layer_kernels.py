"""The fused layer kernels (csrc/layer_kernels.cu) against the torch reference layers, on a CUDA device.

The kernels round every fp16/bf16 intermediate where the reference does, so results must match the
reference exactly except for the last bit of a few elements (float reductions and exp/rsqrt may round
differently). Each test checks both: a 1-ulp tolerance everywhere, and exact equality almost everywhere.
Strided rows (views into a wider tensor, as the model passes them) and sizes that are not a multiple
of 8 (the unvectorised path) are covered.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from executor_svc import ops  # noqa: E402
from executor_svc.models.layers import RMSNorm, RotaryEmbedding, default_inv_freq, silu_and_mul  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
DTYPES = (torch.float16, torch.bfloat16)
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}     # relative spacing of the dtype
EXACT_FRACTION = 0.99


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    """Build the extension once for the module; a failed build fails every test here."""
    assert ops.kernels_available(), "the CUDA kernels did not build (see the log)"


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    """A context in which the layers run their torch reference instead of the kernels."""
    class Reference:
        def __enter__(self) -> None:
            monkeypatch.setenv("PAGEDSERVE_FUSED_LAYERS", "0")

        def __exit__(self, *exc: object) -> None:
            monkeypatch.delenv("PAGEDSERVE_FUSED_LAYERS")
    return Reference()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within one unit in the last place everywhere, and bit-equal in nearly every element."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ULP[expected.dtype], atol=1e-3)
    if expected.numel():
        exact = (actual == expected).float().mean().item()
        assert exact >= EXACT_FRACTION, f"only {exact:.4f} of the elements equal the reference"


def strided_rows(rows: int, width: int, dtype: torch.dtype, extra: int = 24) -> torch.Tensor:
    """[rows, width] as a view into a wider buffer (row stride width + extra), like a split of qkv."""
    return torch.randn(rows, width + extra, device=DEVICE).to(dtype)[:, :width]


def make_norm(hidden: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5).to(DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 5120, 8, 100])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, strided: bool, reference) -> None:
    torch.manual_seed(hidden)
    norm = make_norm(hidden, dtype)
    x = strided_rows(37, hidden, dtype) if strided else torch.randn(37, hidden, device=DEVICE).to(dtype)
    with reference:
        expected = norm(x)
    assert_matches(norm(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 100])
def test_fused_add_rms_norm(dtype: torch.dtype, hidden: int, reference) -> None:
    torch.manual_seed(hidden + 1)
    norm = make_norm(hidden, dtype)
    x = strided_rows(64, hidden, dtype)
    residual = (3 * torch.randn(64, hidden, device=DEVICE)).to(dtype)
    with reference:
        expected, expected_sum = norm.add_and_norm(x, residual.clone())
    given = residual.clone()
    out, new_residual = norm.add_and_norm(x, given)
    assert new_residual.data_ptr() == given.data_ptr()             # the sum lands in place
    assert torch.equal(new_residual, expected_sum)                 # one rounded add: bit-exact
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [11008, 6912, 100])
@pytest.mark.parametrize("strided", [False, True])
def test_silu_and_mul(dtype: torch.dtype, intermediate: int, strided: bool, reference) -> None:
    torch.manual_seed(intermediate)
    rows = 45
    x = (strided_rows(rows, 2 * intermediate, dtype, extra=8) if strided
         else torch.randn(rows, 2 * intermediate, device=DEVICE).to(dtype)) * 4
    with reference:
        expected = silu_and_mul(x)
    assert_matches(silu_and_mul(x), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_size", "rotary_dim"),
                         [(32, 32, 128, 128), (32, 8, 128, 128), (8, 2, 64, 32), (12, 4, 80, 80)])
def test_rotary_embedding_in_place(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int,
                                   rotary_dim: int, reference) -> None:
    torch.manual_seed(num_heads * head_size + rotary_dim)
    max_position = 4096
    rotary = RotaryEmbedding(head_size, rotary_dim, max_position,
                             default_inv_freq(rotary_dim, 10000.0)).to(DEVICE)
    tokens = 53
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device=DEVICE).to(dtype)     # [T, q + k + v]
    positions = torch.randint(0, max_position, (tokens,), device=DEVICE)
    positions[:3] = torch.tensor([0, 1, max_position - 1])

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = t.split([q_size, kv_size, kv_size], dim=-1)
        return q.unflatten(-1, (num_heads, head_size)), k.unflatten(-1, (num_kv_heads, head_size))

    with reference:
        expected_q, expected_k = rotary(positions, *split(qkv.clone()))
    fused = qkv.clone()
    q, k = rotary(positions, *split(fused))
    assert q.data_ptr() == fused.data_ptr()                        # rotated in place
    assert_matches(q, expected_q)
    assert_matches(k, expected_k)
    assert torch.equal(fused[:, q_size + kv_size:], qkv[:, q_size + kv_size:])   # v untouched


def test_empty_batches_launch_nothing() -> None:
    norm = make_norm(64, torch.bfloat16)
    x = torch.empty(0, 64, device=DEVICE, dtype=torch.bfloat16)
    assert norm(x).shape == (0, 64)
    assert silu_and_mul(torch.empty(0, 128, device=DEVICE, dtype=torch.bfloat16)).shape == (0, 64)


def half(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).half()


def positions(dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(4, dtype=dtype, device=DEVICE)


COS_SIN = (16, 64)      # a rotary table of 16 positions, rotary_dim 64 (allocated per case)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ops.rms_norm(torch.randn(4, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6),
     "rms_norm: input has unsupported dtype Float"),
    (lambda: ops.rms_norm(half(4, 64), half(32), 1e-6), "rms_norm: weight must be a contiguous [64] tensor"),
    (lambda: ops.fused_add_rms_norm(half(4, 64), half(4, 32), half(64), 1e-6),
     "fused_add_rms_norm: residual must be a contiguous [4, 64] tensor"),
    (lambda: ops.silu_and_mul(half(4, 63)), "silu_and_mul: input must be [N, 2 * I]"),
    (lambda: ops.rotary_embedding(positions(torch.int32), half(4, 2, 64), half(4, 2, 64),
                                  torch.ones(COS_SIN, device=DEVICE), 64),
     "rotary_embedding: positions must be a contiguous int64"),
    (lambda: ops.rotary_embedding(positions(torch.int64), half(4, 2, 64), half(4, 2, 64),
                                  torch.ones(COS_SIN, device=DEVICE), 65),
     "rotary_embedding: rotary_dim 65 must be even"),
])
def test_bad_arguments_raise_naming_the_field(call, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("*", r"\*")):
        call()
