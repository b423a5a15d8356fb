"""Invariant 7 on a CUDA device: greedy output through our kernels equals HF transformers on the same device.

Every family gets a tiny model whose head size our attention kernel instantiates (64, and 128 for the
Mistral-style one), saved as a real checkpoint. The model backend loads it on CUDA with
PAGEDSERVE_CUDA_KERNELS=1 and the real scheduler drives it: one step prefills every prompt, then each
step decodes all of them. The prompts run from 1 to 600 tokens (shorter than a block, exactly one
block of 8, longer than one block, and past a 512-token split-K partition), and their 24 new tokens
cross block boundaries at every block size. The KV pool is filled with NaN before serving, so a read
of a slot that no token wrote shows up instead of passing as a plausible stale value. No run
preempts: the pool is far larger than the requests need.

Each run also returns the top-5 logprobs of every step, which are compared with HF's log-softmax after
the same prefix: a far finer check than the argmax alone, since in these tiny models the two best
logits are often only a few tenths apart.

- float32: token for token equal to HF `generate` on CUDA in float32, logprobs within 1e-3.
- float16 and bfloat16: in half precision two correct implementations round differently (our fused
  projections, the kernel's summation order, float32 softmax), and where HF's two best logits are
  closer than that difference either token is right; the outputs then legitimately part ways and HF
  `generate` cannot be compared token for token after that point (on the CPU, with the torch
  reference attention, our bfloat16 outputs part ways with HF's bfloat16 `generate` on up to 3 of
  these 7 prompts, every token passing the check below). So HF in the same dtype on the same
  device scores our whole output in one pass (teacher forcing): every token we chose must be HF's
  argmax up to a near tie, and our logprobs must match HF's within LOGPROB_TOLERANCE.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import LLAMA3_ROPE, SPECIAL_IDS, VOCAB, build_hf_model  # noqa: E402

from executor_svc import ops  # noqa: E402
from executor_svc.attention import FLASH_PREFILL_MIN_QUERY_LEN  # noqa: E402
from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.model_backend import ModelBackend  # noqa: E402
from pagedserve.contract.plan import StepPlan, StepResult  # noqa: E402
from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.outputs import RequestOutput, TokenLogprobs  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
MAX_POSITIONS = 1024
MAX_NEW = 24
# 8 fills one block of size 8 exactly; 600 + 24 tokens pass a 512-token split-K partition.
PROMPT_LENGTHS = (1, 5, 8, 17, 40, 130, 600)
NUM_LOGPROBS = 5
MAX_NUM_SEQS = 16
MAX_BATCHED_TOKENS = MAX_POSITIONS            # >= the longest prompt, and every prompt fits in one step
# The scheduler uses this many blocks of the (much larger) pool the backend allocates.
POOL_BLOCKS = 512
# The backend sizes its pool from a fraction of the device's memory; a small one keeps it quick to
# allocate and to fill with NaN on any GPU, and still far larger than these requests need.
GPU_MEMORY_UTILIZATION = 0.1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest |our logprob - HF's| allowed for each of our top-NUM_LOGPROBS tokens, per dtype: about three
# times the largest difference these models show on the CPU with the torch reference attention
# (float32 4e-6, float16 0.0055, bfloat16 0.046). Integration bugs move them much further: a decode
# that misses the newest token when it starts a block moved logprobs by 0.37 to 1.3 on five of the
# seven prompts, and a wrong GQA head mapping by 3 to 7.
LOGPROB_TOLERANCE = {"float32": 1e-3, "float16": 0.02, "bfloat16": 0.15}

FAMILIES = ("llama", "llama_gqa_llama3", "mistral", "opt_pre_ln", "opt_post_ln_proj", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


def gpu_tiny_config(family: str) -> transformers.PretrainedConfig:
    """A tiny config of `family` with a head size our kernel instantiates, and 1024 positions."""
    config = _gpu_family_config(family)
    config.architectures = [ARCHITECTURES[config.model_type]]
    return config


def _gpu_family_config(family: str) -> transformers.PretrainedConfig:
    """The tiny GPU config of `family`, without `architectures`."""
    llama = {"vocab_size": VOCAB, "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, **SPECIAL_IDS}
    opt = {"vocab_size": VOCAB, "hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 2,
           "num_attention_heads": 2, "max_position_embeddings": MAX_POSITIONS, **SPECIAL_IDS}
    if family == "llama":         # MHA, head size 64, biases everywhere
        return transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True, **llama)
    if family == "llama_gqa_llama3":
        # GQA (2 query heads per KV head), head size 64: its rotary frequencies fall in all three
        # bands of llama3 scaling with this short original context.
        return transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        rope_parameters=dict(LLAMA3_ROPE), **llama)
    if family == "mistral":
        # Head size 128 with 4 heads: the attention width (512) differs from the hidden size (128).
        return transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                          sliding_window=None, **llama)
    if family == "opt_pre_ln":
        return transformers.OPTConfig(do_layer_norm_before=True, word_embed_proj_dim=128, **opt)
    if family == "opt_post_ln_proj":
        # Like opt-350m: post-LN, and embeddings narrower than the hidden size.
        return transformers.OPTConfig(do_layer_norm_before=False, word_embed_proj_dim=64, **opt)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2,
                                       n_positions=MAX_POSITIONS, **SPECIAL_IDS)
    raise ValueError(f"unknown tiny GPU family {family!r}")


def prompts() -> list[list[int]]:
    """One prompt per length of PROMPT_LENGTHS, of ordinary (non-special) token ids."""
    return [[3 + (7 * i + 5 * j) % (VOCAB - 3) for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    """Build the extension once for the module; a failed build fails every test here."""
    assert ops.kernels_available(), "the CUDA kernels did not build (see the log)"


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny model of one family saved in HF format (float32): its family and directory."""
    path = tmp_path_factory.mktemp(request.param)
    build_hf_model(gpu_tiny_config(request.param), seed=0).save_pretrained(path)
    return request.param, path


