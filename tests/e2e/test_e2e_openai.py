"""The OpenAI-compatible HTTP API through real clients (the official `openai` SDK, httpx2 and `curl -N`)
against the running stack on the embedded model, next to the gRPC API of the same scheduler."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx2
import pytest
from e2e_stack import RunningStack, require_model
from grpc_health.v1 import health_pb2

openai = pytest.importorskip("openai")

PROMPT = "def fibonacci(n):"
MODEL = "stdlib-llama"
MESSAGES = [{"role": "system", "content": "Python 3"},
            {"role": "user", "content": "read a file\nline by line"}]


def sdk(stack: RunningStack, **kwargs: object) -> openai.OpenAI:
    """The official client of this stack's HTTP API, without retries (a test wants the first answer)."""
    options: dict[str, object] = {"api_key": "none", "max_retries": 0, "timeout": 120.0, **kwargs}
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> Iterator[openai.OpenAI]:
    with sdk(stack) as api:
        yield api


def grpc_greedy(stack: RunningStack, prompt: str | list[int], max_tokens: int) -> str:
    with stack.client() as grpc_client:
        return grpc_client.generate(prompt, max_tokens=max_tokens, temperature=0.0).text


def events(lines: list[str]) -> list[str]:
    """The data of every Server-Sent Event in these lines."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ---- models, health and the vLLM extras ----------------------------------------------------------------

def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"
    assert model.model_extra["max_model_len"] > 0


def test_health_version_tokenize_and_detokenize(stack):
    with httpx2.Client(base_url=stack.http_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"]
        tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] > 0
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith(PROMPT)
        bad = http.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- completions ---------------------------------------------------------------------------------------

def test_greedy_text_through_http_equals_greedy_text_through_grpc(stack, client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    (choice,) = reply.choices
    assert choice.text == grpc_greedy(stack, PROMPT, 24)
    assert choice.finish_reason == "length" and reply.id.startswith("cmpl-")
    assert reply.object == "text_completion" and abs(reply.created - time.time()) < 60
    assert (reply.usage.completion_tokens, reply.usage.total_tokens) == (24, reply.usage.prompt_tokens + 24)


def test_a_streamed_completion_is_the_whole_one_in_pieces_then_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_parallel_samples_and_several_prompts_number_their_choices(client):
    reply = client.completions.create(model=MODEL, prompt=[PROMPT, "import os"], n=2, max_tokens=8,
                                      temperature=1.0, seed=7)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert reply.usage.completion_tokens == 4 * 8
    again = client.completions.create(model=MODEL, prompt=[PROMPT, "import os"], n=2, max_tokens=8,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]      # seeded


def test_token_id_prompts_and_echo(stack, client):
    with httpx2.Client(base_url=stack.http_url, timeout=30) as http:
        ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, echo=True)
    assert by_text.choices[0].text == PROMPT + by_ids.choices[0].text


def test_logprobs_come_in_the_legacy_format(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_a_stop_string_ends_the_choice_with_stop(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[10:13]
    (choice,) = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                          stop=[stop]).choices
    assert choice.text == full[:full.index(stop)] and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop


def test_raw_sse_through_curl(stack):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True})
    result = subprocess.run([curl, "-sN", "--fail-with-body", f"{stack.http_url}/v1/completions",
                             "-H", "Content-Type: application/json", "-d", body],
                            capture_output=True, text=True, timeout=120, check=True)
    raw = result.stdout
    assert raw.startswith("data: ") and raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.split("\n\n") if block)
    *chunks, done = events(raw.splitlines())
    assert done == "[DONE]"
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks) == grpc_greedy(stack, PROMPT, 12)


# ---- chat ----------------------------------------------------------------------------------------------

def test_chat_renders_the_template_and_answers_as_the_prompt_would(stack, client):
    with httpx2.Client(base_url=stack.http_url, timeout=30) as http:
        ids = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=16,
                                           temperature=0)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == grpc_greedy(stack, ids, 16)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and reply.usage.prompt_tokens == len(ids)


def test_a_streamed_chat_names_the_role_first_then_content_then_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].object == "chat.completion.chunk"


def test_chat_with_n_and_top_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=3, seed=1,
                                           logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        content = choice.logprobs.content
        assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
        assert "".join(t.token for t in content) == choice.message.content


# ---- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "param"), [
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"logprobs": 99}, "logprobs"),
    ({"extra_body": {"use_beam_search": True, "best_of": 2, "temperature": 0.7}}, "temperature"),
    ({"prompt": []}, "prompt"),
])
def test_bad_completion_fields_raise_bad_request_naming_the_field(client, kwargs, param):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, **kwargs)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error" and param in caught.value.message


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"messages": []}, "messages"),
])
def test_bad_chat_fields_raise_bad_request_naming_the_field(client, kwargs, param):
    kwargs = {"messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert caught.value.param == param


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert caught.value.code == "model_not_found" and MODEL in caught.value.message


def test_bad_json_and_unknown_routes_answer_openai_errors(stack):
    with httpx2.Client(base_url=stack.http_url, timeout=30) as http:
        bad = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and "error" in bad.json()
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["message"]


# ---- clients that leave ----------------------------------------------------------------------------------

def wait_idle(stack: RunningStack, timeout: float = 30.0) -> None:
    """Until no request runs and no KV block is used."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gauges = ("pagedserve_requests_running", "pagedserve_requests_waiting",
                  "pagedserve_gpu_kv_usage_ratio")
        if all(stack.metric(name) == 0 for name in gauges):
            return
        time.sleep(0.05)
    raise AssertionError("requests still hold KV blocks")


