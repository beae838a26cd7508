"""Source tensors on the device a merge runs on: held there within a budget, else streamed.

The merge kernels are device-agnostic: they run where their inputs are. On the CPU the
sources are used as they are. On an accelerator `DeviceSources` hands each source tensor over
on that device: a resident source's tensors stay there while their bytes fit the budget, and
the rest are copied per use from pinned host memory, so a node can merge models larger than
its GPU's free memory.

Streamed copies overlap the merge: told the order the merge will use tensors in (`ahead`),
`DeviceSources` copies the next ones on a side CUDA stream while the kernels of the current
tensor run (`prefetch_next`); a kernel waits for its input's copy (an event), and the copy's
memory is not reused before the kernels that read it are done (`record_stream`). What is in
flight is bounded by a depth (tensors) and by the part of the budget set aside for it. On a
device without streams (the CPU, "cpu:0" in tests) the same bookkeeping copies synchronously.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from evomerge.merge.sources import Source

PREFETCH_DEPTH = 8  # tensors copied ahead of their use, at most
PREFETCH_SHARE = 8  # without an explicit prefetch_bytes: 1/8 of the budget is for copies in flight
STREAM_ROOM = 1 << 28  # a staging that keeps nothing (`streaming`) prefetches within 256 MiB


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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _kept_key(tensor: torch.Tensor) -> tuple:
    """What a kept tensor is found by: its storage and view (tied names share one)."""
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))


class _InFlight:
    """A copy made ahead of its use: the tensor on the device and, on CUDA, the event that
    marks its copy done on the side stream."""

    __slots__ = ("tensor", "event", "size")

    def __init__(self, tensor: torch.Tensor, event: Any, size: int):
        self.tensor, self.event, self.size = tensor, event, size


class DeviceSources:
    """The tensors of resident sources on ``device``, within ``budget_bytes``.

    ``get(source, name)`` returns the tensor on the device: kept there once copied while the
    kept bytes fit the budget (each stored tensor once, tied names included), else copied for
    this use only (``streamed`` counts those; ``prefetched`` those of them copied ahead of
    use). Tensors kept for a source go when the source does (a pool re-pointing a reference
    drops its old `Source`). Thread-safe.

    ``budget_bytes`` (None: no limit) bounds what this object holds on the device: kept
    tensors plus copies in flight. ``prefetch_bytes`` of it (default: 1/8 of the budget, no
    bound without a budget) are for copies in flight, at most ``prefetch`` tensors ahead; the
    rest is for kept tensors.
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None = None, *,
                 prefetch: int = PREFETCH_DEPTH, prefetch_bytes: int | None = None):
        self.device = as_device(device)
        self.budget_bytes = budget_bytes
        if prefetch_bytes is None and budget_bytes is not None:
            prefetch_bytes = budget_bytes // PREFETCH_SHARE
        if budget_bytes is not None and prefetch_bytes is not None:
            prefetch_bytes = min(prefetch_bytes, budget_bytes)
        self.prefetch_depth = max(0, prefetch)
        self.prefetch_bytes = prefetch_bytes
        self._keep_limit = None if budget_bytes is None else budget_bytes - (prefetch_bytes or 0)
        self._held: dict[int, dict[tuple, torch.Tensor]] = {}  # id(source) -> kept tensors
        self._bytes = 0  # kept, or promised to a copy under way
        self._lock = threading.Lock()
        self.streamed = 0
        self.prefetched = 0
        # the merge's order of use (`ahead`), how far it got, and the copies made ahead of it
        self._order: list[tuple[Source, str]] = []
        self._cursor = 0
        self._in_flight: dict[tuple[int, str], _InFlight] = {}
        self._in_flight_bytes = 0
        self.peak_in_flight_bytes = 0
        self._side_stream: Any = None
        # set to a list to record ("prefetch" | "use", position in the order) events (tests)
        self.trace: list[tuple[str, int]] | None = None

    @classmethod
    def streaming(cls, device: torch.device | str) -> DeviceSources:
        """Keeps nothing: every tensor copied per use, the next ones ahead within `STREAM_ROOM`."""
        return cls(device, budget_bytes=STREAM_ROOM, prefetch_bytes=STREAM_ROOM)

    # ---- use -----------------------------------------------------------------------------
    def get(self, source: Source, name: str) -> torch.Tensor:
        early = self._take(source, name)
        if early is not None:
            return early
        tensor = source.get(name)
        if tensor.device == self.device:
            return tensor
        if not source.resident:  # read afresh per use: nothing to keep
            return self._stream(tensor)
        key = _kept_key(tensor)
        size = _nbytes(tensor)
        with self._lock:
            kept = self._held.get(id(source))
            hit = kept.get(key) if kept is not None else None
            if hit is not None:
                return hit
            fits = self._fits(size)
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

    def _fits(self, size: int) -> bool:
        """Whether ``size`` more bytes may be kept; call locked."""
        return self._keep_limit is None or self._bytes + size <= self._keep_limit

    def _kept(self, source: Source, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` of ``source`` is kept on the device already; call locked."""
        kept = self._held.get(id(source))
        return kept is not None and _kept_key(tensor) in kept

    def _stream(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.streamed += 1
        return to_device(tensor, self.device)

    # ---- copies ahead of use -------------------------------------------------------------------
    @contextmanager
    def ahead(self, order: Sequence[tuple[Source, str]]) -> Iterator[None]:
        """Within the block, tensors are used in ``order`` (``(source, name)``, a merge's inputs in
        plan order): the first ones are copied ahead now, later ones by `prefetch_next`. Copies
        nobody used are dropped when the block ends."""
        with self._lock:
            self._drop_in_flight()
            self._order, self._cursor = list(order), 0
        self.prefetch_next()
        try:
            yield
        finally:
            with self._lock:
                self._drop_in_flight()
                self._order, self._cursor = [], 0

    def prefetch_next(self) -> None:
        """Copy the next tensors of the order ahead of their use (call it once the kernels of the
        current tensor are queued): those that would be streamed, at most ``prefetch`` tensors
        past the last one used and within ``prefetch_bytes``, in order (one larger than all of
        ``prefetch_bytes`` is copied at its use)."""
        with self._lock:
            stop = min(len(self._order), self._cursor + self.prefetch_depth)
            for position in range(self._cursor, stop):
                source, name = self._order[position]
                if (id(source), name) in self._in_flight:
                    continue
                tensor = source.get(name)
                if tensor.device == self.device:
                    continue
                size = _nbytes(tensor)
                if source.resident and (self._kept(source, tensor) or self._fits(size)):
                    continue  # kept on the device at its first use
                if self.prefetch_bytes is not None and size > self.prefetch_bytes:
                    continue  # never fits the room: copied at its use
                if self.prefetch_bytes is not None and self._in_flight_bytes + size > self.prefetch_bytes:
                    break  # in order: the next copy waits for room
                # copied under the lock: a thread that wants this tensor meanwhile waits for it
                self._in_flight[(id(source), name)] = self._copy_ahead(tensor, size)
                self._in_flight_bytes += size
                self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self._in_flight_bytes)
                if self.trace is not None:
                    self.trace.append(("prefetch", position))

    def _copy_ahead(self, tensor: torch.Tensor, size: int) -> _InFlight:
        if self.device.type != "cuda":  # no streams: a plain copy now
            return _InFlight(to_device(tensor, self.device), None, size)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        stream = self._side_stream
        with torch.cuda.stream(stream):  # allocated and copied on the side stream
            moved = to_device(tensor, self.device)
            event = torch.cuda.Event()
            event.record(stream)
        return _InFlight(moved, event, size)

    def _take(self, source: Source, name: str) -> torch.Tensor | None:
        """The tensor copied ahead for this use (None when there is none); moves the order on."""
        key = (id(source), name)
        with self._lock:
            position = self._advance(key)
            if self.trace is not None and position is not None:
                self.trace.append(("use", position))
            found = self._in_flight.pop(key, None)
            if found is None:
                return None
            self._in_flight_bytes -= found.size
            self.streamed += 1
            self.prefetched += 1
        if found.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(found.event)  # the kernels that read it start after its copy
            found.tensor.record_stream(compute)  # its memory is not reused before they are done
        return found.tensor

    def _advance(self, key: tuple[int, str]) -> int | None:
        """Move the cursor past ``key``'s place in the order (threads may use tensors a little
        out of order) and return that place (None: not found near the cursor); call locked."""
        window = self._order[self._cursor:self._cursor + 4 * max(1, self.prefetch_depth)]
        for offset, (source, name) in enumerate(window):
            if (id(source), name) == key:
                self._cursor += offset + 1
                return self._cursor - 1
        return None

    def _drop_in_flight(self) -> None:
        """Forget copies made ahead that nobody used; call locked."""
        self._in_flight.clear()
        self._in_flight_bytes = 0

    def in_flight_bytes(self) -> int:
        """Bytes of copies made ahead of their use, not used yet."""
        with self._lock:
            return self._in_flight_bytes

    # ---- accounting ----------------------------------------------------------------------------
    def _forget(self, source_id: int) -> None:
        with self._lock:
            kept = self._held.pop(source_id, {})
            self._bytes -= sum(_nbytes(t) for t in kept.values())

    def nbytes(self) -> int:
        """Bytes of source tensors this object holds on the device (kept, and copies in flight)."""
        with self._lock:
            return sum(_nbytes(t) for kept in self._held.values() for t in kept.values()) + self._in_flight_bytes

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0
            self._drop_in_flight()
