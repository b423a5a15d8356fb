"""`pagedserve generate`, `healthcheck` and `info` without a server: flags -> request, and errors."""

import socket

import pytest

from clients.cli import build_parser
from clients.cli import main as pagedserve
from clients.client import Completion, CompletionOutput, Usage
from clients.generate_command import request_from_args, summary
from pagedserve.v1 import generation_pb2 as pb

EVERY_SAMPLING_FLAG = [
    "--max-tokens", "12", "-n", "2", "--best-of", "3", "--temperature", "0.5", "--top-p", "0.75",
    "--top-k", "40", "--min-p", "0.125", "--repetition-penalty", "1.25", "--presence-penalty", "0.5",
    "--frequency-penalty", "-0.5", "--seed", "1234567890123", "--min-tokens", "2", "--stop", "###",
    "--stop", "\n\n", "--include-stop-str-in-output", "--stop-token-id", "7", "--stop-token-id", "9",
    "--ignore-eos", "--logprobs", "5", "--beam-width", "4", "--length-penalty", "0.25", "--early-stopping",
    "never", "--priority", "-3",
]


def request(*argv: str) -> pb.GenerateRequest:
    return request_from_args(build_parser().parse_args(["generate", *argv]))


def nothing_listening() -> str:
    """host:port of a loopback port that was free a moment ago: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_every_sampling_flag_reaches_the_request():
    sent = request("Hello", *EVERY_SAMPLING_FLAG)
    expected = pb.SamplingParameters(
        max_tokens=12, n=2, best_of=3, temperature=0.5, top_p=0.75, top_k=40, min_p=0.125,
        repetition_penalty=1.25, presence_penalty=0.5, frequency_penalty=-0.5, seed=1234567890123,
        min_tokens=2, stop=["###", "\n\n"], include_stop_str_in_output=True, stop_token_ids=[7, 9],
        ignore_eos=True, logprobs=5, beam_width=4, length_penalty=0.25,
        early_stopping=pb.EARLY_STOPPING_NEVER, priority=-3)
    assert sent.sampling == expected
    # Every field of the proto has a flag: none was left at its default above.
    assert {f.name for f, _ in sent.sampling.ListFields()} == set(expected.DESCRIPTOR.fields_by_name)
    assert sent.text == "Hello"


@pytest.mark.parametrize(("flag", "sent"), [("true", pb.EARLY_STOPPING_TRUE),
                                            ("False", pb.EARLY_STOPPING_FALSE),
                                            ("never", pb.EARLY_STOPPING_NEVER)])
def test_early_stopping_flag_takes_the_hf_values(flag, sent):
    assert request("Hi", "--beam-width", "2", "--early-stopping", flag).sampling.early_stopping == sent


def test_flags_left_out_are_sent_unset_except_max_tokens():
    sent = request("Hello")
    assert sent.sampling == pb.SamplingParameters(max_tokens=64)
    assert not sent.sampling.HasField("temperature") and not sent.sampling.HasField("seed")
    assert sent.request_id == "" and sent.skip_special_tokens is True


def test_prompt_as_token_ids_and_request_options():
    sent = request("--token-ids", "1, 2,3", "--request-id", "mine", "--no-skip-special-tokens")
    assert sent.WhichOneof("prompt") == "token_ids" and list(sent.token_ids.ids) == [1, 2, 3]
    assert sent.request_id == "mine" and sent.skip_special_tokens is False


@pytest.mark.parametrize("argv", [[], ["Hello", "--token-ids", "1"], ["Hi", "-n", "-1"]])
def test_bad_prompt_or_value_exits_2_naming_it(argv, capsys):
    assert pagedserve(["generate", *argv]) == 2
    assert capsys.readouterr().err.startswith("pagedserve generate: invalid ")


def test_token_ids_must_be_integers(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["generate", "--token-ids", "1,x"])
    assert exited.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_early_stopping_must_be_true_false_or_never(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["generate", "--early-stopping", "sometimes"])
    assert exited.value.code == 2
    assert "expected one of true, false, never, got 'sometimes'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "Hello", "--max-tokens", "4"], ["healthcheck"], ["info"]])
def test_nothing_listening_exits_1_with_unavailable(command, capsys):
    assert pagedserve([*command, "--target", nothing_listening(), "--timeout", "5", "--token", "t"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"pagedserve {command[0]}: UNAVAILABLE: ")
    assert "Connection refused" in captured.err or "failed to connect" in captured.err
    assert captured.out == ""


def test_unreadable_tls_ca_exits_2(tmp_path, capsys):
    assert pagedserve(["healthcheck", "--tls-ca", str(tmp_path / "missing.pem")]) == 2
    assert "invalid tls-ca: cannot read" in capsys.readouterr().err


def test_summary_line():
    outputs = tuple(CompletionOutput(index=i, text="ab", token_ids=(1, 2), logprobs=(), finish_reason=reason,
                                     stop_reason=None, stop_token_id=None, cumulative_logprob=-1.0)
                    for i, reason in enumerate(["length", "eos"]))
    completion = Completion("r", outputs, Usage(prompt_tokens=5, completion_tokens=4, cached_prompt_tokens=0,
                                                num_preemptions=0))
    line = "finish=length,eos prompt_tokens=5 completion_tokens=4 time=2.00s 2.0 tok/s"
    assert summary(completion, 2.0) == line
    assert "prompt_tokens=? completion_tokens=4" in summary(Completion("r", outputs, None), 1.0)
