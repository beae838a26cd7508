"""The safetensors file format, read and written without torch.

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype code, shape,
`data_offsets` [begin, end) relative to the end of the header; optional `__metadata__`), then the
raw little-endian tensor bytes. Reading headers here lets planning (names, shapes, dtypes) and the
numpy executor work without importing torch; `SafetensorsWriter` streams tensors into a file as
they are merged, from torch tensors or numpy arrays alike.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# dtype name (torch's without "torch.", numpy's) -> safetensors code, and back
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute byte range in `file`, plus dtype name and shape."""

    file: Path
    dtype: str  # e.g. "float32" (see DTYPE_CODES); the raw code when evomerge does not know it
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, from its header only (no tensor data is read)."""
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise ValueError(f"{file}: not a safetensors file (header of {size} bytes)")
        header: dict[str, Any] = json.loads(handle.read(size))
    start = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(file, CODE_DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]), start + begin, start + end)
    return entries


def dtype_name(array: Any) -> str:
    """'float32' for a torch tensor or a numpy array of float32, and so on."""
    return str(array.dtype).removeprefix("torch.")


def raw_bytes(array: Any) -> memoryview:
    """The bytes of a tensor or array in C order, without a copy when it is contiguous."""
    if hasattr(array, "detach"):  # torch: go through a uint8 view (numpy has no bfloat16)
        import torch

        array = array.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    else:
        import numpy as np

        array = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return memoryview(array)


class SafetensorsWriter:
    """Streams tensors into one safetensors file as they come (no second copy in memory).

    The header goes in front of the data but is only known at the end, so ``header_room``
    bytes are reserved for it (an upper bound, see :func:`header_room`) and the header is
    padded with spaces to fill them, as the format allows.
    """

    def __init__(self, path: Path, header_room: int):
        self.path = path
        self.room = header_room
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.file.seek(8 + header_room)
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, array: Any) -> int:
        """Append one tensor (torch tensor or numpy array); returns its size in bytes."""
        data = raw_bytes(array)
        self.file.write(data)
        start, self.offset = self.offset, self.offset + data.nbytes
        self.entries[name] = {"dtype": DTYPE_CODES[dtype_name(array)], "shape": list(array.shape), "data_offsets": [start, self.offset]}
        return data.nbytes

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.room:  # cannot happen with header_room's bound; fail loudly rather than corrupt
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.room} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + header + b" " * (self.room - len(header)))
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def header_room(names: list[str]) -> int:
    """Upper bound on the JSON header of a file holding (some of) these tensors: every entry
    with 20-digit offsets and up to 8 dimensions of 20 digits."""
    per_entry = len('"":{"dtype":"BOOL","shape":[],"data_offsets":[,]},') + 2 * 20
    total = len('{"__metadata__":{"format":"pt"},}') + 64
    for name in names:
        total += per_entry + len(json.dumps(name)) + 21 * 8
    return (total + 7) // 8 * 8  # data stays 8-byte aligned
