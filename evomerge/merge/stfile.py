"""The safetensors file format, read and written without torch.

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype code, shape,
`data_offsets` [begin, end) relative to the end of the header; optional `__metadata__`), then the
raw little-endian tensor bytes. Reading headers here lets planning (names, shapes, dtypes) and the
numpy executor work without importing torch; `SafetensorsWriter` streams tensors into a file as
they are merged, from torch tensors or numpy arrays alike.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# dtype name (torch's without "torch.", numpy's) -> safetensors code, and back
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
# Bytes per element of every dtype code the format defines (None: packed below a byte, F4/F6).
CODE_ITEM_BYTES: dict[str, int | None] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "C64": 8, "U64": 8, "I64": 8, "F64": 8,
    "F4": None, "F6_E2M3": None, "F6_E3M2": None,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class NotSafetensors(ValueError):
    """A file that is not a whole, valid safetensors file (truncated, garbage, inconsistent header)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute byte range in `file`, plus dtype name and shape."""

    file: Path
    dtype: str  # e.g. "float32" (see DTYPE_CODES); the raw code when evomerge does not know it
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file, from its header only (no tensor data is read).

    Checks what the safetensors library checks before it maps a file, so a file read here can
    be opened there: a JSON header of known dtypes, shapes whose sizes match their byte ranges,
    and byte ranges that cover the data exactly (a truncated file fails here, not mid-merge).
    Raises `NotSafetensors` (a ValueError) saying what is wrong, OSError when it cannot be read.
    """
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise NotSafetensors(f"not a safetensors file ({len(head)} bytes, shorter than the 8-byte header length)")
        (size,) = struct.unpack("<Q", head)
        file_size = os.fstat(handle.fileno()).st_size
        if size > _MAX_HEADER or 8 + size > file_size:
            raise NotSafetensors(
                f"not a safetensors file, or truncated (a header of {size} bytes announced, the file has {file_size} bytes)"
            )
        raw = handle.read(size)
    try:
        header = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise NotSafetensors("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NotSafetensors("not a safetensors file (its header is not a JSON object)")
    start = 8 + size
    entries = {name: _entry(file, name, info, start) for name, info in header.items() if name != "__metadata__"}
    _check_coverage(entries, start, file_size - start)
    return entries


def _entry(file: Path, name: str, info: Any, start: int) -> TensorEntry:
    def bad(what: str) -> NotSafetensors:
        return NotSafetensors(f"damaged header: tensor '{name}' {what}")

    if not isinstance(info, dict):
        raise bad("is not described by a JSON object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in CODE_ITEM_BYTES:
        raise bad(f"has an unknown dtype {code!r} (valid: {', '.join(CODE_ITEM_BYTES)})")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"has shape {shape!r} (expected a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets!r} (expected [begin, end] with 0 <= begin <= end)")
    begin, end = offsets
    item = CODE_ITEM_BYTES[code]
    if item is not None and math.prod(shape) * item != end - begin:
        raise bad(f"of shape {shape} and dtype {code} needs {math.prod(shape) * item} bytes but its data_offsets span {end - begin}")
    return TensorEntry(file, CODE_DTYPES.get(code, code), tuple(shape), start + begin, start + end)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(entries: dict[str, TensorEntry], start: int, data_bytes: int) -> None:
    """The tensors' byte ranges follow one another from the start of the data to its end."""
    position = 0
    for begin, end in sorted((e.begin - start, e.end - start) for e in entries.values()):
        if begin != position:
            raise NotSafetensors(f"damaged header: tensor data {'overlaps' if begin < position else 'has a gap'} at byte {begin}")
        position = end
    if position != data_bytes:
        what = "truncated" if position > data_bytes else "damaged"
        raise NotSafetensors(f"{what}: the header describes {position} bytes of tensor data, the file holds {data_bytes}")


# numpy has no bfloat16: the numpy executor holds bfloat16 tensors as their bit patterns, in
# uint16 arrays of this dtype, which `dtype_name` names "bfloat16"
BFLOAT16 = np.dtype("<u2", metadata={"dtype": "bfloat16"})


def dtype_name(array: Any) -> str:
    """'float32' for a torch tensor or a numpy array of float32, and so on ('bfloat16' for a
    numpy array of `BFLOAT16`)."""
    metadata = getattr(array.dtype, "metadata", None)
    if metadata and "dtype" in metadata:
        return metadata["dtype"]
    return str(array.dtype).removeprefix("torch.")


def raw_bytes(array: Any) -> memoryview:
    """The bytes of a tensor or array in C order, without a copy when it is contiguous."""
    if hasattr(array, "detach"):  # torch: go through a uint8 view (numpy has no bfloat16)
        import torch  # only for torch tensors: the numpy executor's writes never import it

        array = array.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    else:
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
        self._io(self.file.write, data)
        start, self.offset = self.offset, self.offset + data.nbytes
        self.entries[name] = {"dtype": DTYPE_CODES[dtype_name(array)], "shape": list(array.shape), "data_offsets": [start, self.offset]}
        return data.nbytes

    def finish(self) -> None:
        self.file.seek(0)
        self._io(self.file.write, header_bytes(self.entries, self.room))
        self._io(self.file.close)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # flushing what was buffered failed too (a full disk): the file is dropped anyway
            pass

    def _io(self, call: Any, *args: Any) -> Any:
        return named_io(self.path, call, *args)


def named_io(path: Path, call: Any, *args: Any) -> Any:
    """`call(*args)`; a write fault (full disk, EFBIG, EIO) names ``path``."""
    try:
        return call(*args)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def header_bytes(entries: dict[str, dict], room: int) -> bytes:
    """The 8-byte length and the JSON header of ``entries``, padded with spaces to ``room``."""
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    if len(header) > room:  # cannot happen with header_room's bound; fail loudly rather than corrupt
        raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {room} reserved")
    return struct.pack("<Q", room) + header + b" " * (room - len(header))


class MappedSafetensorsFile:
    """A safetensors file laid out before its tensors are computed, for a merge to write into.

    ``layout``: (name, dtype name, shape) per tensor, in file order. The header (padded to
    ``header_room`` as `SafetensorsWriter` pads it, so both give the same bytes) is written, the
    data area is allocated on disk up front and mapped; `region(name)` is the tensor's writable
    bytes. Allocating first is what makes writing through a map safe: past the end of a full
    disk a mapped write is a SIGBUS, an allocation is an error naming the file. Raises
    `Unallocatable` where the file system cannot allocate (the caller writes by stream instead).
    """

    def __init__(self, path: Path, header_room: int, layout: list[tuple[str, str, tuple[int, ...]]]):
        self.path = path
        self.entries: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in layout:
            size = math.prod(shape) * CODE_ITEM_BYTES[DTYPE_CODES[dtype]]
            self.entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.start = 8 + header_room
        self.nbytes = offset
        self.file = open(path, "x+b")  # noqa: SIM115 - closed in finish()/abort(); never an existing file
        self.map: mmap.mmap | None = None
        try:
            self._io(self.file.write, header_bytes(self.entries, header_room))
            self._io(self.file.flush)
            if offset:
                self._allocate(self.start + offset)
                self.map = mmap.mmap(self.file.fileno(), self.start + offset)
        except BaseException:
            self.abort()
            path.unlink(missing_ok=True)  # the file this just created, not filled
            raise

    def region(self, name: str) -> tuple[mmap.mmap | None, int, int]:
        """(the map, the tensor's first byte in it, its size in bytes); the map is None for an
        empty file."""
        begin, end = self.entries[name]["data_offsets"]
        return self.map, self.start + begin, end - begin

    def finish(self) -> None:
        """Close the map (its pages are the file's: nothing more to write) and the file."""
        self._release()
        self._io(self.file.close)

    def abort(self) -> None:
        self._release()
        try:
            self.file.close()
        except OSError:
            pass

    def _allocate(self, size: int) -> None:
        if not hasattr(os, "posix_fallocate"):  # macOS, Windows
            raise Unallocatable(errno.ENOSYS, "cannot allocate ahead", str(self.path))
        try:
            os.posix_fallocate(self.file.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise Unallocatable(exc.errno, "cannot allocate ahead", str(self.path)) from None
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from None

    def _release(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # views of it are still alive somewhere: it closes when they go
                pass
            self.map = None

    def _io(self, call: Any, *args: Any) -> Any:
        return named_io(self.path, call, *args)


class Unallocatable(OSError):
    """The file system cannot allocate a file's blocks ahead (`posix_fallocate` unsupported)."""


def shard_groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of tensors of these byte sizes, in order, cut into files of at most ``max_bytes``
    each (a tensor larger than that gets a file of its own): a new file whenever the next tensor
    would take a non-empty one past the limit."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def header_room(names: list[str]) -> int:
    """Upper bound on the JSON header of a file holding (some of) these tensors: every entry
    with 20-digit offsets and up to 8 dimensions of 20 digits."""
    per_entry = len('"":{"dtype":"BOOL","shape":[],"data_offsets":[,]},') + 2 * 20
    total = len('{"__metadata__":{"format":"pt"},}') + 64
    for name in names:
        total += per_entry + len(json.dumps(name)) + 21 * 8
    return (total + 7) // 8 * 8  # data stays 8-byte aligned
