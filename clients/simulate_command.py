"""`pagedserve simulate`: the scheduler on a synthetic trace against the simulated executor, no GPU.

By default it runs the same trace under PagedAttention and the three contiguous-reservation
baselines and prints the paper's memory comparison (batched requests, KV utilization). It exits 1 when
any request failed (one that can never fit the KV pool, say), so that a script notices.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.loadgen import progress_bar
from clients.simulation import SimulatedRequest, SimulationReport, simulate
from clients.tables import markdown_table
from clients.traces import TRACES, TraceRequest, fixed_trace, prompt_token_ids, with_sharing
from pagedserve.errors import InvalidArgumentError
from scheduler_svc.config import ReservationMode, SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tqdm import tqdm

VOCAB_SIZE = 32000
COLUMNS = [("reservation", "mode"), ("mean_batched_requests", "batched requests"),
           ("mean_kv_utilization", "KV utilization"), ("mean_gpu_usage", "GPU blocks used"),
           ("preemptions_recompute", "recomputes"), ("preemptions_swap", "swaps"),
           ("blocks_copied", "CoW copies"), ("steps", "steps"), ("generated_tokens", "tokens"),
           ("num_failed", "failed"), ("median_schedule_ms", "schedule ms (median)")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload and pool flags (scheduling flags come from SchedulerConfig)."""
    parser.add_argument("--trace", choices=[*TRACES, "fixed"], default="sharegpt",
                        help="synthetic workload shape (default sharegpt: 161 in / 338 out on average)")
    parser.add_argument("--num-requests", type=int, default=200, help="requests in the trace")
    parser.add_argument("--prompt-len", type=int, default=128, help="with --trace fixed")
    parser.add_argument("--output-len", type=int, default=128, help="with --trace fixed")
    parser.add_argument("--n", type=int, default=1, help="parallel samples per request")
    parser.add_argument("--beam-width", type=int, default=0, help="beam search of this width (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, prompts and sampling")
    parser.add_argument("--kv-tokens", type=int, default=16384, help="GPU KV capacity in tokens")
    parser.add_argument("--cpu-kv-tokens", type=int, default=16384, help="CPU swap capacity in tokens")
    parser.add_argument("--model-len", type=int, default=2048, help="the model's maximum context")
    parser.add_argument("--modes", default="all",
                        help="comma-separated reservation modes to compare, or 'all' (default), "
                             "or 'config' for just the --reservation one")
    parser.add_argument("--check", action="store_true",
                        help="verify KV contents and block accounting every step (slower)")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON here")
    SchedulerConfig.add_arguments(parser)


def build_requests(args: argparse.Namespace, max_model_len: int) -> list[SimulatedRequest]:
    """The trace as prompts and sampling parameters (ignore_eos, so lengths are exact).

    Synthetic lengths are drawn to fit `max_model_len`; fixed ones that do not fit are an
    InvalidArgumentError, as `pagedserve bench` refuses them, rather than clipped.
    """
    if args.trace == "fixed":
        trace: list[TraceRequest] = fixed_trace(args.num_requests, args.prompt_len, args.output_len)
        if args.prompt_len >= max_model_len or args.prompt_len + args.output_len > max_model_len:
            raise InvalidArgumentError("output_len", f"{args.prompt_len} prompt + {args.output_len} output "
                                       f"tokens do not fit the model's context of {max_model_len} tokens")
    else:
        trace = TRACES[args.trace](args.num_requests, seed=args.seed, max_total_len=max_model_len)
    trace = with_sharing(trace, n=args.n, beam_width=args.beam_width)
    requests = []
    for i, r in enumerate(trace):
        params = SamplingParams(n=r.n, max_tokens=r.output_len, ignore_eos=True, seed=args.seed + i,
                                beam_width=r.beam_width, temperature=0.0 if r.beam_width else 1.0)
        requests.append(SimulatedRequest(prompt_token_ids(i, r.prompt_len, VOCAB_SIZE, args.seed), params))
    return requests


def _modes(args: argparse.Namespace, config: SchedulerConfig) -> list[ReservationMode]:
    if args.modes == "all":
        return list(ReservationMode)
    if args.modes == "config":
        return [config.reservation]
    try:
        return [ReservationMode(m.strip()) for m in args.modes.split(",")]
    except ValueError:
        raise InvalidArgumentError("modes", f"unknown mode in {args.modes!r}") from None


def _show_finished(progress: tqdm[Any], _step: int, finished: int) -> None:
    """Move the progress bar to `finished` requests (simulate's on_step)."""
    progress.update(finished - progress.n)


def run(args: argparse.Namespace) -> int:
    """Run the simulations and print one markdown table row per reservation mode; 1 if any request failed."""
    base = SchedulerConfig.from_sources(args)
    max_model_len: int = args.model_len if base.max_model_len is None else base.max_model_len
    if base.max_model_len is None:
        base = dataclasses.replace(base, max_model_len=max_model_len)
    if not base.enable_chunked_prefill and base.max_num_batched_tokens < max_model_len:
        base = dataclasses.replace(base, max_num_batched_tokens=max_model_len)
    requests = build_requests(args, max_model_len)
    num_gpu_blocks = args.kv_tokens // base.block_size
    num_cpu_blocks = args.cpu_kv_tokens // base.block_size
    print(f"{len(requests)} {args.trace} requests (n={args.n}, beam width={args.beam_width}), "
          f"{num_gpu_blocks} GPU blocks of {base.block_size} tokens, max_num_seqs={base.max_num_seqs}",
          file=sys.stderr)
    reports: list[SimulationReport] = []
    for mode in _modes(args, base):
        config = dataclasses.replace(base, reservation=mode)
        progress = progress_bar(f"simulate {mode.value}", len(requests))
        report = simulate(config, requests, num_gpu_blocks, num_cpu_blocks, max_model_len,
                          VOCAB_SIZE, on_step=functools.partial(_show_finished, progress),
                          check_integrity=args.check)
        progress.set_postfix_str(f"{report.steps} steps", refresh=True)
        progress.close()
        reports.append(report)
    print(markdown_table([title for _, title in COLUMNS],
                         [[getattr(r, name) for name, _ in COLUMNS] for r in reports]))
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2) + "\n")
    failed = [r for r in reports if r.num_failed]
    for report in failed:
        print(f"pagedserve simulate: {report.num_failed} of {report.num_requests} requests failed under "
              f"{report.reservation}", file=sys.stderr)
    return 1 if failed else 0