class KernelCalls:
    """Calls into the compiled extension, by function name.

    Counting at the extension rather than at the Python wrappers of `ops` keeps the count independent
    of which wrapper attention uses: every one of them reaches the extension through `ops._kernels()`.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def attention(self) -> int:
        """Calls of an attention kernel (decode, or prefill and decode alike)."""
        return sum(n for name, n in self.counts.items() if name.startswith("paged_attention"))

    @property
    def cache_writes(self) -> int:
        """Calls of the fused K/V write."""
        return self.counts["reshape_and_cache"]

    def wrap(self, module: ModuleType) -> _CountingModule:
        """`module` with every function call counted here."""
        return _CountingModule(module, self.counts)


class _CountingModule:
    """A stand-in for the extension module that counts each call by the function's name."""

    def __init__(self, module: ModuleType, counts: Counter[str]) -> None:
        self._module = module
        self._counts = counts

    def __getattr__(self, name: str) -> Callable[..., Any]:
        function = getattr(self._module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counts[name] += 1
            return function(*args, **kwargs)

        return counted


@pytest.fixture
def kernel_calls(monkeypatch) -> KernelCalls:
    """Turn the kernels on and count the calls attention makes into them."""
    calls = KernelCalls()
    real_kernels = ops._kernels
    monkeypatch.setattr(ops, "_kernels", lambda: calls.wrap(real_kernels()))
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "1")
    return calls


@pytest.fixture
def backend_factory() -> Iterator[Callable[..., ModelBackend]]:
    """Model backends on CUDA, released after the test so that the next one profiles an empty device."""
    backends: list[ModelBackend] = []

    def make(path: Path, dtype: str, cuda_graphs: bool = False) -> ModelBackend:
        backend = ModelBackend(ExecutorConfig(model=str(path), device=DEVICE, dtype=dtype,
                                              cuda_graphs=cuda_graphs))
        backends.append(backend)
        return backend

    yield make
    backends.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Serving through the backend


@dataclass
class Output:
    """One request's new tokens and, for each, (its logprob, the top-NUM_LOGPROBS (token, logprob))."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False


@dataclass
class Run:
    """What one greedy run produced, and how it went."""

    outputs: list[Output]           # in the order of prompts()
    steps: int                      # steps with a forward pass
    decode_steps: int               # ... in which every sequence computed one token
    peak_blocks: int                # most GPU blocks in use during a step
    num_layers: int


def fold(reports: list[RequestOutput], into: dict[str, Output]) -> None:
    """Add streamed reports to their requests' outputs (a failed request fails the test)."""
    for report in reports:
        assert report.error is None, f"{report.request_id}: {report.error}"
        output = into.setdefault(report.request_id, Output())
        assert not output.finished, f"{report.request_id}: report after its terminal report"
        for chunk in report.outputs:
            output.token_ids.extend(chunk.token_ids)
            output.logprobs.extend(chunk.logprobs)
        output.finished = report.finished


