"""Host-to-device copies that do not stall the host behind the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory: the call returns only once the copy
has run, and the copy is queued behind every kernel already on the stream. Issued while a forward pass
runs, it makes the host wait out the whole pass. Staged through pinned memory with non_blocking=True,
the copy is queued like a kernel and the host carries on; torch's caching host allocator keeps the
pinned block alive until the copy has run, so the staging memory is never reused too early.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence | np.ndarray | torch.Tensor | float, dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
    """`values` as a tensor of `dtype` on `device`, without waiting for the device when it is a GPU.

    On the CPU this is torch.tensor (or from_numpy) and nothing else, so CPU results are unchanged.
    """
    host = _host_tensor(values, dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _host_tensor(values: Sequence | np.ndarray | torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """values as a host tensor of dtype (no copy when it already is one)."""
    if isinstance(values, torch.Tensor):
        return values.to(dtype)
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values).to(dtype)
    return torch.tensor(values, dtype=dtype)


class HostCopy:
    """Device tensors on their way to pinned host memory; `wait` returns them once they have arrived.

    The copies are queued on the current stream behind whatever computes the tensors, and an event is
    recorded after them, so the host can launch more GPU work (the next step) before it waits, and then
    waits for these copies alone rather than for everything queued since.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        device_tensors = [t for t in tensors if t.device.type != "cpu"]
        self._copies = [t if t.device.type == "cpu" else
                        torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                        for t in tensors]
        self._event: torch.cuda.Event | None = None
        if device_tensors:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device_tensors[0].device))

    def ready(self) -> bool:
        """Whether the copies have arrived (waiting now would not block)."""
        return self._event is None or self._event.query()

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, in the order given, once every copy has arrived."""
        if self._event is not None:
            self._event.synchronize()
        return self._copies


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Device tensors copied to the host with one wait for the device, not one per tensor.

    Each is copied into pinned memory with non_blocking=True, then the host waits once. Host tensors are
    returned as they are.
    """
    return HostCopy(tensors).wait()
