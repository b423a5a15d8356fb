"""`pagedserve generate`: stream a completion of one prompt from a running server.

With one output the text is written as it arrives. With several (--n, --best-of, --beam-width) each
output is printed, labelled, when it completes. --json prints every GenerateResponse as one JSON line
instead. A one-line summary goes to stderr at the end. Sampling flags left out are sent unset, so the
server's defaults apply, except --max-tokens (64 here). Ctrl-C cancels the request.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable

from google.protobuf import json_format

from clients.client import Completion, CompletionBuilder, event_from_proto
from clients.connection_args import add_connection_arguments, client_from_args
from clients.request_builder import SAMPLING_FIELDS, build_generate_request
from pagedserve.errors import InvalidArgumentError
from pagedserve.v1 import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 64

# Numeric sampling flags: (flag, type, help). Each flag's dest is the SamplingParameters field of the
# same name, which is how request_from_args finds them.
_NUMERIC_FLAGS: list[tuple[str, type, str]] = [
    ("--temperature", float, "softmax temperature; 0 is greedy (server default 1.0)"),
    ("--top-p", float, "nucleus sampling probability mass, in (0, 1]"),
    ("--top-k", int, "keep only the k most likely tokens; 0 disables"),
    ("--min-p", float, "drop tokens below min_p x the most likely token's probability"),
    ("--seed", int, "random seed (default: the server picks one)"),
    ("--best-of", int, "sequences to sample; the n most likely are returned"),
    ("--beam-width", int, "beam search with this many beams"),
    ("--length-penalty", float, "beam search length penalty (server default 1.0)"),
    ("--min-tokens", int, "tokens to generate before EOS or a stop token id may end an output"),
    ("--logprobs", int, "return the logprobs of this many alternatives per token (see --json)"),
    ("--repetition-penalty", float, "penalty for tokens already in prompt or output (server default 1.0)"),
    ("--presence-penalty", float, "subtracted from logits of tokens already in the output, in [-2, 2]"),
    ("--frequency-penalty", float, "subtracted per occurrence in the output, in [-2, 2]"),
    ("--priority", int, "scheduling priority; lower is admitted first"),
]

# Writes what one response brought: (response, indices of the outputs it finished, all so far).
Writer = Callable[[pb.GenerateResponse, list[int], CompletionBuilder], None]


# --early-stopping values: HF transformers' early_stopping, spelled for a command line.
_EARLY_STOPPING: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}


def _early_stopping(text: str) -> bool | str:
    try:
        return _EARLY_STOPPING[text.lower()]
    except KeyError:
        choices = ", ".join(_EARLY_STOPPING)
        raise argparse.ArgumentTypeError(f"expected one of {choices}, got {text!r}") from None


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Prompt, output, sampling and connection flags."""
    parser.add_argument("prompt", nargs="?", help="the prompt text (or give --token-ids)")
    parser.add_argument("--token-ids", type=_token_ids, metavar="1,2,3",
                        help="the prompt as comma-separated token ids, instead of text")
    parser.add_argument("--request-id", default="", metavar="ID",
                        help="id for logs and aborts (default: the server's)")
    parser.add_argument("--no-skip-special-tokens", dest="skip_special_tokens", action="store_false",
                        help="keep special tokens such as EOS in the text")
    parser.add_argument("--json", action="store_true", help="print each GenerateResponse as a JSON line")
    sampling = parser.add_argument_group("sampling (a flag left out leaves the server's default)")
    sampling.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                          help=f"tokens to generate per output (default {DEFAULT_MAX_TOKENS})")
    sampling.add_argument("-n", "--n", type=int, metavar="N", help="number of outputs to return")
    for flag, kind, help_text in _NUMERIC_FLAGS:
        sampling.add_argument(flag, type=kind, metavar="N" if kind is int else "X", help=help_text)
    sampling.add_argument("--early-stopping", type=_early_stopping, metavar="{true,false,never}",
                          help="when beam search ends, as in HF transformers (server default false)")
    sampling.add_argument("--stop", action="append", metavar="STR", help="stop string (repeatable)")
    sampling.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int, metavar="ID",
                          help="token id that ends an output (repeatable)")
    # default None rather than False: a flag left out is sent unset.
    sampling.add_argument("--include-stop-str-in-output", action="store_true", default=None,
                          help="keep the matched stop string in the text")
    sampling.add_argument("--ignore-eos", action="store_true", default=None,
                          help="keep generating after EOS (for exact lengths)")
    add_connection_arguments(parser)


def request_from_args(args: argparse.Namespace) -> pb.GenerateRequest:
    """The GenerateRequest the flags describe."""
    if (args.prompt is None) == (args.token_ids is None):
        raise InvalidArgumentError("prompt", "give either a prompt text or --token-ids")
    prompt = args.prompt if args.token_ids is None else args.token_ids
    sampling = {name: getattr(args, name) for name in SAMPLING_FIELDS}
    try:
        return build_generate_request(prompt, args.request_id, args.skip_special_tokens, **sampling)
    except (TypeError, ValueError) as err:
        field, _, message = str(err).partition(": ")  # the builder names the field first
        raise InvalidArgumentError(field, message) from None


def _streams_one_output(request: pb.GenerateRequest) -> bool:
    """Whether exactly one output comes back, token by token (unset fields read as 0 here)."""
    sampling = request.sampling
    return sampling.n <= 1 and sampling.best_of <= 1 and sampling.beam_width == 0


def _write_json(response: pb.GenerateResponse, finished: list[int], outputs: CompletionBuilder) -> None:
    print(json_format.MessageToJson(response, indent=None), flush=True)


def _write_delta(response: pb.GenerateResponse, finished: list[int], outputs: CompletionBuilder) -> None:
    sys.stdout.write("".join(choice.text for choice in response.choices) + ("\n" if finished else ""))
    sys.stdout.flush()


def _write_finished(response: pb.GenerateResponse, finished: list[int], outputs: CompletionBuilder) -> None:
    for index in finished:
        output = outputs.output(index)
        print(f"--- output {index} ({output.finish_reason}) ---\n{output.text}", flush=True)


def _writer(args: argparse.Namespace, request: pb.GenerateRequest) -> Writer:
    if args.json:
        return _write_json
    return _write_delta if _streams_one_output(request) else _write_finished


def summary(completion: Completion, seconds: float) -> str:
    """One line: finish reasons, token counts, time and completion tokens per second."""
    reasons = ",".join(output.finish_reason or "unfinished" for output in completion.outputs) or "none"
    usage = completion.usage
    generated = (usage.completion_tokens if usage is not None
                 else sum(len(output.token_ids) for output in completion.outputs))
    prompt_tokens = usage.prompt_tokens if usage is not None else "?"
    rate = generated / seconds if seconds > 0 else 0.0
    return (f"finish={reasons} prompt_tokens={prompt_tokens} completion_tokens={generated} "
            f"time={seconds:.2f}s {rate:.1f} tok/s")


def run(args: argparse.Namespace) -> int:
    """Stream the completion, writing it as it arrives; a failed call raises PagedServeError."""
    request = request_from_args(args)
    write = _writer(args, request)
    outputs = CompletionBuilder()
    started = time.monotonic()
    # Leaving these blocks early (Ctrl-C) cancels the call, so the server aborts the request.
    with client_from_args(args) as client, contextlib.closing(client.stream_responses(request)) as responses:
        for response in responses:
            write(response, outputs.add(event_from_proto(response)), outputs)
    print(summary(outputs.completion(), time.monotonic() - started), file=sys.stderr)
    return 0
