"""The gRPC API under protos/: stubs import, messages round-trip, enums and docs follow the API rules.

The rules (DESIGN.md section 4): one versioned package, every element documented, enum zero values
`<ENUM_PREFIX>_UNSPECIFIED`; the executor messages mirror protos/pagedserve/contract/plan.py field for
field.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from grpc_tools import protoc

from pagedserve.v1 import executor_pb2, executor_pb2_grpc, generation_pb2, generation_pb2_grpc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = sorted(PROTO_ROOT.rglob("*.proto"))

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto field numbers,
# as used in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


# --------------------------------------------------------------------------------------------- helpers


class CompiledProtos:
    """The FileDescriptorProtos of a protoc run with source info; test reports show only file names."""

    def __init__(self, file_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = list(file_set.file)

    def __repr__(self) -> str:
        return f"CompiledProtos({[f.name for f in self.files]})"


def compile_protos(proto_root: Path, out_dir: Path) -> CompiledProtos:
    """Compile every .proto under `proto_root`, keeping source info (comments), with grpcio-tools' protoc."""
    out = out_dir / "descriptors.binpb"
    protos = sorted(proto_root.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{resources.files('grpc_tools') / '_proto'}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *map(str, protos),
    ]
    assert protoc.main(args) == 0, f"protoc failed on {protos}"
    return CompiledProtos(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()))


# (kind, full name, SourceCodeInfo path, the element's descriptor proto)
Element = tuple[str, str, tuple[int, ...], Message]


