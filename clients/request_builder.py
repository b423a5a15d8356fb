"""Builds `pagedserve.v1.GenerateRequest` messages from plain Python values.

The keyword names accepted for sampling are read from the `SamplingParameters` descriptor, so the
client follows the .proto without a hand-kept list: a field added there is accepted here at once.
`early_stopping` takes HF transformers' values (True, False or "never") as well as its enum numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.v1 import generation_pb2 as pb
from scheduler_svc.api_codec import EARLY_STOPPING_FROM_PROTO

_SAMPLING_DESCRIPTOR = pb.SamplingParameters.DESCRIPTOR

SAMPLING_FIELDS: tuple[str, ...] = tuple(field.name for field in _SAMPLING_DESCRIPTOR.fields)
"""Names `**sampling` accepts: the fields of `SamplingParameters`, in .proto order."""

# Plain Python values of enum fields -> their enum numbers; the server maps the numbers back.
_ENUM_VALUES: dict[str, dict[bool | str, int]] = {
    "early_stopping": {value: number for number, value in EARLY_STOPPING_FROM_PROTO.items()},
}


def build_sampling_parameters(**sampling: object) -> pb.SamplingParameters:
    """`SamplingParameters` from keyword arguments named like its fields; `None` leaves a field unset.

    `stop` takes one string or a sequence of them. An unknown name raises TypeError naming it; a value
    of the wrong type or range raises TypeError or ValueError naming the field.
    """
    unknown = [name for name in sampling if name not in _SAMPLING_DESCRIPTOR.fields_by_name]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise TypeError(f"unknown sampling parameter{plural} {', '.join(map(repr, unknown))}; "
                        f"expected one of: {', '.join(SAMPLING_FIELDS)}")
    params = pb.SamplingParameters()
    for name, value in sampling.items():
        if value is not None:
            _set_field(params, name, value)
    return params


def _enum_number(name: str, value: object) -> object:
    """An enum field's number for a plain value such as True or "never"; anything else as given."""
    values = _ENUM_VALUES.get(name)
    # Only bool and str are looked up: 1 == True, so an enum number would otherwise be taken for one.
    if values is None or not isinstance(value, bool | str):
        return value
    if value not in values:
        choices = ", ".join(repr(v) for v in values)
        enum_type = _SAMPLING_DESCRIPTOR.fields_by_name[name].enum_type
        assert enum_type is not None, name      # _ENUM_VALUES names enum fields only
        enum = enum_type.name
        raise ValueError(f"must be one of {choices} (or a number of enum {enum}), got {value!r}")
    return values[value]


def _set_field(params: pb.SamplingParameters, name: str, value: object) -> None:
    try:
        value = _enum_number(name, value)
        if _SAMPLING_DESCRIPTOR.fields_by_name[name].is_repeated:
            # A lone string is one stop string, not a sequence of one-character stops.
            getattr(params, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(params, name, value)
    except (TypeError, ValueError) as err:
        # protobuf's own message does not say which field it was checking.
        raise type(err)(f"{name}: {err}") from None


def build_generate_request(prompt: str | Sequence[int], request_id: str = "",
                           skip_special_tokens: bool = True, **sampling: object) -> pb.GenerateRequest:
    """A `GenerateRequest` for a text prompt (`str`) or an already tokenized one (token ids).

    `**sampling` is passed to `build_sampling_parameters`. `request_id` empty lets the server pick one.
    """
    request = pb.GenerateRequest(request_id=request_id, sampling=build_sampling_parameters(**sampling),
                                 skip_special_tokens=skip_special_tokens)
    _set_prompt(request, prompt)
    return request


def _set_prompt(request: pb.GenerateRequest, prompt: str | Sequence[int]) -> None:
    if isinstance(prompt, str):
        request.text = prompt
        return
    if isinstance(prompt, bytes | bytearray):
        # bytes are a sequence of ints too; sending them as token ids would silently be wrong.
        raise TypeError("prompt: give text as str or token ids as a sequence of int, not bytes")
    # Marked present even when empty, so the server answers "empty prompt" rather than "no prompt".
    request.token_ids.SetInParent()
    try:
        request.token_ids.ids.extend(prompt)
    except (TypeError, ValueError) as err:
        raise type(err)(f"prompt: token ids must be ints in [0, 2^32): {err}") from None
