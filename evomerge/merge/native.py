"""Compiled twins of the torch engine's bfloat16 kernels: for `evomerge.merge.fast` (numpy has no
bfloat16, and emulating it costs several times what the merge itself does), and for the torch
engine itself on the CPU, where task_arithmetic and TIES over bfloat16 tensors run as one fused
pass instead of a dozen torch operations per chunk (`methods.task_arithmetic`; a worker's
candidate of three 1.1B fine-tunes: TIES 14.2 -> 2.9 s, task_arithmetic 2.9 -> 1.0 s on one
thread). Each twin is held to the torch code bit for bit by `tests/test_merge_fast.py`, which
runs that code inside `torch_kernels_only`.

The C source (`native_kernels.c`) ships with the package. It is compiled once per machine, with
the system's C compiler (``$CC``, else ``cc``), into evomerge's cache
(``$EVOMERGE_CACHE/native/<key>/``, the key covering the source, the compiler, the flags and the
CPU), and loaded with ctypes, whose calls release the GIL: the executor's threads run them in
parallel. Without a compiler, when compiling fails, or with ``EVOMERGE_NATIVE=0``, `library`
is None and `unavailable_reason` says why; such merges then go to the torch engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from evomerge.fsutil import UMASK, cache_dir

SOURCE = Path(__file__).with_name("native_kernels.c")
# -ffp-contract=off: only the explicit fmaf calls fuse, as in the torch kernels
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120

_U16P = ctypes.POINTER(ctypes.c_uint16)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when they cannot be had."""
    return _load()[0]


def for_torch_kernels() -> ctypes.CDLL | None:
    """The kernels for the torch engine's CPU bfloat16 paths to call; None inside
    `torch_kernels_only` (the tests' reference) or when they cannot be had."""
    return None if _torch_only else library()


@contextmanager
def torch_kernels_only() -> Iterator[None]:
    """Within it, the torch engine runs its torch code for what the native kernels would merge
    (the reference the native kernels are held to, bit for bit)."""
    global _torch_only
    before, _torch_only = _torch_only, True
    try:
        yield
    finally:
        _torch_only = before


_torch_only = False


def unavailable_reason() -> str | None:
    """Why `library` is None, or None when it is not."""
    return _load()[1]


def task_arithmetic_bf16(base: np.ndarray, inputs: Sequence[np.ndarray], scales: Sequence[float], keep: float, out: np.ndarray) -> None:
    """``out = bf16(keep * base + sum_j scales[j] * inputs[j])`` in float32, left to right, each
    term one fused multiply-add; arrays are bfloat16 bit patterns (uint16) of one size;
    ``scales`` and ``keep`` are rounded to float32."""
    lib = _required()
    _check(out, base, *inputs)
    pointers = (_U16P * max(1, len(inputs)))(*[_u16(x) for x in inputs])
    factors = np.asarray(scales, dtype=np.float32)
    lib.evomerge_task_arithmetic_bf16(
        out.size, _u16(base), len(inputs), pointers, _f32(factors), keep, _u16(out)
    )


def linear_bf16(inputs: Sequence[np.ndarray], weights: Sequence[float], divisor: float | None, out: np.ndarray) -> None:
    """``out = bf16(sum_j weights[j] * inputs[j] [/ divisor])`` in float32 from +0, each term one
    fused multiply-add; arrays as in `task_arithmetic_bf16`."""
    lib = _required()
    _check(out, *inputs)
    pointers = (_U16P * len(inputs))(*[_u16(x) for x in inputs])
    factors = np.asarray(weights, dtype=np.float32)
    lib.evomerge_linear_bf16(
        out.size, len(inputs), pointers, _f32(factors),
        divisor is not None, 1.0 if divisor is None else divisor, _u16(out),
    )  # fmt: skip