def _message_elements(
    message: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    yield "message", name, path, message
    for i, field in enumerate(message.field):
        yield "field", f"{name}.{field.name}", (*path, _MESSAGE_FIELD, i), field
    for i, oneof in enumerate(message.oneof_decl):
        members = [f for f in message.field if f.HasField("oneof_index") and f.oneof_index == i]
        if all(f.proto3_optional for f in members):
            continue  # synthetic oneof of a proto3 `optional` field: no source of its own
        yield "oneof", f"{name}.{oneof.name}", (*path, _MESSAGE_ONEOF, i), oneof
    for i, nested in enumerate(message.nested_type):
        if nested.options.map_entry:
            continue  # synthesized for a map field
        yield from _message_elements(nested, f"{name}.{nested.name}", (*path, _MESSAGE_NESTED, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, f"{name}.{enum.name}", (*path, _MESSAGE_ENUM, i))


def _enum_elements(
    enum: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    yield "enum", name, path, enum
    for i, value in enumerate(enum.value):
        yield "enum value", f"{name}.{value.name}", (*path, _ENUM_VALUE, i), value


def api_elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    """Every message, field, oneof, enum, enum value, service and RPC of `file`, as Elements."""
    prefix = f"{file.package}." if file.package else ""
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, prefix + message.name, (_FILE_MESSAGE, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, prefix + enum.name, (_FILE_ENUM, i))
    for i, service in enumerate(file.service):
        yield "service", prefix + service.name, (_FILE_SERVICE, i), service
        for j, method in enumerate(service.method):
            yield (
                "rpc",
                f"{prefix}{service.name}.{method.name}",
                (_FILE_SERVICE, i, _SERVICE_METHOD, j),
                method,
            )


def undocumented(compiled: CompiledProtos) -> list[str]:
    """The API elements that have no leading `//` comment, as 'file: kind name'."""
    missing = []
    for file in compiled.files:
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for kind, name, path, _ in api_elements(file):
            if not comments.get(path, "").strip():
                missing.append(f"{file.name}: {kind} {name}")
    return missing


def unset_fields(message: Message, prefix: str = "") -> list[str]:
    """Fields of `message` (recursively) left at their default; of a oneof only the chosen member counts."""
    proto = descriptor_pb2.DescriptorProto()
    message.DESCRIPTOR.CopyToProto(proto)
    optional = {f.name for f in proto.field if f.proto3_optional}
    missing = []
    for field in message.DESCRIPTOR.fields:
        name = prefix + field.name
        oneof = field.containing_oneof
        if oneof is not None and field.name not in optional:
            chosen = message.WhichOneof(oneof.name)
            if chosen is None:
                missing.append(f"{prefix}{oneof.name} (oneof)")
            if chosen != field.name:
                continue
        value = getattr(message, field.name)
        if field.is_repeated:
            if not value:
                missing.append(name)
            elif field.message_type is not None:
                for i, item in enumerate(value):
                    missing += unset_fields(item, f"{name}[{i}].")
        elif field.message_type is not None:
            if not message.HasField(field.name):
                missing.append(name)
            else:
                missing += unset_fields(value, f"{name}.")
        elif field.has_presence:
            if not message.HasField(field.name):
                missing.append(name)
        elif value == field.default_value:
            missing.append(name)
    return sorted(set(missing))


def _round_trip(message: Message) -> None:
    assert not unset_fields(message), f"the fixture leaves fields unset: {unset_fields(message)}"
    data = message.SerializeToString()
    copy = type(message).FromString(data)
    assert copy == message
    assert copy.SerializeToString(deterministic=True) == message.SerializeToString(deterministic=True)


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> CompiledProtos:
    return compile_protos(PROTO_ROOT, tmp_path_factory.mktemp("protos"))


def full_step_plan() -> executor_pb2.StepPlan:
    """A StepPlan with every field set, including a sequence met for the first time."""
    start = executor_pb2.SequenceStart(
        request_id="req-1",
        num_prompt_tokens=5,
        seed=2**63 - 1,
        sample_index=2,
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        min_p=0.125,
        repetition_penalty=1.25,
        presence_penalty=-0.5,
        frequency_penalty=1.5,
        min_tokens=3,
        suppressed_token_ids=[2, 32000],
        cached_token_ids=[1, 450, 4996],      # the 3 tokens before start_position
    )
    work = executor_pb2.SequenceWork(
        seq_id=9,
        token_ids=[15043, 3186, 29991, 13],
        start_position=3,
        block_table_start=1,
        block_ids=[3, 4],
        num_samples=2,
        num_logprobs=4,
        start=start,
        feeds_last_sample=True,
    )
    return executor_pb2.StepPlan(
        step_id=12345,
        forks=[executor_pb2.SequenceFork(parent_seq_id=9, child_seq_id=11, sample_index=1)],
        swap_out=executor_pb2.BlockMapping(src=[1, 2, 3], dst=[100, 101, 102]),
        swap_in=executor_pb2.BlockMapping(src=[200], dst=[5]),
        copy=executor_pb2.BlockMapping(src=[6, 7], dst=[8, 9]),
        forget_seq_ids=[1, 2, 3],
        sequences=[work],
    )


def full_step_result() -> executor_pb2.StepResult:
    """A StepResult with every field set."""
    sample = executor_pb2.Sample(
        token_id=29991,
        logprob=-0.25,
        top_logprobs=[
            executor_pb2.TokenLogprob(token_id=29991, logprob=-0.25),
            executor_pb2.TokenLogprob(token_id=13, logprob=-1.5),
        ],
    )
    return executor_pb2.StepResult(
        step_id=12345,
        sequences=[executor_pb2.SequenceResult(seq_id=9, samples=[sample, sample],
                                               error="sampling failed: ValueError('boom')")],
        forward_seconds=0.0125,
        swap_seconds=0.5,
        roofline_seconds=0.0075,
        error="block id 4096 out of range [0, 4096)",
    )


def full_sampling() -> generation_pb2.SamplingParameters:
    """SamplingParameters with every field set to a non-default value."""
    return generation_pb2.SamplingParameters(
        n=2,
        best_of=4,
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        min_p=0.125,
        repetition_penalty=1.25,
        presence_penalty=-0.5,
        frequency_penalty=1.5,
        seed=2**63 - 1,
        max_tokens=256,
        min_tokens=4,
        stop=["\n\n", "###"],
        include_stop_str_in_output=True,
        stop_token_ids=[2, 32000],
        ignore_eos=True,
        logprobs=5,
        beam_width=4,
        length_penalty=0.5,
        early_stopping=generation_pb2.EARLY_STOPPING_NEVER,
        priority=-3,
    )


def full_generate_requests() -> list[generation_pb2.GenerateRequest]:
    """One GenerateRequest per prompt kind, each with every field set."""
    common = {"request_id": "client-7", "sampling": full_sampling(), "skip_special_tokens": False}
    return [
        generation_pb2.GenerateRequest(text="San Francisco is a", **common),
        generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 3087, 8970]), **common),
    ]


