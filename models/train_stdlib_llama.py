"""Train the embedded default model: a small Hugging Face Llama trained on the Python standard library.

PagedServe ships this model so `pagedserve serve` works on a machine with no model hub (see
`protos/pagedserve/default_model.py`). The script is self-contained and reproducible:

1. corpus: every `*.py` file under `sysconfig.get_paths()["stdlib"]`, sorted by relative path, without
   test code, idlelib, site-packages and files that are not valid UTF-8; ~1% of files (chosen by a hash
   of the relative path) are held out for validation;
2. tokenizer: byte-level BPE trained with `tokenizers` on the training files (`<unk>`=0, `<s>`=1,
   `</s>`=2, like Llama), with a post-processor that prepends `<s>`;
3. model: `transformers.LlamaForCausalLM` (tied embeddings, grouped-query attention) trained on random
   windows of the token stream with AdamW, linear warmup and cosine decay;
4. output: a normal Hugging Face model directory (bfloat16 safetensors, config, generation config,
   tokenizer) plus `training.json` with the recipe, corpus statistics and loss curve.

The defaults are the shipped recipe; on one H100 training takes about four and a half minutes:

    python models/train_stdlib_llama.py --device cuda --max-minutes 8

The corpus is small (about 3 million tokens), so the model overfits after ~8 epochs without
regularisation: with no dropout the validation loss bottoms out near 2.74 after ~750 steps of 64x512
tokens and then climbs; with 0.3 residual dropout it keeps falling, to about 2.32 after 10,000 steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "stdlib-llama"
# Llama's special token ids: the ids are part of the model's contract (config, generation config).
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
# The chat template of /v1/chat/completions: a code model has no chat format of its own, so system and
# user messages become comment lines and the assistant's turns are code; generation goes on with code.
CHAT_TEMPLATE = ("{{- bos_token }}"
                 "{%- for message in messages %}"
                 "{%- if message['role'] == 'assistant' %}"
                 "{{- message['content'] + '\\n' }}"
                 "{%- else %}"
                 "{%- for line in message['content'].split('\\n') %}"
                 "{{- '# ' + line + '\\n' }}"
                 "{%- endfor %}"
                 "{%- endif %}"
                 "{%- endfor %}")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Directory names whose files are left out wherever they appear in a relative path.
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
VALIDATION_PERCENT = 1
SAMPLE_PROMPT = "def fibonacci(n):"
SAMPLE_NEW_TOKENS = 48


@dataclass
class Corpus:
    """The stdlib sources split into training and validation documents, with what was left out."""

    root: str
    train_paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)
    skipped_excluded: int = 0
    skipped_non_utf8: list[str] = field(default_factory=list)
    skipped_empty: int = 0

    def describe(self) -> dict[str, Any]:
        """Corpus statistics for training.json (no document text)."""
        return {
            "python_version": sys.version,
            "python_implementation": platform.python_implementation(),
            "stdlib_path": self.root,
            "selection": "*.py under the stdlib path, sorted by relative POSIX path; files in any directory "
            f"named {sorted(EXCLUDED_DIRS)} left out (covers lib2to3/tests), as are files that are not "
            "valid UTF-8 and empty/whitespace-only files",
            "validation_rule": f"sha256(relative path) mod 100 < {VALIDATION_PERCENT} (at least one file)",
            "document_format": f"{BOS_TOKEN} file text {EOS_TOKEN}, files concatenated in sorted order",
            "files_train": len(self.train_paths),
            "files_validation": len(self.val_paths),
            "validation_files": self.val_paths,
            "bytes_train": sum(len(d.encode("utf-8")) for d in self.train_docs),
            "bytes_validation": sum(len(d.encode("utf-8")) for d in self.val_docs),
            "skipped_excluded_dirs": self.skipped_excluded,
            "skipped_non_utf8": self.skipped_non_utf8,
            "skipped_empty": self.skipped_empty,
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; every one of them ends up in training.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--stdlib-dir", type=Path, default=None,
                   help="source tree to train on (default: this interpreter's sysconfig stdlib path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    # Tokenizer.
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--min-frequency", type=int, default=2, help="BPE merges need a pair seen this often")
    # Model.
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--num-hidden-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-key-value-heads", type=int, default=4)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rms-norm-eps", type=float, default=1e-5)
    p.add_argument("--initializer-range", type=float, default=0.02)
    # Optimisation.
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=12000, help="also the length of the LR schedule")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this much wall time (the LR schedule still follows --max-steps)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.3,
                   help="training-only dropout on the embedding, attention and MLP outputs (not saved)")
    # Reporting.
    p.add_argument("--log-every", type=int, default=100, help="train loss is averaged over this many steps")
    p.add_argument("--eval-every", type=int, default=1000)
    args = p.parse_args(argv)
    if args.seq_len > args.max_position_embeddings:
        p.error("--seq-len must not exceed --max-position-embeddings")
    if args.warmup_steps >= args.max_steps:
        args.warmup_steps = max(1, args.max_steps // 10)
    return args


def is_validation(rel_path: str) -> bool:
    """Whether a file is held out; a content-independent hash keeps the split stable across machines."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def is_excluded(rel_parts: Sequence[str]) -> bool:
    """Whether any directory on the relative path is one of the excluded ones."""
    return any(part in EXCLUDED_DIRS for part in rel_parts[:-1])


