"""The tensor-parallel group of executor ranks: joining it and the two collectives the model needs.

Every rank of a group is its own `pagedserve-executor` process (possibly on its own host) holding
1/world_size of the attention heads and MLP columns. The scheduler sends each rank the same plan, and
inside a forward pass the ranks meet in collectives: an all-reduce after each row-parallel linear
(attention output, MLP down projection) and the vocab-parallel embedding, and an all-gather of the
LM head's vocabulary slices. NCCL carries them between GPUs, gloo between CPU processes (the tests).

Ranks rendezvous through a TCPStore that rank 0 hosts at `distributed_init_address`; every rank names
the same address, so it must be reachable from all of the group's hosts.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from executor_svc.group_watchdog import GroupWatchdog

log = logging.getLogger("pagedserve.executor")


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group and the group's collectives.

    With size 1 there is no group and the collectives are never called: the layers receive None in
    place of `reduce` and `gather` and behave as ordinary linears and embeddings.
    """

    rank: int = 0
    size: int = 1
    group: Any = None       # a torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks ([*] -> [*], the same shape on every rank)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' `x` along the last dimension, in rank order: [..., n] -> [..., n * size]."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    @property
    def reduce(self) -> Any:
        """`all_reduce` for the layers, or None on a single rank (no communication at all)."""
        return self.all_reduce if self.size > 1 else None

    @property
    def gather(self) -> Any:
        """`all_gather` for the LM head, or None on a single rank."""
        return self.all_gather if self.size > 1 else None


SINGLE_RANK = TensorParallel()

_watchdog: GroupWatchdog | None = None     # this process's, while it belongs to a group


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` is NCCL for CUDA devices and gloo for the CPU."""
    if name != "auto":
        return name
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(rank: int, world_size: int, init_address: str, backend: str, device: torch.device,
               timeout_seconds: float, heartbeat_timeout_seconds: float = 30.0) -> TensorParallel:
    """Join (or, as rank 0, host) the group at `init_address`; blocks until every rank has joined.

    A first all-reduce proves the group works and, under NCCL, creates the communicator now rather than
    inside a CUDA graph capture, where creating it is not allowed. Then a GroupWatchdog starts: if a peer
    dies later, this process exits (group_watchdog.GROUP_LOST_EXIT_CODE) so the whole group restarts.
    """
    global _watchdog
    if world_size == 1:
        return SINGLE_RANK
    backend = resolve_backend(backend, device)
    log.info("rank %d/%d: joining the tensor-parallel group at %s (%s)", rank, world_size, init_address,
             backend)
    options: dict[str, Any] = {}
    if backend == "nccl":
        options["device_id"] = device          # binds the communicator to this rank's GPU eagerly
    dist.init_process_group(backend=backend, init_method=f"tcp://{init_address}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_seconds),
                            **options)
    group = TensorParallel(rank=rank, size=world_size, group=dist.group.WORLD)
    probe = torch.ones(1, device=device)
    group.all_reduce(probe)
    if int(probe.item()) != world_size:
        raise RuntimeError(f"the tensor-parallel group's first all-reduce gave {probe.item()}, "
                           f"expected {world_size}")
    _watchdog = GroupWatchdog(init_address, rank, world_size, heartbeat_timeout_seconds).start()
    log.info("rank %d/%d: tensor-parallel group ready", rank, world_size)
    return group


def stop_watchdog() -> None:
    """Stop watching the group's peers: this rank is shutting down on purpose (SIGTERM), and the peers'
    departures that follow are expected."""
    if _watchdog is not None:
        _watchdog.stop()


def leave_group() -> None:
    """Leave the group, if this process joined one (lets tests join again).

    The ranks stop their watchdogs first and rank 0, whose process hosts the group's store, waits for all
    of them before destroying it: a peer still watching would take the vanished store for rank 0's death.
    """
    global _watchdog
    if _watchdog is not None:
        _watchdog.leave()
        _watchdog = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