def full_generate_response() -> generation_pb2.GenerateResponse:
    """A final GenerateResponse with every field set."""
    candidate = generation_pb2.LogprobCandidate(token_id=338, text=" is", logprob=-0.5)
    chunk = generation_pb2.CompletionChunk(
        index=1,
        text=" is a city",
        token_ids=[338, 263, 4272],
        logprobs=[generation_pb2.TokenLogprobs(chosen=candidate, top_logprobs=[candidate, candidate])] * 3,
        finish_reason=generation_pb2.FINISH_REASON_STOP,
        stop_reason="</s>",
        stop_token_id=2,
        cumulative_logprob=-1.5,
    )
    return generation_pb2.GenerateResponse(
        request_id="client-7",
        choices=[chunk],
        usage=generation_pb2.Usage(
            prompt_tokens=3, completion_tokens=3, cached_prompt_tokens=16, num_preemptions=1
        ),
    )


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("proto", PROTO_FILES, ids=lambda p: str(p.relative_to(PROTO_ROOT)))
def test_every_proto_has_importable_stubs(proto: Path) -> None:
    module = ".".join(proto.relative_to(PROTO_ROOT).with_suffix("").parts)
    messages = importlib.import_module(module + "_pb2")
    services = importlib.import_module(module + "_pb2_grpc")
    assert messages.DESCRIPTOR.package == "pagedserve.v1"
    for service in messages.DESCRIPTOR.services_by_name:
        assert hasattr(services, f"{service}Stub")
        assert hasattr(services, f"{service}Servicer")


def test_services_have_the_designed_rpcs() -> None:
    generation = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    assert {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in generation.methods
    } == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Abort": ("AbortRequest", "AbortResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
    }
    executor = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"]
    assert {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in executor.methods
    } == {
        "Describe": ("DescribeRequest", "DescribeResponse", False, False),
        "InitCache": ("InitCacheRequest", "InitCacheResponse", False, False),
        "Execute": ("StepPlan", "StepResult", True, True),
    }
    assert hasattr(generation_pb2_grpc, "add_GenerationServiceServicer_to_server")
    assert hasattr(executor_pb2_grpc, "add_ExecutorServiceServicer_to_server")


