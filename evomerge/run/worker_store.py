"""Source weights packed for the Ray object store: one flat byte buffer per source.

A node's store actor reads a checkpoint once and `ray.put`s `{"index": ..., "buffer": uint8
array}`. Every worker on that node `ray.get`s it: numpy arrays come back as read-only views of
the node's shared memory (no copy), and `unpack` wraps them as tensors without copying either,
so N workers on a node hold each source once. Tensors are stored as raw bytes, so dtypes numpy
lacks (bfloat16) travel too. The views are read-only memory: the merge engine must never write
into a source tensor (it does not: methods build new tensors).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.merge.sources import Source
from evomerge.merge.sparsify import CachedSparsifier

ALIGN = 64  # bytes; every tensor starts on a cache-line boundary (and its own element size)


def pack_source(ref: str, path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Read every tensor of the checkpoint at `path` into one buffer with an index."""
    source = Source(ref, Path(path), allow_pickle=allow_pickle)
    entries = []
    offset = 0
    for name in source.names:
        tensor = source.get(name)
        nbytes = tensor.numel() * tensor.element_size()
        entries.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    buffer = np.empty(offset, dtype=np.uint8)
    for name, _, _, start, nbytes in entries:
        if nbytes:
            flat = source.get(name).contiguous().reshape(-1).view(torch.uint8)
            buffer[start : start + nbytes] = flat.numpy()
    return {"ref": ref, "path": str(path), "index": entries, "buffer": buffer}


def unpack(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors viewing `packed["buffer"]` (no copy; read-only when it came from the store)."""
    buffer = packed["buffer"]
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch warns that the store's buffer is not writable: it is shared and read-only on purpose
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.from_numpy(buffer)
    for name, dtype, shape, start, nbytes in packed["index"]:
        torch_dtype = getattr(torch, dtype)
        tensors[name] = whole[start : start + nbytes].view(torch_dtype).reshape(shape)
    return tensors


def packed_nbytes(packed: dict[str, Any]) -> int:
    return int(packed["buffer"].nbytes)


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
