"""Every model family against HF transformers in float32 on the CPU, through the paged KV cache.

Each tiny model is saved with `save_pretrained`, loaded with `load_model`, and run through a KV cache
whose block tables are shuffled, so a sequence's blocks are never contiguous. Logits must equal HF's
(eager attention) for a whole-prompt prefill, a chunked prefill followed by decode steps, and a flat
batch mixing a prefill, a decode and a chunk of different sequences.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import (  # noqa: E402
    FAMILIES,
    LLAMA3_ROPE,
    build_hf_model,
    save_bin,
    save_config_only,
    save_safetensors_without,
    tiny_config,
)

from executor_svc.attention import AttentionMetadata, ForwardContext  # noqa: E402
from executor_svc.model_loader import dtype_from_name, eos_token_ids, load_model  # noqa: E402
from executor_svc.models import CheckpointError, UnsupportedModelError  # noqa: E402
from executor_svc.models.base import CausalLM  # noqa: E402
from executor_svc.models.layers import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedserve.errors import InvalidArgumentError  # noqa: E402

ATOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 48
PROMPT_LEN = 20
FIRST_CHUNK = 9
DECODE_STEPS = 5


def prompt(length: int, seed: int) -> list[int]:
    """Token ids above the special ids (0, 1, 2) of the tiny configs."""
    return random.Random(seed).choices(range(3, 128), k=length)


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """HF's logits for every position of `ids`: [len(ids), vocab] float32."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


class PagedSequences:
    """Sequences sharing one KV cache; each new block comes from a shuffled free list."""

    def __init__(self, model: CausalLM, seed: int = 0) -> None:
        self.model = model
        self.cache = torch.zeros(NUM_BLOCKS, model.num_layers, 2, model.num_kv_heads, BLOCK_SIZE,
                                 model.head_size)
        self.free = random.Random(seed).sample(range(NUM_BLOCKS), NUM_BLOCKS)
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, new_tokens: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """One forward over the new tokens of every named sequence; each one's logits [n, vocab]."""
        starts, tables = [], []
        for name, tokens in new_tokens.items():
            start = self.lengths.get(name, 0)
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK_SIZE < start + len(tokens):
                table.append(self.free.pop())
            starts.append(start)
            tables.append(table)
            self.lengths[name] = start + len(tokens)
        meta = AttentionMetadata.build(starts, [len(t) for t in new_tokens.values()], tables, BLOCK_SIZE)
        ids = torch.tensor([token for tokens in new_tokens.values() for token in tokens])
        with torch.no_grad():
            hidden = self.model(ids, meta.positions, ForwardContext(self.cache, meta))   # [T, hidden]
            logits = self.model.compute_logits(hidden)                                      # [T, vocab]
        rows = logits.split(list(meta.query_lens_list))
        return dict(zip(new_tokens, rows, strict=True))


