"""The client API's early_stopping, from the Python client's keywords through the wire to SamplingParams."""

import pytest

from clients.request_builder import build_generate_request
from pagedserve.errors import InvalidArgumentError
from pagedserve.v1 import generation_pb2 as pb
from scheduler_svc.api_codec import EARLY_STOPPING_FROM_PROTO, parse_request, sampling_params_from_proto


def over_the_wire(**sampling: object):
    """SamplingParams as the server parses a request the Python client built with `sampling`."""
    sent = build_generate_request([5, 6, 7], **sampling).SerializeToString()
    return parse_request(pb.GenerateRequest.FromString(sent), encode=lambda text: []).params


@pytest.mark.parametrize("mode", [True, False, "never"])
def test_early_stopping_round_trips_from_the_client(mode):
    params = over_the_wire(beam_width=3, early_stopping=mode)
    assert params.early_stopping == mode and params.use_beam_search


def test_unset_early_stopping_is_false_as_in_hf():
    assert over_the_wire(beam_width=3).early_stopping is False
    assert over_the_wire().early_stopping is False


def test_every_enum_value_but_unspecified_has_a_meaning():
    numbers = {v.number for v in pb.EarlyStopping.DESCRIPTOR.values}
    assert set(EARLY_STOPPING_FROM_PROTO) == numbers - {pb.EARLY_STOPPING_UNSPECIFIED}


@pytest.mark.parametrize("mode", [True, "never"])
def test_early_stopping_without_beam_search_is_refused(mode):
    with pytest.raises(InvalidArgumentError) as err:
        over_the_wire(early_stopping=mode)
    assert err.value.field == "early_stopping"
    assert over_the_wire(early_stopping=False).early_stopping is False      # the default, harmless


def test_an_unknown_enum_number_names_the_field():
    # proto3 enums are open: a number from a newer .proto arrives as it is.
    with pytest.raises(InvalidArgumentError) as err:
        sampling_params_from_proto(pb.SamplingParameters(beam_width=2, early_stopping=9))
    assert err.value.field == "early_stopping" and "9" in str(err.value)
