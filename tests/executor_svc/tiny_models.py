"""Tiny Hugging Face models of every supported family, saved the ways real checkpoints are.

HF's default init (std 0.02) makes a tiny model's attention nearly uniform and its logits nearly
equal, which would hide a wrong rotary or a misplaced norm. `randomize` gives every weight a scale at
which attention is sharp and logits spread, so a wrong detail shows far above the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 128
HIDDEN = 64
MAX_POSITIONS = 128
# Token ids of the config, inside the vocabulary.
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 128,
                "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-5, **SPECIAL_IDS}
OPT_COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "ffn_dim": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": MAX_POSITIONS, **SPECIAL_IDS}
# llama3 scaling with a short original context, so head size 16 has frequencies in all three bands
# (kept, blended, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}

# Conv1D weights are [in, out]: their fan-in is the first dimension.
CONV1D_NAMES = (".c_attn.", ".c_proj.", ".c_fc.")


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The config of tiny model `family` (one of FAMILIES), naming its HF class as a saved model's does."""
    config = _family_config(family)
    config.architectures = [ARCHITECTURES[config.model_type]]
    return config


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


def _family_config(family: str) -> transformers.PretrainedConfig:
    """The tiny config of `family`, without `architectures`."""
    if family == "llama":
        return transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                        **LLAMA_COMMON)
    if family == "llama_gqa_llama3":
        return transformers.LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False,
                                        **LLAMA_COMMON)
    if family == "llama_tied":
        return transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, **LLAMA_COMMON)
    if family == "mistral":
        # head_dim 32 with 4 heads: the attention width (128) differs from the hidden size (64).
        return transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, sliding_window=None, tie_word_embeddings=False,
                                          **LLAMA_COMMON)
    if family == "opt_pre_ln":
        return transformers.OPTConfig(do_layer_norm_before=True, word_embed_proj_dim=HIDDEN, **OPT_COMMON)
    if family == "opt_post_ln_proj":
        # Like opt-350m: post-LN, and embeddings narrower than the hidden size.
        return transformers.OPTConfig(do_layer_norm_before=False, word_embed_proj_dim=32, **OPT_COMMON)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                       n_positions=MAX_POSITIONS, **SPECIAL_IDS)
    raise ValueError(f"unknown tiny family {family!r}")


FAMILIES = ("llama", "llama_gqa_llama3", "llama_tied", "mistral", "opt_pre_ln", "opt_post_ln_proj", "gpt2")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 1:
            param.copy_(1.0 + 0.1 * noise if name.endswith(".weight") else 0.1 * noise)
        else:
            fan_in = param.shape[0] if any(part in name for part in CONV1D_NAMES) else param.shape[1]
            param.copy_(noise * fan_in**-0.5)


def build_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """An HF model of `config` in eval mode with eager attention and `randomize`d weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, seed)
    return model.eval()


def save_config_only(config: transformers.PretrainedConfig, directory: Path) -> Path:
    """A model directory with config.json and no weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return directory


def save_bin(model: transformers.PreTrainedModel, directory: Path, shards: int = 1) -> Path:
    """The pre-safetensors format: `pytorch_model.bin`, or `shards` files with an index."""
    save_config_only(model.config, directory)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({name: state[name] for name in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def save_safetensors_without(model: transformers.PreTrainedModel, directory: Path, drop: str,
                             extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`model.safetensors` lacking tensor `drop` (and holding `extra` ones): a broken checkpoint."""
    save_config_only(model.config, directory)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != drop}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)   # safetensors refuses shared storage; HF drops it the same way
    save_file({**state, **(extra or {})}, str(directory / "model.safetensors"))
    return directory