def serve_greedy(backend: ModelBackend, block_size: int, calls: KernelCalls, plan_ahead: bool = False) -> Run:
    """Every prompt through the real scheduler and `backend`, greedy, MAX_NEW tokens each.

    `calls` is cleared once the cache is set up, so it counts the serving steps only (the profiling
    forward pass of init_cache runs the kernels too). With `plan_ahead` the steps are planned as the
    engine's async scheduling plans them: the next plan is made and run before the last one's result
    is processed, and the executor feeds its own samples back.
    """
    cache = backend.init_cache(block_size, GPU_MEMORY_UTILIZATION, 0, MAX_BATCHED_TOKENS + MAX_NUM_SEQS)
    calls.counts.clear()
    assert cache.num_gpu_blocks >= POOL_BLOCKS
    assert backend.runner is not None
    backend.runner.kv_cache.gpu.fill_(float("nan"))
    described = backend.describe()
    config = SchedulerConfig(block_size=block_size, max_num_seqs=MAX_NUM_SEQS,
                             max_num_batched_tokens=MAX_BATCHED_TOKENS, watermark=0.0)
    scheduler = Scheduler(config, POOL_BLOCKS, 0, described.max_model_len,
                          eos_token_ids=described.eos_token_ids, vocab_size=described.vocab_size, seed=0)
    for i, prompt in enumerate(prompts()):
        scheduler.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                              ignore_eos=True, logprobs=NUM_LOGPROBS))
    done: dict[str, Output] = {}
    steps = decode_steps = peak = 0
    results: deque[StepResult] = deque()

    def run(plan: StepPlan) -> None:
        nonlocal steps, decode_steps, peak
        if plan.sequences:
            steps += 1
            decode_steps += all(work.num_tokens == 1 for work in plan.sequences)
        peak = max(peak, scheduler.stats().gpu_blocks_used)    # before finished requests free theirs
        results.append(backend.execute(plan))

    while scheduler.has_unfinished or scheduler.num_steps_in_flight:
        if not scheduler.num_steps_in_flight:
            plan = scheduler.schedule()
            fold(scheduler.pop_outputs(), done)
            if plan.is_empty:
                continue
            run(plan)
        ahead = scheduler.schedule_ahead() if plan_ahead else None
        if ahead is not None:
            run(ahead)
        fold(scheduler.process_result(results.popleft()), done)
    stats = scheduler.stats()
    assert stats.num_preemptions_swap == stats.num_preemptions_recompute == 0
    return Run(outputs=[done[f"r{i}"] for i in range(len(PROMPT_LENGTHS))], steps=steps,
               decode_steps=decode_steps, peak_blocks=peak, num_layers=described.num_layers)


