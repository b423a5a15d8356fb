"""The OpenAI-API load generator sends what the gRPC one sends, as /v1/completions bodies."""

from clients.loadgen import LoadRequest, sampling_arguments
from clients.openai_loadgen import completion_body


def test_a_sampled_request_keeps_its_fields_and_asks_for_usage_and_token_ids():
    request = LoadRequest(index=4, prompt_token_ids=(5, 6, 7), output_len=9, n=2)
    body = completion_body(request, seed=3, model="m")
    assert body["prompt"] == [5, 6, 7] and body["model"] == "m" and body["stream"] is True
    assert {k: body[k] for k in sampling_arguments(request, 3)} == sampling_arguments(request, 3)
    assert body["stream_options"] == {"include_usage": True} and body["return_token_ids"] is True
    assert "use_beam_search" not in body


def test_beam_search_becomes_vllms_use_beam_search_of_width_n():
    body = completion_body(LoadRequest(index=0, prompt_token_ids=(5,), output_len=4, beam_width=3), 0, "m")
    assert body["use_beam_search"] is True and body["n"] == 3 and body["temperature"] == 0.0
    assert "beam_width" not in body