def ties_bf16(base: np.ndarray, inputs: Sequence[np.ndarray], weights: Sequence[float], shrinks: Sequence[Shrink],
              *, normalize: bool, lam: float, out: np.ndarray) -> None:
    """TIES with magnitude masks, ``out = bf16(base + merge)`` as the torch engine's `_ties_fast`
    computes it for 16-bit inputs, all weights positive; ``shrinks[j]`` is input j's mask (see
    `Shrink`), arrays as in `task_arithmetic_bf16`."""
    lib = _required()
    _check(out, base, *inputs)
    k = len(inputs)
    if not (k == len(weights) == len(shrinks) >= 1):
        raise ValueError("ties_bf16 takes one weight and one mask per input, and at least one input")
    pointers = (_U16P * k)(*[_u16(x) for x in inputs])
    factors = np.asarray(weights, dtype=np.float32)
    lams = np.asarray([s.lam for s in shrinks], dtype=np.float32)
    keys = np.asarray([s.tie_key for s in shrinks], dtype=np.uint16)
    left = np.asarray([s.ties_kept for s in shrinks], dtype=np.int64)
    lib.evomerge_ties_bf16(
        out.size, _u16(base), k, pointers, _f32(factors), _f32(lams), _u16(keys),
        left.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), normalize, lam, lam / 2, _u16(out),
    )  # fmt: skip


class Shrink(NamedTuple):
    """A magnitude mask as the kernels apply it: drop ``-lam <= d <= lam`` (``lam`` a bfloat16
    value; negative: keep everything), then keep again the first ``ties_kept`` dropped elements,
    by index, whose magnitude's bit pattern is ``tie_key``."""

    lam: float
    tie_key: int
    ties_kept: int


KEEP_ALL = Shrink(-1.0, 0, 0)


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are not available: {unavailable_reason()}")
    return lib


def _check(out: np.ndarray, *arrays: np.ndarray) -> None:
    for a in (out, *arrays):
        if a.dtype != np.uint16 or not a.flags.c_contiguous or a.size != out.size:
            raise ValueError("native kernels take C-contiguous uint16 arrays of one size")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")


def _u16(a: np.ndarray) -> ctypes._Pointer:
    return a.ctypes.data_as(_U16P)


def _f32(a: np.ndarray) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("EVOMERGE_NATIVE", "1") == "0":
        return None, "EVOMERGE_NATIVE=0"
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, "no C compiler (cc, or $CC) on PATH"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, FLAGS, platform.machine(), _cpu_flags())).encode()).hexdigest()[:16]
    built = cache_dir() / "native" / key / "evomerge_kernels.so"
    if not built.exists():
        problem = _compile(compiler, built)
        if problem:
            return None, problem
    try:
        lib = ctypes.CDLL(str(built))
    except OSError as exc:
        return None, f"cannot load {built}: {exc}"
    lib.evomerge_task_arithmetic_bf16.argtypes = [
        ctypes.c_int64, _U16P, ctypes.c_int, ctypes.POINTER(_U16P), ctypes.POINTER(ctypes.c_float), ctypes.c_float, _U16P,
    ]
    lib.evomerge_linear_bf16.argtypes = [
        ctypes.c_int64, ctypes.c_int, ctypes.POINTER(_U16P), ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float, _U16P,
    ]
    lib.evomerge_ties_bf16.argtypes = [
        ctypes.c_int64, _U16P, ctypes.c_int, ctypes.POINTER(_U16P), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float),
        _U16P, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_float, ctypes.c_float, _U16P,
    ]
    for fn in (lib.evomerge_task_arithmetic_bf16, lib.evomerge_linear_bf16, lib.evomerge_ties_bf16):
        fn.restype = None
    return lib, None


def _compile(compiler: str, built: Path) -> str | None:
    """Build the library at ``built`` (a temporary file renamed into place, so a concurrent build
    or an interrupted one never leaves a partial library); the reason when it fails."""
    try:
        built.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".evomerge_kernels.", suffix=".so", dir=built.parent)
        os.close(fd)
    except OSError as exc:
        return f"cannot write the native kernels to {built.parent}: {exc}"
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return f"{compiler} failed: {lines[-1] if lines else f'exit {done.returncode}'}"
        os.chmod(tmp, 0o755 & ~UMASK)  # mkstemp made it 0600; a shared cache serves other users too
        os.replace(tmp, built)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{compiler} failed: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's feature flags (a library built for one CPU may
    not run on another sharing the cache)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
