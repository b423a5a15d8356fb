"""Per-token cost of streaming detokenization on the embedded model's tokenizer: the window decoding
from Python against tokenizers' DecodeStream.

Each workload is an output streamed one token per `add_tokens` call after a short prompt, as the
frontend does for a request that streams, then flushed. For each way the detokenizer can run, the
time of the whole output over its tokens is reported in µs per token, the best of `--repeats` runs (the
ways take turns within each round, so that other load on the machine hits them alike; the medians go
to the JSON output):

- `window`: `IncrementalDetokenizer(..., decode_stream=False)`, two decodes of a few-token window
  from Python per token (the path slow tokenizers take);
- `stream`: `IncrementalDetokenizer(...)`, which takes tokenizers' `DecodeStream` for this fast
  tokenizer;
- `raw step`: `DecodeStream.step` alone, with no stop strings and no bookkeeping: the floor;
- `baseline` (with `--baseline FILE`): the `IncrementalDetokenizer` of another tree's detokenizer.py,
  e.g. `git show 890e0d5:scheduler_svc/detokenizer.py > /tmp/detokenizer_before.py`.

Both detokenizer paths must stream the same chunks, and the script checks that they do before timing.
Run with `python benchmarks/detokenizer_bench.py [--json out.json]`; pin it to one core with
`taskset -c 0` for steadier numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.tables import markdown_table
from pagedserve.default_model import default_model_dir
from scheduler_svc.detokenizer import IncrementalDetokenizer, backend_tokenizer
from scheduler_svc.tokenizer import encode_prompt, load_tokenizer

PROMPT = "def parse_args(argv):"
MULTIBYTE = "Le café est très bon. 中文文本测试, 日本語も少し. Party 🎉 über alles! Ça va? ✓ ±5 °C. "


@dataclass(frozen=True)
class Workload:
    """One output to stream: its name, its text, and the stop strings of its request."""

    name: str
    text: str
    stop: tuple[str, ...] = ()


def workloads(num_chars: int) -> list[Workload]:
    """Python source (what the embedded model writes), with and without stop strings, and text full of
    characters the model's byte-level vocabulary splits over several tokens."""
    source = inspect.getsource(textwrap) * (1 + num_chars // len(inspect.getsource(textwrap)))
    multibyte = MULTIBYTE * (1 + num_chars // len(MULTIBYTE))
    return [
        Workload("Python source", source[:num_chars]),
        Workload("Python source, 2 stop strings", source[:num_chars], ("\nclass Never", "\n\n\n\n")),
        Workload("accented, CJK, emoji text", multibyte[:num_chars]),
    ]


def stream_detokenizer(tokenizer, prompt: list[int], output: list[int], stop: tuple[str, ...],
                       decode_stream: bool | None, detokenizer: type = IncrementalDetokenizer) -> list[str]:
    """Stream `output` one token per call; the chunks, the flushed rest last. `decode_stream=None`
    leaves the argument out (a baseline detokenizer may not have it)."""
    options = {} if decode_stream is None else {"decode_stream": decode_stream}
    det = detokenizer(tokenizer, prompt, stop=stop, **options)
    chunks = [det.add_tokens((token,)).text for token in output]
    chunks.append(det.flush())
    return chunks


def raw_steps(tokenizer, prompt: list[int], output: list[int]) -> None:
    """What DecodeStream alone costs over the same tokens."""
    from tokenizers.decoders import DecodeStream

    backend = backend_tokenizer(tokenizer)
    stream = DecodeStream(ids=prompt[-5:], skip_special_tokens=True)
    for token in output:
        stream.step(backend, token)


def per_token_us(runs: dict[str, Callable[[], object]], num_tokens: int, repeats: int) -> dict[str, float]:
    """Best and median µs per token of each of `runs` over `repeats` rounds, the runs taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) / num_tokens * 1e6)
    return {f"{name}_us": min(times) for name, times in samples.items()} | {
        f"{name}_median_us": statistics.median(times) for name, times in samples.items()}


def load_baseline(path: Path) -> type:
    """The `IncrementalDetokenizer` class of the detokenizer module at `path`."""
    spec = importlib.util.spec_from_file_location("baseline_detokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.IncrementalDetokenizer


def measure(tokenizer, workload: Workload, repeats: int, baseline: type | None) -> dict[str, object]:
    """The costs of one workload, after checking that every detokenizer streams the same chunks."""
    prompt = encode_prompt(tokenizer, PROMPT)
    output = tokenizer.encode(workload.text, add_special_tokens=False)
    stop = workload.stop
    window = stream_detokenizer(tokenizer, prompt, output, stop, False)
    runs: dict[str, Callable[[], object]] = {
        "window": lambda: stream_detokenizer(tokenizer, prompt, output, stop, False),
        "stream": lambda: stream_detokenizer(tokenizer, prompt, output, stop, True),
        "raw_step": lambda: raw_steps(tokenizer, prompt, output),
    }
    if baseline is not None:
        runs["baseline"] = lambda: stream_detokenizer(tokenizer, prompt, output, stop, None, baseline)
    for name in ("stream", "baseline"):
        if name in runs and runs[name]() != window:
            raise AssertionError(f"{workload.name}: {name} streamed other chunks than the window decoding")
    costs = per_token_us(runs, len(output), repeats)
    return {"workload": workload.name, "tokens": len(output), **costs,
            "speedup": costs["window_us"] / costs["stream_us"]}


def main() -> int:
    """Measure every workload and print a table (and JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=20_000, help="characters of text per workload")
    parser.add_argument("--repeats", type=int, default=15, help="rounds per workload; the best counts")
    parser.add_argument("--baseline", type=Path, help="another tree's detokenizer.py, to time as well")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_dir())
    baseline = None if args.baseline is None else load_baseline(args.baseline)
    rows = [measure(tokenizer, w, args.repeats, baseline) for w in workloads(args.chars)]
    headers = ["workload", "tokens", "window µs/token", "stream µs/token", "raw step µs/token",
               "window ÷ stream"]
    if baseline is not None:
        headers.insert(2, "baseline µs/token")
    table = []
    for r in rows:
        row = [r["workload"], r["tokens"], round(r["window_us"], 2), round(r["stream_us"], 2),
               round(r["raw_step_us"], 2), round(r["speedup"], 2)]
        if baseline is not None:
            row.insert(2, round(r["baseline_us"], 2))
        table.append(row)
    print(markdown_table(headers, table))
    if args.json is not None:
        import tokenizers
        import transformers

        args.json.write_text(json.dumps({
            "benchmark": "detokenizer", "python": platform.python_version(), "machine": platform.machine(),
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
            "model": default_model_dir(), "rows": rows,
            "args": vars(args) | {"json": str(args.json), "baseline": str(args.baseline)},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
