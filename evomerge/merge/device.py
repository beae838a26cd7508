"""Source tensors on the device a merge runs on: held there within a budget, else streamed.

The merge kernels are device-agnostic: they run where their inputs are. On the CPU the
sources are used as they are. On an accelerator `DeviceSources` hands each source tensor over
on that device: a resident source's tensors stay there while their bytes fit ``budget_bytes``
(None: no limit), and the rest are copied per use from pinned host memory with a
non-blocking copy (CUDA), so a node can merge models larger than its GPU's free memory.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from evomerge.merge.sources import Source


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device (None: the CPU); "cuda" names the current CUDA device, as
    the tensors put there report it ("cuda:0")."""
    found = torch.device("cpu") if device is None else torch.device(device)
    if found.type == "cuda" and found.index is None:
        found = torch.device("cuda", torch.cuda.current_device())
    return found


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: itself when it is there, else a copy (through pinned host
    memory and without blocking the host when the device is CUDA)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceSources:
    """The tensors of resident sources on ``device``, within ``budget_bytes``.

    ``get(source, name)`` returns the tensor on the device: kept there once copied while the
    kept bytes fit the budget (each stored tensor once, tied names included), else copied for
    this use only (``streamed`` counts those). Tensors kept for a source go when the source
    does (a pool re-pointing a reference drops its old `Source`). Thread-safe.
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None = None):
        self.device = as_device(device)
        self.budget_bytes = budget_bytes
        self._held: dict[int, dict[tuple, torch.Tensor]] = {}  # id(source) -> kept tensors
        self._bytes = 0  # kept, or promised to a copy under way
        self._lock = threading.Lock()
        self.streamed = 0

    def get(self, source: Source, name: str) -> torch.Tensor:
        tensor = source.get(name)
        if tensor.device == self.device:
            return tensor
        if not source.resident:  # read afresh per use: nothing to keep
            return self._stream(tensor)
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            kept = self._held.get(id(source))
            hit = kept.get(key) if kept is not None else None
            if hit is not None:
                return hit
            fits = self.budget_bytes is None or self._bytes + size <= self.budget_bytes
            if fits:
                self._bytes += size  # promised before the copy: threads never overshoot the budget
            else:
                self.streamed += 1
        moved = to_device(tensor, self.device)
        if not fits:
            return moved
        with self._lock:
            if id(source) not in self._held:
                self._held[id(source)] = {}
                weakref.finalize(source, self._forget, id(source))
            kept = self._held[id(source)]
            if key in kept:  # another thread kept it meanwhile
                self._bytes -= size
            return kept.setdefault(key, moved)

    def _stream(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.streamed += 1
        return to_device(tensor, self.device)

    def _forget(self, source_id: int) -> None:
        with self._lock:
            kept = self._held.pop(source_id, {})
            self._bytes -= sum(t.numel() * t.element_size() for t in kept.values())

    def nbytes(self) -> int:
        """Bytes of source tensors kept on the device."""
        with self._lock:
            return sum(t.numel() * t.element_size() for kept in self._held.values() for t in kept.values())

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0