def check_run_shape(run: Run, calls: KernelCalls, block_size: int, attention_kernel: bool,
                    graphs: bool = False) -> None:
    """One prefill step, then MAX_NEW - 1 steps decoding the whole batch; every step's K/V written by our
    kernel, and with `attention_kernel` every step's attention (prefill and decode) computed by it too.

    With `graphs` the decode steps replay CUDA graphs, whose kernel launches bypass the Python-level
    count: only the prefill step is counted then.
    """
    assert run.steps == MAX_NEW and run.decode_steps == MAX_NEW - 1, (run.steps, run.decode_steps)
    assert all(o.finished and len(o.token_ids) == len(o.logprobs) == MAX_NEW for o in run.outputs)
    # Blocks for every token but the last of each sequence (its K/V is never computed).
    assert run.peak_blocks == sum(-(-(n + MAX_NEW - 1) // block_size) for n in PROMPT_LENGTHS)
    counted_decode_steps = 0 if graphs else run.decode_steps
    prefill_steps = run.steps - run.decode_steps
    assert calls.cache_writes == run.num_layers * (prefill_steps + counted_decode_steps), calls.counts
    if attention_kernel:
        # Prompts this long go through the gather + FA2 path instead; the rest of their step (when any
        # prompt is shorter) through our kernel, one call per layer.
        prefill_on_ours = min(PROMPT_LENGTHS) < FLASH_PREFILL_MIN_QUERY_LEN
        expected = run.num_layers * (counted_decode_steps + prefill_steps * prefill_on_ours)
        assert calls.attention == expected, f"steps did not all run our attention kernel: {calls.counts}"


# ---------------------------------------------------------------------------------------------------------
# The HF reference, on the same device


def hf_on_device(path: Path, dtype: str) -> transformers.PreTrainedModel:
    """HF's model of the checkpoint at `path`, loaded in `dtype` as HF loads it, on DEVICE.

    Loaded rather than cast from a float32 instance: casting would round the rotary frequencies to the
    dtype too, which HF's loading (and our model) keeps in float32.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                              attn_implementation="eager")
    return model.to(DEVICE).eval()


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int]) -> list[int]:
    """HF greedy decoding that, like ignore_eos, runs past EOS without forbidding it."""
    model.generation_config.eos_token_id = None      # otherwise generate merges the model's EOS back in
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert out.shape[1] == len(prompt) + MAX_NEW
    return out[0, len(prompt):].tolist()


def hf_logprobs(model: transformers.PreTrainedModel, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF's log-softmax before each token of `output`, after the prompt and the output before it.

    returns [len(output), vocab] float32 on the CPU
    """
    ids = torch.tensor([prompt + output[:-1]], device=DEVICE)
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:]
    return logits.float().log_softmax(-1).cpu()


def check_against_hf(reference: torch.Tensor, output: Output, tolerance: float, label: str) -> None:
    """Each of our tokens is our own argmax and HF's up to a near tie, and our top logprobs are HF's.

    reference: hf_logprobs of this output. A token passes when HF scores it within 2 x `tolerance` of
    HF's best: the most two logprobs each off by `tolerance` can reorder.
    """
    for j, (token, (logprob, top)) in enumerate(zip(output.token_ids, output.logprobs, strict=True)):
        where = f"{label} token {j}"
        # Compared by value: bfloat16 logits can tie exactly, and then the token order may differ.
        assert logprob == top[0][1], f"{where}: greedy did not take the argmax"
        ours = dict(top)
        hf_best = int(reference[j].argmax())
        for candidate, value in ours.items():
            expected = float(reference[j, candidate])
            assert abs(value - expected) <= tolerance, (
                f"{where}: logprob of {candidate} is {value:.5f}, HF's {expected:.5f}")
        shortfall = float(reference[j, hf_best] - reference[j, token])
        assert shortfall <= 2 * tolerance, (
            f"{where}: chose {token}, {shortfall:.4f} below HF's best {hf_best} in HF's logprobs")


# ---------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("block_size", (8, 16, 32))
def test_float32_greedy_equals_hf_generate_on_cuda(checkpoint, block_size: int, kernel_calls,
                                                   backend_factory) -> None:
    family, path = checkpoint
    run = serve_greedy(backend_factory(path, "float32"), block_size, kernel_calls)
    # float32 attention may take the torch reference (the kernels are built for half precision); the
    # K/V writes still go through ours.
    check_run_shape(run, kernel_calls, block_size, attention_kernel=False)
    hf = hf_on_device(path, "float32")
    for i, prompt in enumerate(prompts()):
        label = f"{family} float32 block {block_size} prompt {i}"
        assert run.outputs[i].token_ids == hf_greedy(hf, prompt), label
        reference = hf_logprobs(hf, prompt, run.outputs[i].token_ids)
        check_against_hf(reference, run.outputs[i], LOGPROB_TOLERANCE["float32"], label)


@pytest.mark.parametrize("serving", ("eager", "graphs-ahead"))
@pytest.mark.parametrize("block_size", (8, 16))
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_half_precision_greedy_follows_hf_on_cuda(checkpoint, dtype: str, block_size: int, serving: str,
                                                  kernel_calls, backend_factory) -> None:
    """Eager steps planned one at a time, and the serving default: CUDA graphs with steps planned ahead."""
    family, path = checkpoint
    production = serving == "graphs-ahead"
    run = serve_greedy(backend_factory(path, dtype, cuda_graphs=production), block_size, kernel_calls,
                       plan_ahead=production)
    check_run_shape(run, kernel_calls, block_size, attention_kernel=True, graphs=production)
    hf = hf_on_device(path, dtype)
    for i, prompt in enumerate(prompts()):
        reference = hf_logprobs(hf, prompt, run.outputs[i].token_ids)
        check_against_hf(reference, run.outputs[i], LOGPROB_TOLERANCE[dtype],
                         f"{family} {dtype} block {block_size} prompt {i}")
