"""Source weights in the Ray object store, once per node, and rank tables shared the same way.

A node's store actor reads a checkpoint once, tensor by tensor, and `ray.put`s each tensor's
bytes as a numpy array (so reading a source never holds more than one tensor outside the
store), then one small object with the index (names, dtypes, shapes) and the tensors' object
refs. Every worker on that node `ray.get`s them: numpy arrays come back as read-only views of
the node's shared memory (no copy), and `unpack` wraps them as tensors without copying either,
so N workers on a node hold each source once. Tensors travel as raw bytes, so dtypes numpy
lacks (bfloat16) travel too. The views are read-only memory: the merge engine must never write
into a source tensor (it does not: methods build new tensors).

Ray is imported where it is used, so the in-process paths that share this code never load it.
"""

from __future__ import annotations

import math
import threading
import time
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
    rank table computes it and `ray.put`s it (its private copy is freed at once: the worker
    reads a zero-copy, read-only view of the object store's) and offers it to the node's store
    actor at once, without waiting; the store keeps its own copy of each (which outlives the
    worker). `settle()`, called between jobs, fetches the store's index and the worker swaps
    its views for the store's copies, so in the end every worker of the node reads one copy of
    each table.

    A worker's first job looks up every table of every source, so lookups are cheap: the worker
    fetches the store's whole table index in one call, at a miss when its copy of the index is
    older than `refresh_s`, instead of one call per table. Two workers that start together may
    both compute a table; the store keeps the first offered. Noise (DARE, DELLA) stays per
    worker (it is kept for the most recent seeds only).

    store: the node's store actor; identity: maps a source ref to what it stands for (its
    directory), so that a ref re-pointed by `add_source` never finds another model's ranks.
    release: called after each table is computed (gives the sort's freed heap back).
    budget_bytes: what this worker's tables may hold, as for `CachedSparsifier`.
    """

    def __init__(
        self,
        store: Any,
        identity: Callable[[str], str],
        noise_seeds: int = 2,
        release: Callable[[], None] = lambda: None,
        refresh_s: float = 0.1,
        budget_bytes: int | None = None,
    ):
        super().__init__(noise_seeds, budget_bytes)
        self._release = release
        self._store = store
        self._identity = identity
        self._shared_lock = threading.Lock()
        self._index: dict[str, Any] = {}  # node key -> the store's object ref, as last listed
        self._index_time = -math.inf
        # tables this worker put and reads from its own object: node key -> (ref, cache, key)
        self._own: dict[str, tuple[Any, dict, Hashable]] = {}
        self.refresh_s = refresh_s
        self.shared_hits = 0  # tables another worker had already computed
        self.index_fetches = 0

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
            ref = self._index.get(node_key)
            if ref is None and time.monotonic() - self._index_time > self.refresh_s:
                self._fetch_index()
                ref = self._index.get(node_key)
            if ref is not None:
                self.shared_hits += 1
            else:
                table = make()
                setattr(self, counter, getattr(self, counter) + 1)
                ref = ray.put(table.cpu().numpy())  # shared from host memory (a GPU worker's too)
                del table  # the object store's copy replaces ours
                self._release()  # the sort's temporaries, before the next table's
                self._own[node_key] = (ref, store, key)
                # offered at once, nobody waits: a worker that started beside this one (and
                # merges the tensors in another order) finds it at its next index fetch
                self._store.offer.remote({node_key: [ref]})
            value = _view(ray.get(ref))
            store[key] = value
            return value

    def settle(self) -> int:
        """Read the store's copy of every table this worker put and the store now holds;
        returns how many of this worker's own copies are still in use."""
        if not self._own:
            return 0
        import ray

        with self._shared_lock:
            self._fetch_index()
            for node_key, (own_ref, store, key) in list(self._own.items()):
                shared = self._index.get(node_key)
                if shared is None:
                    continue  # not registered yet
                if shared != own_ref:
                    store[key] = _view(ray.get(shared))
                del self._own[node_key]
            return len(self._own)

    @property
    def own_tables(self) -> int:
        """Tables this worker still reads from the copy it put, not from the store's."""
        return len(self._own)

    def _fetch_index(self) -> None:
        """The store's index (it has taken every table this worker offered before: an actor
        runs one caller's calls in order)."""
        import ray

        listed = ray.get(self._store.tables.remote())
        self._index = {k: found[0] for k, found in listed.items()}
        self._index_time = time.monotonic()
        self.index_fetches += 1

    def _node_key(self, key: Hashable) -> Hashable:
        if isinstance(key, tuple):
            return tuple(self._node_key(part) for part in key)
        if isinstance(key, str):
            return self._identity(key)
        return key


def _view(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only shared memory, on purpose
        return torch.from_numpy(array)
