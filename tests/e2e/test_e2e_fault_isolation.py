"""Fault isolation by request through the served stack on the embedded model.

A request with extreme (but accepted) sampling parameters rides in the same steps as five greedy ones:
every request completes, the greedy ones with the text they get alone, and health stays SERVING. Random
accepted parameter sets all end OK. And where one sequence's sampling is made to fail (in an in-process
stack, whose executor code a test can patch), only its request ends, with INTERNAL naming it; the other
requests complete normally, its blocks are freed, and the stack keeps serving.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest
from e2e_stack import require_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess_stack import InProcessStack

from clients.client import Completion, PagedServeError
from scheduler_svc.sampling_params import SamplingParams
from tests.sampling_strategies import FLOAT32_MAX, accepted_sampling_params

GREEDY_PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass Config:", "    for i in range(", "# Copyright",
                  "while True:"]
MAX_TOKENS = 12
EXTREMES = {
    "temperature 1e-38": dict(temperature=1e-38, seed=1),
    "temperature 1e-45": dict(temperature=1e-45, seed=2),
    "temperature 1e-38, top_k, top_p, min_p": dict(temperature=1e-38, top_k=5, top_p=0.5, min_p=0.5, seed=3),
    "repetition_penalty 1e-38": dict(repetition_penalty=1e-38, temperature=1.0, seed=4),
    "repetition_penalty 1e-38, top_p": dict(repetition_penalty=1e-38, temperature=0.8, top_p=0.9, seed=5),
    "repetition_penalty 1e-45, greedy": dict(repetition_penalty=1e-45, temperature=0.0),
    "repetition_penalty float32 max": dict(repetition_penalty=FLOAT32_MAX, temperature=1.0, seed=6),
    "temperature float32 max": dict(temperature=FLOAT32_MAX, seed=7, logprobs=20),
    "top_p 1e-45": dict(top_p=1e-45, seed=8),
    "min_tokens beside stop ids out of the vocabulary": dict(min_tokens=MAX_TOKENS, stop_token_ids=[2, 10**9],
                                                               seed=9),
}


def greedy_request(prompt: str) -> dict:
    """A greedy request that runs its full length."""
    return dict(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def run_together(client_of: Callable[[], object], requests: list[dict]) -> list[Completion | PagedServeError]:
    """Send every request at once, each from its own thread; returns each one's completion or error."""
    outcomes: list[Completion | PagedServeError | None] = [None] * len(requests)

    def worker(i: int, request: dict) -> None:
        with client_of() as client:  # type: ignore[attr-defined]
            try:
                outcomes[i] = client.generate(**request)
            except PagedServeError as err:
                outcomes[i] = err

    threads = [threading.Thread(target=worker, args=(i, r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(o is not None for o in outcomes), "a request never ended"
    return outcomes  # type: ignore[return-value]


@contextmanager
def health_watch(client_of: Callable[[], object]) -> Iterator[list[str]]:
    """Poll the frontend's health every 20 ms while the block runs; yields the statuses seen."""
    seen: list[str] = []
    done = threading.Event()

    def poll() -> None:
        with client_of() as client:  # type: ignore[attr-defined]
            while not done.is_set():
                seen.append(client.health())
                done.wait(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=30)
        with client_of() as client:  # type: ignore[attr-defined]
            seen.append(client.health())


def texts(outcomes: list[Completion | PagedServeError]) -> list[str]:
    """Each completion's text; fails on an error."""
    errors = [o for o in outcomes if isinstance(o, PagedServeError)]
    assert not errors, errors
    return [o.text for o in outcomes]  # type: ignore[union-attr]


def api_request(params: SamplingParams, prompt: str) -> dict:
    """The client call for a SamplingParams: every field sent (None fields stay unset)."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return dict(prompt=prompt, **fields)


@pytest.fixture(scope="module")
def greedy_alone(stack) -> list[str]:
    """The greedy prompts' texts, each request on its own."""
    with stack.client() as client:
        return [client.generate(**greedy_request(p)).text for p in GREEDY_PROMPTS]


@pytest.mark.parametrize("extreme", EXTREMES.values(), ids=EXTREMES.keys())
def test_an_extreme_request_rides_with_five_greedy_ones(stack, greedy_alone, extreme: dict) -> None:
    requests = [dict(prompt="def main():", max_tokens=MAX_TOKENS, ignore_eos=True, **extreme),
                *map(greedy_request, GREEDY_PROMPTS)]
    with health_watch(stack.client) as health:
        outcomes = run_together(stack.client, requests)
    _, *greedy = texts(outcomes)
    assert greedy == greedy_alone
    assert outcomes[0].usage.completion_tokens == MAX_TOKENS       # type: ignore[union-attr]
    assert set(health) == {"SERVING"}


def test_a_tiny_temperature_gives_the_greedy_text(stack, greedy_alone) -> None:
    with stack.client() as client:
        for temperature in (1e-38, 1e-45):
            tiny = client.generate(**dict(greedy_request(GREEDY_PROMPTS[0]), temperature=temperature, seed=1))
            assert tiny.text == greedy_alone[0]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(accepted_sampling_params(max_sequences=3, max_tokens=6, api=True), min_size=1,
                       max_size=3),
       prompt=st.sampled_from(["def f(x):", "import sys", "x = [", "#"]))
def test_random_accepted_parameters_end_ok_beside_a_greedy_request(stack, greedy_alone, params,
                                                                   prompt) -> None:
    requests = [greedy_request(GREEDY_PROMPTS[0]), *(api_request(p, prompt) for p in params)]
    outcomes = run_together(stack.client, requests)
    assert texts(outcomes)[0] == greedy_alone[0]
    for outcome, p in zip(outcomes[1:], params, strict=True):
        assert len(outcome.outputs) == p.n                          # type: ignore[union-attr]
        assert all(len(o.token_ids) <= p.max_tokens for o in outcome.outputs)  # type: ignore[union-attr]
    with stack.client() as client:
        assert client.health() == "SERVING"


# A failure forced in the executor's sampler, in an in-process stack.

VICTIM_SEED = 777


@pytest.fixture(scope="module")
def inprocess() -> Iterator[InProcessStack]:
    """The in-process stack on the embedded model, with a small KV pool."""
    require_model()
    stack = InProcessStack("--max-num-batched-tokens", "1024", "--cpu-kv-cache-bytes", str(32 * 2**20))
    yield stack
    stack.stop()


@pytest.mark.parametrize("fail_at", [0, 4])
def test_a_forced_sampling_failure_ends_only_its_request(inprocess, monkeypatch, fail_at: int) -> None:
    from executor_svc.sampler import Sampler

    with inprocess.client() as client:
        alone = [client.generate(**greedy_request(p)).text for p in GREEDY_PROMPTS]
    real = Sampler.launch

    def sampler(self, logits, rows):
        if any(r.seed == VICTIM_SEED and r.token_index == fail_at for r in rows):
            raise RuntimeError("forced sampler failure")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "launch", sampler)     # every sampling call, batch or alone, launches
    victim = dict(prompt="def main():", request_id="the-victim", max_tokens=MAX_TOKENS, temperature=0.8,
                  seed=VICTIM_SEED, ignore_eos=True)
    with health_watch(inprocess.client) as health:
        outcomes = run_together(inprocess.client, [victim, *map(greedy_request, GREEDY_PROMPTS)])
    error, *greedy = outcomes
    assert isinstance(error, PagedServeError) and error.code is grpc.StatusCode.INTERNAL
    assert "'the-victim'" in error.message and "forced sampler failure" in error.message
    assert texts(greedy) == alone
    assert set(health) == {"SERVING"}
    scheduler = inprocess.engine.scheduler
    assert scheduler is not None and not scheduler.groups
    scheduler.check_integrity()
    assert scheduler.block_manager.gpu.num_free == scheduler.block_manager.gpu.num_blocks
    monkeypatch.undo()
    with inprocess.client() as client:                              # it goes on serving as before
        assert client.generate(**greedy_request(GREEDY_PROMPTS[0])).text == alone[0]
        assert client.generate(**dict(victim, request_id="after")).usage.completion_tokens == MAX_TOKENS