@pytest.mark.parametrize(
    "message",
    [
        full_step_plan(),
        full_step_result(),
        *full_generate_requests(),
        full_generate_response(),
        executor_pb2.DescribeResponse(
            model_name="meta-llama/Llama-2-7b-hf",
            model_path="/models/llama-2-7b",
            architecture="LlamaForCausalLM",
            dtype="float16",
            device="cuda:1",
            rank=1,
            world_size=2,
            max_model_len=4096,
            vocab_size=32000,
            eos_token_ids=[2],
            num_layers=32,
            num_kv_heads=16,
            head_size=128,
        ),
        executor_pb2.InitCacheRequest(block_size=16, gpu_memory_utilization=0.875, swap_space_bytes=4 << 30,
                                       max_num_batched_tokens=8448, step_timeout_seconds=120.0),
        executor_pb2.InitCacheResponse(
            num_gpu_blocks=7000, num_cpu_blocks=512, block_bytes=8 << 20, profile_seconds=1.5
        ),
        generation_pb2.ModelInfo(
            model_name="meta-llama/Llama-2-7b-hf",
            max_model_len=4096,
            block_size=16,
            kv_capacity_tokens=112000,
            num_gpu_blocks=7000,
            num_cpu_blocks=512,
            vocab_size=32000,
            eos_token_ids=[2],
            world_size=2,
        ),
        generation_pb2.AbortRequest(request_id="client-7"),
        generation_pb2.AbortResponse(found=True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_message_round_trips_with_every_field_set(message: Message) -> None:
    _round_trip(message)


def test_round_trip_fixture_check_catches_unset_fields() -> None:
    plan = full_step_plan()
    plan.sequences[0].start.ClearField("top_k")
    plan.copy.ClearField("dst")
    assert unset_fields(plan) == ["copy.dst", "sequences[0].start.top_k"]
    sampling = generation_pb2.SamplingParameters(temperature=0.0)
    assert "temperature" not in unset_fields(sampling), "an optional field set to 0 counts as set"
    assert "prompt (oneof)" in unset_fields(generation_pb2.GenerateRequest())


def test_optional_sampling_fields_distinguish_unset_from_zero() -> None:
    sampling = generation_pb2.SamplingParameters()
    for name in (
        "n",
        "best_of",
        "temperature",
        "top_p",
        "repetition_penalty",
        "seed",
        "max_tokens",
        "length_penalty",
    ):
        assert not sampling.HasField(name)
    sampling.temperature = 0.0
    parsed = generation_pb2.SamplingParameters.FromString(sampling.SerializeToString())
    assert parsed.HasField("temperature") and parsed.temperature == 0.0


def test_enum_zero_values_are_unspecified(compiled: CompiledProtos) -> None:
    enums = [
        (name, enum)
        for file in compiled.files
        for kind, name, _, enum in api_elements(file)
        if kind == "enum"
    ]
    assert enums, "no enum found: the walk over the descriptors is broken"
    for name, enum in enums:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper()  # FinishReason -> FINISH_REASON
        zero = [v.name for v in enum.value if v.number == 0]
        assert zero == [f"{prefix}_UNSPECIFIED"], f"{name}: zero value is {zero}"
        assert all(v.name.startswith(prefix + "_") for v in enum.value), f"{name}: values lack {prefix}_"


def test_every_api_element_is_documented(compiled: CompiledProtos) -> None:
    assert {f.name for f in compiled.files} == {str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES}
    missing = undocumented(compiled)
    assert not missing, "undocumented API elements (add a leading // comment):\n" + "\n".join(missing)


def test_documentation_check_reports_each_undocumented_element(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "demo.proto").write_text(
        'syntax = "proto3";\n'
        "package demo;\n"
        "// Documented service.\n"
        "service Demo {\n"
        "  rpc Run(Request) returns (Request);\n"
        "}\n"
        "message Request {\n"
        "  // Documented field.\n"
        "  string a = 1;\n"
        "  optional int32 b = 2;  // a trailing comment is not a doc comment\n"
        "  oneof choice {\n"
        "    // Documented member.\n"
        "    int32 c = 3;\n"
        "  }\n"
        "  // Documented nested message.\n"
        "  message Inner {}\n"
        "}\n"
        "// Documented enum.\n"
        "enum Color {\n"
        "  COLOR_UNSPECIFIED = 0;\n"
        "  // Documented value.\n"
        "  COLOR_RED = 1;\n"
        "}\n"
    )
    missing = undocumented(compile_protos(root, tmp_path))
    assert missing == [
        "demo/demo.proto: message demo.Request",
        "demo/demo.proto: field demo.Request.b",
        "demo/demo.proto: oneof demo.Request.choice",
        "demo/demo.proto: enum value demo.Color.COLOR_UNSPECIFIED",
        "demo/demo.proto: rpc demo.Demo.Run",
    ]


def _constructor_fields(cls: type) -> list[str]:
    """A dataclass's fields that callers set (derived `init=False` fields are not part of the API)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


# The executor messages mirror the scheduler's dataclasses; the proto adds only what the wire needs.
_PLAN_MIRRORS = [
    ("StepPlan", "StepPlan", ()),
    ("SequenceWork", "SequenceWork", ()),
    ("SequenceStart", "SequenceStart", ()),
    ("SequenceFork", "SequenceFork", ()),
    ("StepResult", "StepResult", ("error",)),
    ("SequenceResult", "SequenceResult", ()),
    ("Sample", "Sample", ()),
]


@pytest.mark.parametrize(("dataclass_name", "message_name", "extra"), _PLAN_MIRRORS)
def test_executor_messages_mirror_plan_dataclasses(
    dataclass_name: str, message_name: str, extra: tuple[str, ...]
) -> None:
    from pagedserve.contract import plan

    names = _constructor_fields(getattr(plan, dataclass_name))
    proto_names = [f.name for f in executor_pb2.DESCRIPTOR.message_types_by_name[message_name].fields]
    assert proto_names == [*names, *extra]


def test_sampling_parameters_mirror_sampling_params() -> None:
    from scheduler_svc import sampling_params

    names = _constructor_fields(sampling_params.SamplingParams)
    assert [f.name for f in generation_pb2.SamplingParameters.DESCRIPTOR.fields] == names