def aborted(stack: RunningStack) -> float:
    """Requests finished as aborted so far."""
    return stack.metric('pagedserve_requests_finished_total{finish_reason="aborted"}')


def test_a_client_that_leaves_mid_stream_aborts_its_request_and_frees_its_blocks(stack):
    wait_idle(stack)
    before = aborted(stack)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx2.Client(base_url=stack.http_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines, strict=False) if line.startswith("data: ")) >= 2
        assert stack.metric("pagedserve_gpu_kv_usage_ratio") > 0
    wait_idle(stack)            # long before 900 tokens
    assert aborted(stack) == before + 1


def test_a_client_that_leaves_before_a_whole_answer_aborts_it(stack):
    wait_idle(stack)
    before = aborted(stack)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}
    with httpx2.Client(base_url=stack.http_url, timeout=0.5) as http, pytest.raises(httpx2.ReadTimeout):
        http.post("/v1/completions", json=body)
    wait_idle(stack)
    assert aborted(stack) == before + 1


# ---- auth, overload and outage ---------------------------------------------------------------------------

def test_the_bearer_token_is_required_but_health_stays_open(start_stack):
    stack = start_stack("--auth-token", "sekrit")
    with sdk(stack, api_key="wrong") as wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert caught.value.code == "invalid_api_key"
    with sdk(stack, api_key="sekrit") as right:
        assert right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert httpx2.get(f"{stack.http_url}/health", timeout=10).status_code == 200
    assert stack.metric('pagedserve_requests_rejected_total{code="UNAUTHENTICATED"}') == 1


def test_a_full_queue_is_429_and_a_lost_executor_is_503(start_stack):
    require_model()
    stack = start_stack("--max-num-seqs", "1", "--max-waiting-requests", "1", "--executor-grace-seconds", "0",
                        restart_executors=False)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx2.Client(base_url=stack.http_url, timeout=60) as http, contextlib.ExitStack() as streams:
        running = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
        lines = running.iter_lines()        # kept: dropping it would close the stream, and abort it
        assert next(line for line in lines if line.startswith("data: "))       # it runs
        waiting = streams.enter_context(http.stream("POST", "/v1/completions", json=body))
        assert running.status_code == waiting.status_code == 200
        with sdk(stack) as api, pytest.raises(openai.RateLimitError) as caught:
            api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
    stack.stack.processes["executor-0"].proc.kill()
    stack.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert httpx2.get(f"{stack.http_url}/health", timeout=10).status_code == 503
    time.sleep(0.1)             # past the zero grace period
    with sdk(stack) as api, pytest.raises(openai.InternalServerError) as outage:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert outage.value.status_code == 503


def test_http_port_zero_turns_the_api_off(start_stack):
    stack = start_stack("--http-port", "0")
    assert stack.stack.processes["scheduler"].http_address is None
    assert grpc_greedy(stack, PROMPT, 2)
