"""Source weights in the Ray object store, once per node, and rank tables shared the same way.

A node's store actor reads a checkpoint once, tensor by tensor, and `ray.put`s each tensor's
bytes as a numpy array (so reading a source never holds more than one tensor outside the
store), then one small object with the index (names, dtypes, shapes) and the tensors' object
refs. Every worker on that node `ray.get`s them: numpy arrays come back as read-only views of
the node's shared memory (no copy), and `unpack` wraps them as tensors without copying either,
so N workers on a node hold each source once. Tensors travel as raw bytes, so dtypes numpy
lacks (bfloat16) travel too. The views are read-only memory: the merge engine must never write
into a source tensor (it does not: methods build new tensors).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.merge.sources import Source
from evomerge.merge.sparsify import CachedSparsifier


def pack_source(
    ref: str, path: str | Path, put: Callable[[np.ndarray], Any], *, allow_pickle: bool = False
) -> dict[str, Any]:
    """Read the checkpoint at `path` one tensor at a time, `put` each tensor's bytes (e.g.
    `ray.put`), and return the index: names, dtypes, shapes, what `put` returned, total bytes."""
    source = Source(ref, Path(path), allow_pickle=allow_pickle)
    index, objects, total = [], [], 0
    for name in source.names:
        tensor = source.get(name).contiguous()
        index.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)))
        objects.append(put(tensor.reshape(-1).view(torch.uint8).numpy()))
        total += tensor.numel() * tensor.element_size()
        del tensor
    return {"ref": ref, "path": str(path), "index": index, "objects": objects, "nbytes": total}


def unpack(index: Sequence[tuple[str, str, tuple[int, ...]]], arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors viewing `arrays` (no copy; read-only when they came from the object store)."""
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch warns that the store's arrays are not writable: shared and read-only on purpose
        warnings.simplefilter("ignore", UserWarning)
        for (name, dtype, shape), array in zip(index, arrays, strict=True):
            tensors[name] = torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)
    return tensors


class NodeSharedSparsifier(CachedSparsifier):
    """A `CachedSparsifier` whose magnitude and row ranks are held once per node.

    Ranks cost 4 bytes per source element, as much as the sources themselves: kept per worker,
    every extra worker on a node would pay for them again. Here the first worker that needs a
    rank table computes it and hands it to the node's store actor, which keeps it in the object
    store; every worker (this one included) then uses a zero-copy, read-only view of that one
    copy, and asks the store only once per table. Two workers may both compute a table the first
    time; the store keeps the first. Noise (DARE, DELLA) stays per worker (it is kept for the
    most recent seeds only).

    store: the node's store actor; identity: maps a source ref to what it stands for (its
    directory), so that a ref re-pointed by `add_source` never finds another model's ranks.
    release: called after each table is handed over (gives freed heap back to the system).
    """

    def __init__(
        self,
        store: Any,
        identity: Callable[[str], str],
        noise_seeds: int = 2,
        release: Callable[[], None] = lambda: None,
    ):
        super().__init__(noise_seeds)
        self._release = release
        self._store = store
        self._identity = identity
        self._shared_lock = threading.Lock()
        self.shared_hits = 0  # tables another worker had already computed

    def _cached(self, store: dict, key: Hashable, make: Callable[[], torch.Tensor], counter: str) -> torch.Tensor:
        hit = store.get(key)
        if hit is not None:
            return hit
        import ray

        with self._shared_lock:
            hit = store.get(key)
            if hit is not None:
                return hit
            node_key = repr((counter, self._node_key(key)))
            found = ray.get(self._store.get_table.remote(node_key))
            if found is not None:
                self.shared_hits += 1
            else:
                table = make()
                setattr(self, counter, getattr(self, counter) + 1)
                found = ray.get(self._store.put_table.remote(node_key, table.numpy()))
                del table  # the store's copy replaces ours
                self._release()  # the sort's temporaries, before the next table's
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only on purpose
                value = torch.from_numpy(ray.get(found[0]))
            store[key] = value
            return value

    def _node_key(self, key: Hashable) -> Hashable:
        if isinstance(key, tuple):
            return tuple(self._node_key(part) for part in key)
        if isinstance(key, str):
            return self._identity(key)
        return key
