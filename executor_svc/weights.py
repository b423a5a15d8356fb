"""Reading a local Hugging Face checkpoint tensor by tensor, and dummy weights for benchmarks.

Formats, in the order they are looked for: `model.safetensors`, a sharded `model.safetensors.index.json`,
then the older `pytorch_model.bin` and sharded `pytorch_model.bin.index.json`. Tensors are yielded one
at a time (safetensors reads each from its memory map), so loading never holds a second full copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CHECKPOINT_NAMES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)

# Dummy weights: small enough that activations stay finite through any depth in half precision.
DUMMY_LOW, DUMMY_HIGH = -1e-3, 1e-3


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of the first checkpoint format present in `model_dir`."""
    directory = Path(model_dir)
    for name in CHECKPOINT_NAMES:
        path = directory / name
        if path.is_file():
            return shard_files(path) if name.endswith(".index.json") else [path]
    raise FileNotFoundError(f"no model weights in {directory}: looked for {', '.join(CHECKPOINT_NAMES)}")


def shard_files(index_path: Path) -> list[Path]:
    """The shard files an index's `weight_map` names, each once, in name order; all must exist."""
    weight_map = json.loads(index_path.read_text())["weight_map"]
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shard files that do not exist: {', '.join(missing)}")
    return files


def iterate_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one safetensors or PyTorch pickle file, on the CPU."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as file:
            # A safe_open handle is not iterable; keys() is its listing.
            for name in file.keys():  # noqa: SIM118
                yield name, file.get_tensor(name)
        return
    # weights_only refuses arbitrary pickled objects, so a .bin cannot run code on load.
    state = torch.load(path, map_location="cpu", weights_only=True)
    yield from state.items()


def iterate_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint in `model_dir`, named as HF saved them."""
    for path in checkpoint_files(model_dir):
        yield from iterate_file(path)


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0, low: float = DUMMY_LOW,
                       high: float = DUMMY_HIGH) -> None:
    """Fill every parameter with uniform(low, high) values from a generator seeded with `seed`.

    Real shapes and dtypes with random values: for measuring speed and memory without a checkpoint.
    Tied parameters are filled once.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        generator = generators.get(param.device)
        if generator is None:
            generator = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(low, high, generator=generator)