def collect_corpus(root: Path) -> Corpus:
    """Read the stdlib sources in a deterministic order and split them into train and validation."""
    corpus = Corpus(root=str(root))
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    for rel, path in files:
        if is_excluded(rel.split("/")):
            corpus.skipped_excluded += 1
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped_non_utf8.append(rel)
            continue
        if not text.strip():
            corpus.skipped_empty += 1  # empty __init__.py files would only teach "<s></s>"
            continue
        if is_validation(rel):
            corpus.val_paths.append(rel)
            corpus.val_docs.append(text)
        else:
            corpus.train_paths.append(rel)
            corpus.train_docs.append(text)
    if not corpus.val_docs and corpus.train_docs:
        # A tiny tree may hash no file into validation; hold out the last one instead.
        corpus.val_paths.append(corpus.train_paths.pop())
        corpus.val_docs.append(corpus.train_docs.pop())
    if not corpus.train_docs:
        raise SystemExit(f"no usable *.py files under {root}")
    return corpus


def train_tokenizer(docs: Sequence[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE (any UTF-8 text round-trips) with Llama's special tokens and a BOS post-processor."""
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    ids = (tok.token_to_id(UNK_TOKEN), tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN))
    assert ids == (UNK_ID, BOS_ID, EOS_ID), ids
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return tok


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """One token stream of `<s> text </s>` documents: training sees the BOS that prompts start with."""
    encodings = tok.encode_batch(list(docs), add_special_tokens=True)  # parallel in Rust
    stream: list[int] = []
    for enc in encodings:
        stream.extend(enc.ids)
        stream.append(EOS_ID)
    return torch.tensor(stream, dtype=torch.long)


def build_model(args: argparse.Namespace, vocab_size: int) -> LlamaForCausalLM:
    """A freshly initialised Llama; the seed is set first so initial weights are reproducible."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        rms_norm_eps=args.rms_norm_eps,
        initializer_range=args.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        use_cache=True,  # the saved config is for inference; training passes use_cache=False
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return model


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on what each block adds to the residual stream, as GPT-2 does; HF Llama has none.

    The corpus is small (a few million tokens), so the model overfits within a few epochs; dropout lets it
    train longer. Forward hooks keep the architecture and the saved checkpoint plain Llama, and they act
    only in training mode. Returns the hook handles so the caller can remove them before saving.
    """
    if p <= 0:
        return []

    def hook(module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention returns (hidden states, attention weights)
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    modules: list[torch.nn.Module] = [model.model.embed_tokens]
    for layer in model.model.layers:
        modules += [layer.self_attn, layer.mlp]
    return [m.register_forward_hook(hook) for m in modules]


def resolve_device(choice: str) -> torch.device:
    """`auto` picks CUDA when available."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is false")
    return torch.device(choice)


def setup_backend(device: torch.device) -> bool:
    """Enable fast math on CUDA; returns whether bf16 autocast is used (weights stay float32)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.cuda.is_bf16_supported()


def autocast(device: torch.device, use_bf16: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when supported, otherwise plain float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio * lr` at `max_steps`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included) and none on norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps,
                             fused=device.type == "cuda")


def sample_windows(data: torch.Tensor, gen: torch.Generator, batch_size: int, seq_len: int) -> torch.Tensor:
    """`batch_size` random windows of `seq_len + 1` tokens, starts drawn from the seeded CPU generator."""
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    return data[(starts[:, None] + offsets).to(data.device, non_blocking=True)]


def lm_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the windows (float32 softmax)."""
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))


def validation_windows(val: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The validation stream cut into non-overlapping windows (the same ones at every evaluation)."""
    n = (val.numel() - 1) // seq_len
    if n == 0:
        return val[None, :]
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    return val[idx]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int, device: torch.device,
             use_bf16: bool) -> float:
    """Token-weighted mean validation loss."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(0, windows.size(0), batch_size):
        batch = windows[i:i + batch_size]
        with autocast(device, use_bf16):
            total += lm_loss(model, batch) * batch[:, 1:].numel()
    model.train()
    return total.item() / windows[:, 1:].numel()


@dataclass
class TrainResult:
    """What the training loop reports."""

    steps: int = 0
    stopped_by: str = "max_steps"
    train_curve: list[dict[str, float]] = field(default_factory=list)
    val_curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_seen: int = 0


def train(model: LlamaForCausalLM, train_data: torch.Tensor, val_data: torch.Tensor,
          args: argparse.Namespace, device: torch.device, use_bf16: bool) -> TrainResult:
    """The training loop: random windows, AdamW, warmup + cosine, clipping, periodic logging and eval."""
    model.to(device).train()
    hooks = add_residual_dropout(model, args.dropout)
    optimizer = make_optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    train_data = train_data.to(device)
    val_windows = validation_windows(val_data, args.seq_len).to(device)
    result = TrainResult()
    # Losses stay on the device between log points: a .item() per step would stall the GPU queue.
    loss_sum = torch.zeros((), device=device)
    t0 = last_t = time.perf_counter()
    last_step = 0
    for step in range(args.max_steps):
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = sample_windows(train_data, gen, args.batch_size, args.seq_len)
        with autocast(device, use_bf16):
            loss = lm_loss(model, windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        result.steps = step + 1
        result.tokens_seen += args.batch_size * args.seq_len
        out_of_time = args.max_minutes is not None and time.perf_counter() - t0 > args.max_minutes * 60
        last = result.steps == args.max_steps or out_of_time
        if result.steps % args.log_every == 0 or last:
            # .item() synchronises with the device, so the time below is real.
            mean_loss = loss_sum.item() / (result.steps - last_step)
            now = time.perf_counter()
            tok_s = (result.steps - last_step) * args.batch_size * args.seq_len / (now - last_t)
            point = {"step": result.steps, "loss": round(mean_loss, 4), "lr": lr,
                     "tokens_per_s": round(tok_s), "elapsed_s": round(now - t0, 1)}
            result.train_curve.append(point)
            print(f"step {result.steps:6d}/{args.max_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                  f"{tok_s:,.0f} tok/s  {now - t0:7.1f}s", flush=True)
            loss_sum.zero_()
            last_step, last_t = result.steps, now
        if result.steps % args.eval_every == 0 or last:
            val_loss = evaluate(model, val_windows, args.batch_size, device, use_bf16)
            result.val_curve.append({"step": result.steps, "val_loss": round(val_loss, 4),
                                     "elapsed_s": round(time.perf_counter() - t0, 1)})
            print(f"step {result.steps:6d}  val_loss {val_loss:.4f}", flush=True)
            last_t = time.perf_counter()  # keep evaluation time out of the next tokens/s figure
        if out_of_time:
            result.stopped_by = "max_minutes"
            break
    result.seconds = time.perf_counter() - t0
    for handle in hooks:
        handle.remove()
    return result


def save_tokenizer(tok: Tokenizer, out_dir: Path, max_len: int) -> None:
    """Save tokenizer.json and a tokenizer_config.json (with the chat template) that 4.x and 5.x load as
    PreTrainedTokenizerFast."""
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,  # the clean-up would rewrite code such as "x ." on decode
        model_input_names=["input_ids", "attention_mask"],  # Llama takes no token_type_ids
    )
    hf_tok.save_pretrained(out_dir)
    # transformers 5 writes "TokenizersBackend", a class name older releases do not know.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(model: LlamaForCausalLM, out_dir: Path) -> None:
    """Save config, generation config and bfloat16 safetensors weights (tied lm_head stored once)."""
    model.to("cpu", dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    # The weights file is written owner-only (0600); make it readable like the other files, so a
    # service running as another user (a container, say) can load the copied directory.
    (out_dir / "model.safetensors").chmod(0o644)


def sanity_sample(out_dir: Path, device: torch.device) -> tuple[str, list[int]]:
    """Reload the saved directory with the Auto classes and greedily complete the sample prompt."""
    tok = PreTrainedTokenizerFast.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device).eval()
    enc = tok(SAMPLE_PROMPT, return_tensors="pt").to(device)
    assert enc.input_ids[0, 0].item() == BOS_ID, "tokenizer must prepend <s>"
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=SAMPLE_NEW_TOKENS, do_sample=False, pad_token_id=EOS_ID)
    ids = out[0].tolist()
    return tok.decode(ids, skip_special_tokens=True), ids


def device_name(device: torch.device) -> str:
    """A human-readable device description for training.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def timed(label: str, timings: dict[str, float]) -> Iterator[None]:
    """Record the wall time of a `with` block under `label` and print it."""
    start = time.perf_counter()
    yield
    timings[label] = round(time.perf_counter() - start, 2)
    print(f"[{label}] {timings[label]:.2f}s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the corpus and tokenizer, train, save the model directory and training.json."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    use_bf16 = setup_backend(device)
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    root = (args.stdlib_dir or Path(sysconfig.get_paths()["stdlib"])).resolve()
    with timed("read_corpus_s", timings):
        corpus = collect_corpus(root)
    print(f"corpus: {len(corpus.train_docs)} train / {len(corpus.val_docs)} validation files from {root}")
    with timed("train_tokenizer_s", timings):
        tok = train_tokenizer(corpus.train_docs, args.vocab_size, args.min_frequency)
    with timed("tokenize_s", timings):
        train_data = encode_documents(tok, corpus.train_docs)
        val_data = encode_documents(tok, corpus.val_docs)
    print(f"tokens: {train_data.numel():,} train / {val_data.numel():,} validation")
    if train_data.numel() <= args.seq_len:
        raise SystemExit("training corpus is shorter than one window")

    model = build_model(args, tok.get_vocab_size())
    n_params = count_params(model)
    print(f"model: {n_params:,} parameters; device {device_name(device)}; bf16 autocast {use_bf16}")
    result = train(model, train_data, val_data, args, device, use_bf16)
    timings["train_s"] = round(result.seconds, 2)
    print(f"trained {result.steps} steps in {result.seconds:.1f}s (stopped by {result.stopped_by})")

    with timed("save_s", timings):
        save_model(model, out_dir)
        save_tokenizer(tok, out_dir, args.max_position_embeddings)
    with timed("sample_s", timings):
        sample, sample_ids = sanity_sample(out_dir, device)
    print(f"--- greedy sample ---\n{sample}\n---------------------", flush=True)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)

    corpus_info = corpus.describe() | {"tokens_train": train_data.numel(),
                                       "tokens_validation": val_data.numel()}
    report = {
        "description": "PagedServe embedded default model: a small Llama trained on the Python stdlib",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "hyperparameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(),
                      "special_tokens": {UNK_TOKEN: UNK_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID},
                      "pre_tokenizer": "ByteLevel(add_prefix_space=False)",
                      "post_processor": f"TemplateProcessing: {BOS_TOKEN} $A",
                      "trained_on": "training files only"},
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, "tie_word_embeddings": True,
                  "saved_dtype": "bfloat16", "train_dtype": "float32 weights" + (
                      ", bf16 autocast" if use_bf16 else ""), "tf32": device.type == "cuda",
                  "training_dropout": args.dropout,
                  "dropout_on": "embedding, attention and MLP outputs, through forward hooks (training only; "
                                "the saved config is plain Llama with no dropout)"},
        "optimizer": {"name": "AdamW", "betas": [args.beta1, args.beta2], "eps": args.adam_eps,
                      "weight_decay": args.weight_decay, "weight_decay_on": "parameters with dim >= 2",
                      "schedule": "linear warmup, cosine decay to min_lr_ratio * lr at max_steps",
                      "grad_clip": args.grad_clip,
                      "data": f"random windows of seq_len+1 tokens, torch.Generator seeded with {args.seed}"},
        "corpus": corpus_info,
        "steps_done": result.steps,
        "stopped_by": result.stopped_by,
        "tokens_seen": result.tokens_seen,
        "epochs_seen": round(result.tokens_seen / train_data.numel(), 2),
        "train_loss_curve": result.train_curve,
        "validation_loss_curve": result.val_curve,
        "final_validation_loss": result.val_curve[-1]["val_loss"] if result.val_curve else None,
        "timings_s": timings,
        "device": device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "cuda": torch.version.cuda},
        "sample": {"prompt": SAMPLE_PROMPT, "max_new_tokens": SAMPLE_NEW_TOKENS, "decoding": "greedy",
                   "text": sample, "token_ids": sample_ids},
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir} ({result.steps} steps, final val loss "
          f"{report['final_validation_loss']})")


if __name__ == "__main__":
    main()
