"""Invariant 7 on CPU: greedy output through a real executor process equals HF transformers' greedy output.

For each model family a tiny model is saved with `save_pretrained`, served by `pagedserve-executor`,
and driven by the real scheduler over the Execute stream: once with room to spare, then with a KV
pool so small that groups are preempted by swapping and by recomputation, with parallel samples
forking and copying blocks on write mid-generation. Every output must equal HF `generate`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, build_hf_model, tiny_config  # noqa: E402

from pagedserve.contract.plan import SequenceStart, SequenceWork, StepPlan  # noqa: E402
from pagedserve.contract.plan_codec import ExecutorStepError  # noqa: E402
from scheduler_svc.config import PreemptionPolicy, SchedulerConfig  # noqa: E402
from scheduler_svc.executor_client import ExecutorClient  # noqa: E402
from scheduler_svc.outputs import collect  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

BLOCK_SIZE = 4
MAX_NEW = 12
PROMPT_LENGTHS = (1, 3, 4, 7, 16, 21)


@pytest.fixture(scope="module", params=["llama_gqa_llama3", "opt_pre_ln", "gpt2"])
def tiny_model(request, tmp_path_factory):
    """A tiny model of one family saved in HF format, with its HF instance for reference."""
    model = build_hf_model(tiny_config(request.param), seed=0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def prompts() -> list[list[int]]:
    return [[3 + (7 * i + 5 * j) % (VOCAB - 3) for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """HF greedy decoding that, like ignore_eos, runs past EOS without forbidding it."""
    model.generation_config.eos_token_id = None      # otherwise generate merges the model's EOS back in
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    assert out.shape[1] == len(prompt) + MAX_NEW
    return out[0, len(prompt):].tolist()


def serve(client: ExecutorClient, num_gpu_blocks: int, num_cpu_blocks: int, policy: PreemptionPolicy):
    """Run every prompt to completion, two with n=2 (their 3- and 7-token prompts end mid-block, so
    the forks copy on write); returns outputs, the scheduler and how many blocks were copied."""
    described = client.describe()
    config = SchedulerConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=128,
                             preemption_mode=policy, watermark=0.0)
    scheduler = Scheduler(config, num_gpu_blocks, num_cpu_blocks, described.max_model_len,
                          eos_token_ids=described.eos_token_ids, vocab_size=described.vocab_size, seed=0)
    for i, prompt in enumerate(prompts()):
        scheduler.add_request(f"r{i}", prompt, SamplingParams(n=2 if i in (1, 3) else 1, temperature=0.0,
                                                              max_tokens=MAX_NEW, ignore_eos=True))
    done, copied = {}, 0
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        outputs = scheduler.pop_outputs()
        if not plan.is_empty:
            copied += len(plan.copy)
            outputs += scheduler.process_result(client.step(plan))
        collect(outputs, done)
        scheduler.check_integrity()
    return done, scheduler, copied


def test_greedy_output_equals_hf_through_the_execute_stream(tiny_model, start_executor):
    family, path, hf_model = tiny_model
    executor = start_executor("--model", str(path), "--device", "cpu", "--dtype", "float32",
                              "--cpu-kv-cache-bytes", str(1 << 22))
    expected = [hf_greedy(hf_model, p) for p in prompts()]
    check_malformed_plans_are_refused(executor.address)
    runs = [(256, 0, PreemptionPolicy.AUTO), (12, 64, PreemptionPolicy.SWAP),
            (12, 0, PreemptionPolicy.RECOMPUTE)]
    for num_gpu_blocks, num_cpu_blocks, policy in runs:
        client = ExecutorClient(executor.address)
        client.wait_ready(30)
        cache = client.init_cache(BLOCK_SIZE, 0.9, 64 * BLOCK_SIZE * 2 * 64 * 4 * 2)
        assert cache.num_gpu_blocks >= num_gpu_blocks and cache.num_cpu_blocks >= num_cpu_blocks
        done, scheduler, copied = serve(client, num_gpu_blocks, num_cpu_blocks, policy)
        assert copied > 0
        client.close()
        for i, want in enumerate(expected):
            got = done[f"r{i}"]
            assert got.error is None, got.error
            for index, tokens in got.token_ids.items():
                assert tokens == want, f"{family} {policy.value} r{i}[{index}]"
        stats = scheduler.stats()
        if policy is PreemptionPolicy.SWAP:
            assert stats.num_preemptions_swap > 0
        if policy is PreemptionPolicy.RECOMPUTE:
            assert stats.num_preemptions_recompute > 0


def check_malformed_plans_are_refused(address: str) -> None:
    """A bad plan fails its step with a message; the next plan on the same stream runs."""
    client = ExecutorClient(address)
    client.wait_ready(30)
    cache = client.init_cache(BLOCK_SIZE, 0.9, 0)
    start = SequenceStart("r", num_prompt_tokens=3, seed=0, sample_index=0, temperature=0.0)
    bad_block = SequenceWork(1, [5, 6, 7], 0, 0, [cache.num_gpu_blocks], 1, 0, start)
    with pytest.raises(ExecutorStepError, match="block id out of range"):
        client.step(StepPlan(1, sequences=[bad_block]))
    with pytest.raises(ExecutorStepError, match="unknown sequence 9"):
        client.step(StepPlan(2, sequences=[SequenceWork(9, [5], 3, 0, [], 1, 0)]))
    good = SequenceWork(1, [5, 6, 7], 0, 0, [0], 1, 2, start)
    (result,) = client.step(StepPlan(3, sequences=[good])).sequences
    assert len(result.samples) == 1 and len(result.samples[0].top_logprobs) == 2
    client.close()


def test_sampled_outputs_survive_preemption_unchanged(tiny_model):
    """Invariant 5 with a real model: random sampling gives the same tokens under swap and recompute."""
    from executor_svc.config import ExecutorConfig
    from executor_svc.model_backend import ModelBackend

    _, path, _ = tiny_model
    backend = ModelBackend(ExecutorConfig(model=str(path), device="cpu", dtype="float32",
                                          cpu_kv_cache_bytes=1 << 22))
    cache = backend.init_cache(BLOCK_SIZE, 0.9, 1 << 20)
    assert cache.num_gpu_blocks >= 256 and cache.num_cpu_blocks >= 64
    outputs = {}
    for num_gpu_blocks, num_cpu_blocks, policy in [(256, 0, PreemptionPolicy.AUTO),
                                                   (12, 64, PreemptionPolicy.SWAP),
                                                   (12, 0, PreemptionPolicy.RECOMPUTE)]:
        backend.reset_sequences()
        config = SchedulerConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=128,
                                 preemption_mode=policy, watermark=0.0)
        scheduler = Scheduler(config, num_gpu_blocks, num_cpu_blocks, 128, seed=0)
        for i, prompt in enumerate(prompts()):
            scheduler.add_request(f"r{i}", prompt, SamplingParams(
                n=2 if i in (1, 3) else 1, temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=MAX_NEW,
                ignore_eos=True))
        done = {}
        while scheduler.has_unfinished:
            plan = scheduler.schedule()
            collect(scheduler.pop_outputs(), done)
            if not plan.is_empty:
                collect(scheduler.process_result(backend.execute(plan)), done)
        assert all(d.error is None for d in done.values())
        stats = scheduler.stats()
        assert policy is PreemptionPolicy.AUTO or stats.num_preemptions_swap + stats.num_preemptions_recompute
        outputs[policy] = {k: v.token_ids for k, v in done.items()}
    assert outputs[PreemptionPolicy.SWAP] == outputs[PreemptionPolicy.AUTO]
    assert outputs[PreemptionPolicy.RECOMPUTE] == outputs[PreemptionPolicy.AUTO]
    first = outputs[PreemptionPolicy.AUTO]["r1"]
    assert first[0] != first[1]                       # the two samples of a request differ


def test_prefix_caching_changes_no_output(tiny_model):
    """Prompts that share prefixes, served with their full blocks cached and shared across requests,
    give the same tokens as without caching: greedy, seeded sampling and penalties (which read the
    cached tokens as history), arriving together and one after another."""
    from executor_svc.config import ExecutorConfig
    from executor_svc.model_backend import ModelBackend

    _, path, _ = tiny_model
    backend = ModelBackend(ExecutorConfig(model=str(path), device="cpu", dtype="float32",
                                          cpu_kv_cache_bytes=1 << 22))
    backend.init_cache(BLOCK_SIZE, 0.9, 0)
    shared = [3 + (11 * j) % (VOCAB - 3) for j in range(13)]          # three full blocks and one token
    requests = [([*shared, 5, 6], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)),
                ([*shared, 7], SamplingParams(temperature=0.9, seed=4, max_tokens=MAX_NEW, ignore_eos=True)),
                (shared[:12], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)),
                ([*shared, 8, 9, 10], SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.3,
                                                     frequency_penalty=0.4, n=2, max_tokens=MAX_NEW,
                                                     ignore_eos=True))]
    outputs, cached_tokens = {}, {}
    for caching in (False, True):
        backend.reset_sequences()
        config = SchedulerConfig(block_size=BLOCK_SIZE, max_num_seqs=8, max_num_batched_tokens=128,
                                 watermark=0.0, enable_prefix_caching=caching)
        scheduler = Scheduler(config, 256, 0, 128, seed=0)
        done, step = {}, 0
        while step == 0 or scheduler.has_unfinished:
            if step in (0, 2):          # the first request alone, the rest two steps later
                for i, (prompt, params) in enumerate(requests[:1] if step == 0 else requests[1:]):
                    scheduler.add_request(f"r{i + (step > 0)}", prompt, params)
            plan = scheduler.schedule()
            collect(scheduler.pop_outputs(), done)
            if not plan.is_empty:
                collect(scheduler.process_result(backend.execute(plan)), done)
            scheduler.check_integrity()
            step += 1
        assert all(d.error is None for d in done.values())
        outputs[caching] = {k: v.token_ids for k, v in done.items()}
        cached_tokens[caching] = {k: v.cached_prompt_tokens for k, v in done.items()}
    assert outputs[True] == outputs[False]
    assert cached_tokens[False] == {"r0": 0, "r1": 0, "r2": 0, "r3": 0}
    assert cached_tokens[True] == {"r0": 0, "r1": 12, "r2": 8, "r3": 12}
