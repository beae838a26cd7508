"""Source weights packed for the Ray object store: one flat byte buffer per source.

A node's store actor reads a checkpoint once and `ray.put`s `{"index": ..., "buffer": uint8
array}`. Every worker on that node `ray.get`s it: numpy arrays come back as read-only views of
the node's shared memory (no copy), and `unpack` wraps them as tensors without copying either,
so N workers on a node hold each source once. Tensors are stored as raw bytes, so dtypes numpy
lacks (bfloat16) travel too. The views are read-only memory: the merge engine must never write
into a source tensor (it does not: methods build new tensors).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.merge.sources import Source

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