@dataclass
class Pair:
    """An HF model and our model loaded from its saved checkpoint."""

    hf: torch.nn.Module
    model: CausalLM


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """Each family, saved as a single model.safetensors."""
    hf = build_hf_model(tiny_config(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, _ = load_model(path, torch.float32, "cpu")
    return Pair(hf, model)


def assert_prefill_matches(hf: torch.nn.Module, model: CausalLM, seed: int = 0) -> None:
    """A PROMPT_LEN prompt as one prefill through shuffled blocks gives HF's logits at every position."""
    ids = prompt(PROMPT_LEN, seed)
    paged = PagedSequences(model, seed)
    ours = paged.step({"s": ids})["s"]
    table = paged.tables["s"]
    assert table != list(range(table[0], table[0] + len(table))), "blocks should not be contiguous"
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Every family against HF


def test_prefill_matches_hf(pair: Pair) -> None:
    assert_prefill_matches(pair.hf, pair.model)


def test_chunked_prefill_then_decode_matches_hf(pair: Pair) -> None:
    ids = prompt(PROMPT_LEN, seed=1)
    paged = PagedSequences(pair.model, seed=1)
    first = paged.step({"s": ids[:FIRST_CHUNK]})["s"]
    rest = paged.step({"s": ids[FIRST_CHUNK:]})["s"]
    expected = hf_logits(pair.hf, ids)
    torch.testing.assert_close(torch.cat([first, rest]), expected, atol=ATOL, rtol=0)
    for _ in range(DECODE_STEPS):
        ids.append(int(expected[-1].argmax()))
        ours = paged.step({"s": ids[-1:]})["s"]
        expected = hf_logits(pair.hf, ids)
        torch.testing.assert_close(ours[0], expected[-1], atol=ATOL, rtol=0)


def test_mixed_batch_matches_each_sequence_alone(pair: Pair) -> None:
    # x: a whole prompt; y: one decode token after 10 cached; z: a 4-token chunk after 5 cached.
    seqs = {"x": prompt(7, 2), "y": prompt(11, 3), "z": prompt(9, 4)}
    cached = {"y": 10, "z": 5}
    batch = PagedSequences(pair.model, seed=2)
    batch.step({name: seqs[name][:n] for name, n in cached.items()})
    mixed = batch.step({name: ids[cached.get(name, 0):] for name, ids in seqs.items()})
    for name, ids in seqs.items():
        alone = PagedSequences(pair.model, seed=3)
        if name in cached:
            alone.step({name: ids[: cached[name]]})
        expected = alone.step({name: ids[cached.get(name, 0):]})[name]
        torch.testing.assert_close(mixed[name], expected, atol=ATOL, rtol=0)
        reference = hf_logits(pair.hf, ids)[cached.get(name, 0):]
        torch.testing.assert_close(mixed[name], reference, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint formats


def test_sharded_safetensors_checkpoint(tmp_path: Path) -> None:
    hf = build_hf_model(tiny_config("llama_gqa_llama3"))
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_model(tmp_path, torch.float32, "cpu")
    assert_prefill_matches(hf, model)


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoint(tmp_path: Path, shards: int) -> None:
    # GPT-2's Conv1D weights are stored transposed; the .bin keeps lm_head.weight, tied to wte.
    hf = build_hf_model(tiny_config("gpt2"))
    save_bin(hf, tmp_path, shards)
    model, _ = load_model(tmp_path, torch.float32, "cpu")
    assert_prefill_matches(hf, model)


def test_dummy_load_builds_real_shapes_without_a_checkpoint(tmp_path: Path) -> None:
    save_config_only(tiny_config("llama_gqa_llama3"), tmp_path)
    model, config = load_model(tmp_path, torch.bfloat16, "cpu", load_format="dummy", max_model_len=64)
    params = dict(model.named_parameters())
    assert params["model.embed_tokens.weight"].shape == (128, 64)
    # q: 4 heads x 16, k and v: 2 heads x 16 each.
    assert params["model.layers.2.self_attn.qkv_proj.weight"].shape == (4 * 16 + 2 * 2 * 16, 64)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert params["lm_head.weight"].shape == (128, 64)
    assert (model.num_layers, model.num_kv_heads, model.head_size, model.max_model_len) == (3, 2, 16, 64)
    for param in params.values():
        assert param.dtype == torch.bfloat16
        assert param.abs().max() <= 1e-3 and param.abs().max() > 0
    logits = PagedSequences(model).step({"s": prompt(6, 0)})["s"]
    assert logits.shape == (6, config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# Errors that tell the caller what to change


def test_unknown_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    config = tiny_config("llama")
    config.architectures = ["FooForCausalLM"]
    save_config_only(config, tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'FooForCausalLM'.*LlamaForCausalLM"):
        load_model(tmp_path, torch.float32, "cpu")


def test_an_architecture_transformers_does_not_know_is_refused_first_with_ours_listed(tmp_path: Path) -> None:
    """Checked on the raw config.json before transformers (which would refuse the model type with its
    own message) and before any weight is read (the weights file here is not even a checkpoint)."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["RwkvNextForCausalLM"],
                                                      "model_type": "rwkv-next", "hidden_size": 64}))
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UnsupportedModelError) as raised:
        load_model(tmp_path, torch.float32, "cpu")
    assert str(raised.value) == ("architecture 'RwkvNextForCausalLM' is not supported; supported: "
                                 "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM")


def test_missing_weights_file_names_the_directory_and_the_files(tmp_path: Path) -> None:
    save_config_only(tiny_config("gpt2"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin") as error:
        load_model(tmp_path, torch.float32, "cpu")
    assert str(tmp_path) in str(error.value)


def test_missing_config_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path, torch.float32, "cpu")


def test_checkpoint_missing_a_tensor_names_it(tmp_path: Path) -> None:
    hf = build_hf_model(tiny_config("llama_tied"))
    save_safetensors_without(hf, tmp_path, drop="model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"lacks.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tmp_path, torch.float32, "cpu")


def test_checkpoint_with_an_unknown_tensor_names_it(tmp_path: Path) -> None:
    hf = build_hf_model(tiny_config("opt_pre_ln"))
    save_safetensors_without(hf, tmp_path, drop="", extra={"model.decoder.adapter.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"model\.decoder\.adapter\.weight"):
        load_model(tmp_path, torch.float32, "cpu")


def test_checkpoint_tensor_of_the_wrong_shape_names_it(tmp_path: Path) -> None:
    hf = build_hf_model(tiny_config("llama"))
    name = "model.layers.0.mlp.down_proj.weight"
    save_safetensors_without(hf, tmp_path, drop=name, extra={name: torch.zeros(64, 100)})
    with pytest.raises(CheckpointError, match=rf"{name}.*has shape \(64, 100\), expected \(64, 128\)"):
        load_model(tmp_path, torch.float32, "cpu")


def test_mistral_sliding_window_must_cover_the_model_length(tmp_path: Path) -> None:
    config = tiny_config("mistral")
    config.sliding_window = 32
    save_config_only(config, tmp_path)
    with pytest.raises(UnsupportedModelError, match="sliding_window=32"):
        load_model(tmp_path, torch.float32, "cpu", load_format="dummy")
    # No sequence longer than the window: the window never applies.
    model, _ = load_model(tmp_path, torch.float32, "cpu", load_format="dummy", max_model_len=32)
    assert model.max_model_len == 32


def test_max_model_len_beyond_the_position_limit_is_refused(tmp_path: Path) -> None:
    save_config_only(tiny_config("gpt2"), tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"^max_model_len: 129 must be in \[1, 128\]") as raised:
        load_model(tmp_path, torch.float32, "cpu", load_format="dummy", max_model_len=129)
    assert raised.value.field == "max_model_len"      # the setting to change, named in the error line


def test_unsupported_rope_type_names_the_field() -> None:
    config = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters\.rope_type='yarn'"):
        RotaryEmbedding.from_config(config, head_size=16, max_position=8)


def test_rope_settings_in_the_transformers_4_fields_are_read() -> None:
    # transformers 4 wrote the base outside the scaling dict, and older configs say `type`.
    scaling = {key: value for key, value in LLAMA3_ROPE.items() if key not in ("rope_type", "rope_theta")}
    legacy = SimpleNamespace(rope_theta=10000.0, rope_scaling={**scaling, "type": "llama3"})
    current = SimpleNamespace(rope_parameters=dict(LLAMA3_ROPE))
    old = RotaryEmbedding.from_config(legacy, head_size=16, max_position=64).cos_sin_cache
    new = RotaryEmbedding.from_config(current, head_size=16, max_position=64).cos_sin_cache
    plain = RotaryEmbedding.from_config(SimpleNamespace(), head_size=16, max_position=64).cos_sin_cache
    assert torch.equal(old, new) and not torch.equal(new, plain)


def test_dtype_names_and_eos_ids(tmp_path: Path) -> None:
    assert dtype_from_name("bfloat16") is torch.bfloat16 and dtype_from_name("fp16") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        dtype_from_name("int8")
    assert eos_token_ids(SimpleNamespace(eos_token_id=2)) == [2]
    assert eos_token_ids(SimpleNamespace(eos_token_id=[128001, 128009])) == [128001, 128009]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert eos_token_ids(SimpleNamespace(eos_token_id=2), tmp_path) == [2, 7]


# ---------------------------------------------------------------------------------------------------------
# Tensor-parallel shards: each rank cuts its part out of the full weight, and the parts recombine


def test_tensor_parallel_shards_recombine() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 8)                                           # [T, in]
    w, b = torch.randn(12, 8), torch.randn(12)

    def loaded(layer: torch.nn.Module,
               parts: dict[object, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.nn.Module:
        """`layer` after loading each (weight, bias) under its shard id."""
        for shard_id, (weight, bias) in parts.items():
            layer.weight_loader(layer.weight, weight, shard_id)
            if bias is not None:
                layer.weight_loader(layer.bias, bias, shard_id)
        return layer

    column = [loaded(ColumnParallelLinear(8, 12, True, r, 2), {None: (w, b)}) for r in range(2)]
    torch.testing.assert_close(torch.cat([layer(x) for layer in column], -1), x @ w.T + b)

    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    merged = [loaded(MergedColumnParallelLinear(8, [6, 6], False, r, 2), {0: (gate, None), 1: (up, None)})
              for r in range(2)]
    for r, layer in enumerate(merged):
        torch.testing.assert_close(layer(x), x @ torch.cat([gate[3 * r:3 * r + 3], up[3 * r:3 * r + 3]]).T)

    row_w = torch.randn(4, 12)
    row = [loaded(RowParallelLinear(12, 4, True, r, 2), {None: (row_w, b[:4])}) for r in range(2)]
    h = x @ w.T                                                     # [T, 12], split 6 + 6 across ranks
    torch.testing.assert_close(row[0](h[:, :6]) + row[1](h[:, 6:]), h @ row_w.T + b[:4])
    row[0].reduce = row[1].reduce = lambda partial: 2 * partial   # an "all-reduce" of two equal halves
    torch.testing.assert_close(row[0](h[:, :6]), 2 * (h[:, :6] @ row_w[:, :6].T) + b[:4])

    vocab = torch.randn(7, 8)                                       # 7 rows over 2 ranks: 4 + 3 (+1 pad)
    ids = torch.tensor([0, 3, 4, 6])
    embeds = [loaded(VocabParallelEmbedding(7, 8, r, 2), {None: (vocab, None)}) for r in range(2)]
    torch.testing.assert_close(embeds[0](ids) + embeds[1](ids), vocab[ids])
    heads = [loaded(ParallelLMHead(7, 8, tp_rank=r, tp_size=2), {None: (vocab, None)}) for r in range(2)]
    heads[0].gather = heads[1].gather = None
    joined = torch.cat([heads[0](x), heads[1](x)], -1)[:, :7]      # what an all-gather would assemble
    torch.testing.assert_close(joined, x @ vocab.T)


@pytest.mark.parametrize(("num_kv_heads", "tp_size"), [(2, 2), (1, 2), (2, 4)])
def test_qkv_shards_split_query_heads_and_split_or_replicate_kv_heads(num_kv_heads: int,
                                                                       tp_size: int) -> None:
    head, num_heads = 2, 4
    q = torch.randn(num_heads * head, 8)
    k, v = torch.randn(num_kv_heads * head, 8), torch.randn(num_kv_heads * head, 8)
    for rank in range(tp_size):
        layer = QKVParallelLinear(8, head, num_heads, num_kv_heads, False, rank, tp_size)
        layer.weight_loader(layer.weight, torch.cat([q, k, v]))   # fused, as GPT-2 stores it
        q_part, k_part, v_part = layer.weight.split([layer.q_size, layer.kv_size, layer.kv_size])
        heads_per_rank = num_heads // tp_size
        kv_head = rank * num_kv_heads // tp_size                   # the KV head this rank serves
        torch.testing.assert_close(q_part, q[rank * heads_per_rank * head:(rank + 1) * heads_per_rank * head])
        if num_kv_heads >= tp_size:
            kv_rows = slice(rank * layer.kv_size, (rank + 1) * layer.kv_size)
        else:
            kv_rows = slice(kv_head * head, (kv_head + 1) * head)
        torch.testing.assert_close(k_part, k[kv_rows])
        torch.testing.assert_close(v_part, v[kv_rows])
