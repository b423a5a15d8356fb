"""Keyword arguments -> GenerateRequest: every sampling field, unset fields, prompts and bad input."""

import pytest
from google.protobuf.descriptor import FieldDescriptor

from clients.request_builder import SAMPLING_FIELDS, build_generate_request, build_sampling_parameters
from pagedserve.v1 import generation_pb2 as pb

FIELDS = pb.SamplingParameters.DESCRIPTOR.fields_by_name
# The names the client documents; a field added to the .proto must be added to the client docs too.
DOCUMENTED = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
              "presence_penalty", "frequency_penalty", "seed", "max_tokens", "min_tokens", "stop",
              "include_stop_str_in_output", "stop_token_ids", "ignore_eos", "logprobs", "beam_width",
              "length_penalty", "early_stopping", "priority")
# A value that is not the proto default, by the field's type (0.5 and 0.25 are exact in float32).
EXAMPLE_VALUE = {FieldDescriptor.CPPTYPE_UINT32: 3, FieldDescriptor.CPPTYPE_UINT64: 2**40 + 1,
                 FieldDescriptor.CPPTYPE_INT32: -2, FieldDescriptor.CPPTYPE_FLOAT: 0.25,
                 FieldDescriptor.CPPTYPE_BOOL: True, FieldDescriptor.CPPTYPE_STRING: "###",
                 FieldDescriptor.CPPTYPE_ENUM: 3}


def example_sampling() -> dict[str, object]:
    values: dict[str, object] = {}
    for name, field in FIELDS.items():
        value = EXAMPLE_VALUE[field.cpp_type]
        values[name] = [value, value] if field.is_repeated else value
    return values


def test_the_accepted_names_are_the_proto_fields():
    assert SAMPLING_FIELDS == DOCUMENTED
    assert set(SAMPLING_FIELDS) == set(FIELDS)


def test_every_sampling_field_reaches_the_proto():
    values = example_sampling()
    params = build_sampling_parameters(**values)
    for name, value in values.items():
        got = getattr(params, name)
        assert (list(got) if FIELDS[name].is_repeated else got) == value, name
        if FIELDS[name].has_presence:
            assert params.HasField(name), name


def test_unset_and_none_leave_every_field_unset():
    for params in (build_sampling_parameters(), build_sampling_parameters(**dict.fromkeys(SAMPLING_FIELDS))):
        assert params == pb.SamplingParameters()
        for name, field in FIELDS.items():
            if field.has_presence:
                assert not params.HasField(name), name


def test_explicit_zero_is_set_not_unset():
    # temperature=0 means greedy; unset means the server's 1.0. They must stay distinguishable.
    params = build_sampling_parameters(temperature=0.0, seed=0, n=None)
    assert params.HasField("temperature") and params.temperature == 0.0
    assert params.HasField("seed") and params.seed == 0
    assert not params.HasField("n")


@pytest.mark.parametrize(("value", "expected"), [(True, pb.EARLY_STOPPING_TRUE),
                                               (False, pb.EARLY_STOPPING_FALSE),
                                               ("never", pb.EARLY_STOPPING_NEVER),
                                               (pb.EARLY_STOPPING_NEVER, pb.EARLY_STOPPING_NEVER)])
def test_early_stopping_takes_the_hf_values_or_enum_numbers(value, expected):
    assert build_sampling_parameters(early_stopping=value).early_stopping == expected


@pytest.mark.parametrize("value", ["sometimes", "true", ""])
def test_a_bad_early_stopping_value_names_the_field(value):
    with pytest.raises(ValueError, match=r"^early_stopping: must be one of True, False, 'never'"):
        build_sampling_parameters(early_stopping=value)


@pytest.mark.parametrize(("stop", "expected"), [("###", ["###"]), (["a", "bc"], ["a", "bc"]),
                                                (("x",), ["x"]), ([], [])])
def test_stop_takes_a_string_or_a_sequence(stop, expected):
    assert list(build_sampling_parameters(stop=stop).stop) == expected


def test_text_prompt_and_request_fields():
    request = build_generate_request("Hello", "req-1", False, max_tokens=8)
    assert request.WhichOneof("prompt") == "text" and request.text == "Hello"
    assert request.request_id == "req-1"
    assert request.HasField("skip_special_tokens") and request.skip_special_tokens is False
    assert request.sampling.max_tokens == 8 and request.sampling.HasField("max_tokens")
    assert build_generate_request("Hi").skip_special_tokens is True
    assert build_generate_request("Hi").request_id == ""


@pytest.mark.parametrize("ids", [[1, 2, 3], (7,), range(4, 6)])
def test_token_id_prompts(ids):
    request = build_generate_request(ids)
    assert request.WhichOneof("prompt") == "token_ids"
    assert list(request.token_ids.ids) == list(ids)


def test_empty_token_id_prompt_is_still_a_token_id_prompt():
    # Left for the server to reject as empty, not mistaken for a request without a prompt.
    assert build_generate_request([]).WhichOneof("prompt") == "token_ids"


def test_bytes_are_not_token_ids():
    with pytest.raises(TypeError, match="prompt"):
        build_generate_request(b"Hello")


def test_bad_token_ids_name_the_prompt():
    with pytest.raises(ValueError, match=r"^prompt:"):
        build_generate_request([1, -1])


def test_unknown_sampling_name_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="'max_new_tokens'"):
        build_generate_request("Hi", max_new_tokens=3)
    with pytest.raises(TypeError, match="'foo', 'bar'"):
        build_sampling_parameters(foo=1, n=2, bar=3)


def test_bad_values_name_the_field():
    with pytest.raises(TypeError, match=r"^temperature:"):
        build_sampling_parameters(temperature="hot")
    with pytest.raises(ValueError, match=r"^max_tokens:"):
        build_sampling_parameters(max_tokens=-1)
    with pytest.raises(TypeError, match=r"^stop_token_ids:"):
        build_sampling_parameters(stop_token_ids=5)
