"""A torch-free executor of merge plans for the methods that declare a numpy twin of their kernel
(`MethodSpec.numpy_kernel`: `linear`, `task_arithmetic`).

`evomerge merge` of such a recipe spends most of its time importing torch (seconds) for work
that is one weighted sum per element. This executor runs the *same* plan as the torch engine
(`evomerge.merge.plan.plan_merge`: same tasks, same per-tensor parameters from gradients and
filters, same tied-embedding resolution) with numpy, on read-only views of the memory-mapped
safetensors files, and yields the same tensors, bit for bit: the torch kernels' order of
operations is followed, their fused multiply-adds (`add(x, y, alpha=w)` is one FMA, a single
rounding) are computed exactly in float64 and rounded once to float32, weights are rounded to
float32 as torch holds them, and results are cast to `out_dtype` with the same
round-to-nearest-even.

It covers only what it reproduces exactly: float32 work (float16/float32 sources; linear also
accumulates float16 inputs in float32), float16/float32 output, safetensors sources read from
files, and parameter values the torch methods accept. Tensors whose sources are all bfloat16
(merged in bfloat16, as the torch engine merges them) go to the kernel's compiled twin
(`NumpyKernel.bf16`, `evomerge.merge.native`), when a C compiler built it. `unsupported_reason`
says why a plan is not covered; callers then use the torch engine, which also raises the
errors (weights summing to 0, densities out of range, ...).
"""

from __future__ import annotations

import importlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.merge import native
from evomerge.merge.pipeline import ordered_parallel
from evomerge.merge.plan import MergePlan, TensorRef, TensorTask, task_size
from evomerge.merge.sources import SourcePool
from evomerge.merge.stfile import BFLOAT16, dtype_name
from evomerge.merge.weights import sum_float32

CHUNK = 1 << 16  # elements per chunk: the float64 temporaries stay in a core's L2
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_STORED = {"float32": np.float32, "float16": np.float16}
_BF16 = "bfloat16"
_VIEWED = {**_STORED, _BF16: BFLOAT16}


def unsupported_reason(plan: MergePlan, pool: SourcePool) -> str | None:
    """None when this executor reproduces the torch engine's result for ``plan``; otherwise why not."""
    kernel = numpy_kernel(plan)
    if kernel is None:
        return f"method '{plan.method.name}' needs torch"
    if plan.compute_dtype_name not in (None, *_VIEWED):
        return f"dtype '{plan.compute_dtype_name}'"
    if plan.out_dtype_name not in (None, *_VIEWED):
        return f"out_dtype '{plan.out_dtype_name}'"
    for ref in dict.fromkeys(r.model for task in plan.tasks for r in task.refs):
        if not pool.get(ref).in_files:
            return f"model '{ref}' is not read from safetensors files"
    for task in plan.tasks:
        dtypes = {_loaded_dtype(plan, pool, ref) for ref in task.refs}
        if _BF16 in dtypes or plan.out_dtype_name == _BF16:
            if problem := _bf16_problem(plan, pool, task, kernel, dtypes):
                return f"tensor '{task.name}': {problem}"
            continue
        if not dtypes <= set(_STORED):
            return f"tensor '{task.name}' has dtypes {sorted(dtypes)}"
        if plan.method.requires_base and task.inputs and "float32" not in dtypes:
            return f"tensor '{task.name}' would be merged in float16"
        if problem := kernel.problem(task):
            return f"tensor '{task.name}': {problem}"
    return None


def _bf16_problem(plan: MergePlan, pool: SourcePool, task: TensorTask, kernel: NumpyKernel, dtypes: set[str]) -> str | None:
    """Why a tensor with bfloat16 in it is not merged by the kernel's compiled twin, or None."""
    if kernel.bf16 is None:
        return f"method '{plan.method.name}' has no bfloat16 twin"
    stored = sorted({pool.get(ref.model).entry(ref.name).dtype for ref in task.refs})
    if dtypes != {_BF16} or not set(stored) <= set(_VIEWED) or plan.out_dtype_name not in (None, _BF16):
        return f"dtypes {stored} with dtype '{plan.compute_dtype_name}', out_dtype '{plan.out_dtype_name}' (bfloat16 only to bfloat16, from bfloat16 sources or with dtype: bfloat16)"
    if (reason := native.unavailable_reason()) is not None:
        return f"bfloat16 needs the native kernels: {reason}"
    return kernel.problem(task)


@dataclass(frozen=True)
class NumpyKernel:
    """A numpy twin of a torch kernel: ``run(views, task, out)`` (the base's view first for a
    method with a base) writes what the torch kernel returns; ``problem(task)`` says why the torch
    kernel would refuse the task's resolved parameters (the plan checked each against its
    declared range already), or None. ``bf16``: the same for bfloat16 views (uint16 bit
    patterns) and a bfloat16 result, with the compiled kernels (`evomerge.merge.native`)."""

    run: Callable[[list[np.ndarray], TensorTask, np.ndarray], None]
    problem: Callable[[TensorTask], str | None]
    bf16: Callable[[list[np.ndarray], TensorTask, np.ndarray], None] | None = None


def numpy_kernel(plan: MergePlan) -> NumpyKernel | None:
    """The numpy twin the plan's method declares (`MethodSpec.numpy_kernel`), or None."""
    ref = plan.method.numpy_kernel
    if ref is None:
        return None
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _loaded_dtype(plan: MergePlan, pool: SourcePool, ref: TensorRef) -> str:
    return plan.compute_dtype_name or pool.get(ref.model).entry(ref.name).dtype


def _linear_problem(task: TensorTask) -> str | None:
    weights = np.array([float(p["weight"]) for p in task.model_params], dtype=np.float32)
    return "weights sum to 0" if bool(task.params["normalize"]) and sum_float32(weights) == 0 else None


# ---- reading -------------------------------------------------------------------------------


class _Reader:
    """Read-only numpy views of tensors in memory-mapped safetensors files (one map per file)."""

    def __init__(self, pool: SourcePool):
        self.pool = pool
        self.maps: dict[Path, mmap.mmap] = {}
        self.lock = threading.Lock()

    def view(self, ref: TensorRef) -> np.ndarray:
        entry = self.pool.get(ref.model).entry(ref.name)
        with self.lock:
            mapped = self.maps.get(entry.file)
            if mapped is None:
                with open(entry.file, "rb") as handle:
                    mapped = self.maps[entry.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = _VIEWED[entry.dtype] if entry.dtype == _BF16 else np.dtype(_VIEWED[entry.dtype]).newbyteorder("<")
        count = (entry.end - entry.begin) // dtype.itemsize
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=entry.begin)

    def close(self) -> None:
        self.maps.clear()  # numpy views keep their map alive until they are gone


# ---- kernels -------------------------------------------------------------------------------


class _Scratch:
    """Per-chunk buffers of one kernel call: float32 and float64 (kept exact copies of float32
    values, so a fused multiply-add is one float64 multiply-add and a rounding to float32)."""

    def __init__(self, n: int):
        c = min(CHUNK, n)
        self.d, self.a32 = np.empty(c, _F32), np.empty(c, _F32)
        self.a64, self.t64 = np.empty(c, _F64), np.empty(c, _F64)

    def fma_(self, w: float, m: int) -> None:
        """``a = round32(a + w * d)`` with one rounding, as torch's ``a.add_(d, alpha=w)`` (an
        FMA; a separate multiply and add differ from it in ~10% of elements, by far more than
        rtol 1e-6 near zero). ``w * d`` of two float32 numbers is exact in float64; the sum is
        rounded to float64 and then to float32, which can differ from one rounding only when
        the float64 sum falls exactly halfway between two float32 numbers (not met in the
        tests, which compare bit for bit)."""
        d, a32, a64, t64 = self.d[:m], self.a32[:m], self.a64[:m], self.t64[:m]
        np.copyto(t64, d)
        np.multiply(t64, w, out=t64)
        np.add(t64, a64, out=t64)
        np.copyto(a32, t64, casting="same_kind")
        np.copyto(a64, a32)


def _task_arithmetic(views: list[np.ndarray], task: TensorTask, out: np.ndarray) -> None:
    """methods.task_arithmetic_kernel without masks: base + lam / divisor * sum_i w_i (x_i - base)."""
    base, inputs = views[0], views[1:]
    weights = np.array([float(p["weight"]) for p in task.model_params], dtype=np.float32)
    live = [(x, float(w)) for x, w in zip(inputs, weights, strict=True) if w != 0]
    divisor = sum_float32(weights) if bool(task.params["normalize"]) else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    alpha = float(np.float32(float(task.params["lambda"]) / divisor))  # torch holds alpha in float32
    n = base.size
    if not live:
        np.copyto(out, base, casting="unsafe")
        return
    sc = _Scratch(n)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        m = e - s
        b = base[s:e]
        for j, (x, w) in enumerate(live):
            np.subtract(x[s:e], b, out=sc.d[:m])
            if j == 0:
                np.multiply(sc.d[:m], np.float32(w), out=sc.a32[:m])
                np.copyto(sc.a64[:m], sc.a32[:m])
            else:
                sc.fma_(w, m)
        # out = round32(b + alpha * a), torch.add(b, a, alpha=alpha)
        a64, t64 = sc.a64[:m], sc.t64[:m]
        np.multiply(a64, alpha, out=a64)
        np.copyto(t64, b)
        np.add(a64, t64, out=a64)
        np.copyto(out[s:e], a64, casting="same_kind")


def _linear(inputs: list[np.ndarray], task: TensorTask, out: np.ndarray) -> None:
    """methods.Linear in float32: sum_i w_i x_i, divided by sum_i w_i when normalizing."""
    weights = np.array([float(p["weight"]) for p in task.model_params], dtype=np.float32)
    divisor = np.float32(sum_float32(weights)) if bool(task.params["normalize"]) else None
    n = inputs[0].size
    sc = _Scratch(n)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        m = e - s
        a32 = sc.a32[:m]
        for j, (x, w) in enumerate(zip(inputs, weights, strict=True)):
            np.copyto(sc.d[:m], x[s:e], casting="same_kind")
            if j == 0:  # torch starts from zeros: round32(0 + w * x), and 0 + (-0.0) is +0.0
                np.multiply(sc.d[:m], w, out=a32)
                a32 += np.float32(0)
                np.copyto(sc.a64[:m], a32)
            else:
                sc.fma_(float(w), m)
        if divisor is not None:
            np.divide(a32, divisor, out=a32)
        np.copyto(out[s:e], a32, casting="same_kind" if out.dtype.itemsize >= 4 else "unsafe")


def _task_arithmetic_bf16(views: list[np.ndarray], task: TensorTask, out: np.ndarray) -> None:
    """methods.task_arithmetic_kernel without masks over bfloat16, as its `_linear_sum_half`:
    ``keep * base + sum_j alpha w_j x_j`` in float32, the weights and their sum rounded to
    bfloat16 as the kernel holds them in a tensor of the working dtype."""
    base, inputs = views[0], views[1:]
    weights = _round_bf16([float(p["weight"]) for p in task.model_params])
    live = [(x, w) for x, w in zip(inputs, weights, strict=True) if w != 0]
    divisor = _round_bf16([sum_float32(weights)])[0] if bool(task.params["normalize"]) else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    if not live:
        np.copyto(out, base)
        return
    alpha = float(task.params["lambda"]) / divisor
    keep = 1.0 - alpha * sum(w for _, w in live)
    native.task_arithmetic_bf16(base, [x for x, _ in live], [alpha * w for _, w in live], keep, out)


def _linear_bf16(inputs: list[np.ndarray], task: TensorTask, out: np.ndarray) -> None:
    """methods.Linear over bfloat16: accumulated in float32 from zero, rounded once."""
    weights = np.array([float(p["weight"]) for p in task.model_params], dtype=np.float32)
    divisor = sum_float32(weights) if bool(task.params["normalize"]) else None
    native.linear_bf16(inputs, [float(w) for w in weights], divisor, out)


def _round_bf16(values: list[float]) -> list[float]:
    """Python floats as torch.tensor(values, dtype=torch.bfloat16) holds them: rounded to float32,
    then to bfloat16, each to nearest even."""
    bits = _to_bf16(np.array(values, dtype=np.float32)).astype(np.uint32) << 16
    return [float(v) for v in bits.view(np.float32)]


def _to_bf16(values: np.ndarray) -> np.ndarray:
    """float32/float16 values as bfloat16 bit patterns, as torch's ``.to(torch.bfloat16)`` casts
    them: through float32, rounded to nearest even, NaN as 0xFFFF."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0xFFFF
    return rounded.view(BFLOAT16)


LINEAR = NumpyKernel(_linear, _linear_problem, _linear_bf16)
TASK_ARITHMETIC = NumpyKernel(_task_arithmetic, lambda task: None, _task_arithmetic_bf16)


# ---- execution -----------------------------------------------------------------------------


class _Buffers:
    """Output buffers handed back for reuse (by size and dtype), so that the large ones (the
    embeddings, the head) are not fresh, page-faulting allocations every time."""

    def __init__(self) -> None:
        self.free: dict[tuple[str, int], list[np.ndarray]] = {}
        self.lock = threading.Lock()

    def get(self, n: int, dtype: np.dtype) -> np.ndarray:
        with self.lock:
            stack = self.free.get((dtype.str, n))
            if stack:
                return stack.pop()
        return np.empty(n, dtype)

    def put(self, buffer: np.ndarray) -> None:
        with self.lock:
            self.free.setdefault((buffer.dtype.str, buffer.size), []).append(buffer)


def run_task(
    task: TensorTask,
    plan: MergePlan,
    reader: _Reader,
    buffers: _Buffers | None = None,
    kernel: NumpyKernel | None = None,
    out: Any = None,
) -> np.ndarray:
    """One output tensor, shaped, in the plan's output dtype (from ``buffers`` when given:
    its ``.base`` goes back there once the caller is done with it). ``kernel``: the plan's
    `numpy_kernel`, looked up when not given. ``out``: a writable buffer of exactly the
    result's bytes (a memory-mapped file's region) that receives it instead."""
    buffers = buffers or _Buffers()
    kernel = kernel or numpy_kernel(plan)
    assert kernel is not None, "unsupported_reason says which plans this executor runs"
    refs = task.refs
    views = [reader.view(ref) for ref in refs]
    # the torch engine casts what it loads to `dtype`, first; bfloat16 work is all bfloat16
    bf16 = plan.compute_dtype_name == _BF16 or dtype_name(views[0]) == _BF16
    if bf16:
        views = [v if dtype_name(v) == _BF16 else _to_bf16(v) for v in views]
    elif plan.compute_dtype_name is not None:
        compute = np.dtype(_STORED[plan.compute_dtype_name])
        views = [v if v.dtype == compute else v.astype(compute) for v in views]
    # The methods return their work dtype: the promoted input dtype (the base alone when
    # task_arithmetic has no other input); the engine then casts to out_dtype.
    promoted = views[:1] if plan.method.requires_base and not task.inputs else views
    work = BFLOAT16 if bf16 else np.result_type(*(v.dtype for v in promoted))
    final = work if plan.out_dtype_name is None or bf16 else np.dtype(_STORED[plan.out_dtype_name])
    target = None if out is None else np.frombuffer(out, dtype=final)
    result = target if target is not None and final == work else buffers.get(views[0].size, work)
    (kernel.bf16 if bf16 else kernel.run)(views, task, result)
    if final != work:
        cast = target if target is not None else buffers.get(result.size, final)
        np.copyto(cast, result, casting="same_kind")
        buffers.put(result)
        result = cast
    return result.reshape(reader.pool.get(refs[0].model).entry(refs[0].name).shape)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def iter_merged(
    plan: MergePlan, pool: SourcePool, *, workers: int | None = None, recycle: bool = False
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, numpy array)`` for every output tensor, in plan order, like
    `evomerge.merge.engine.iter_merged`; ``workers`` threads merge (numpy releases the GIL),
    scheduled as `evomerge.merge.pipeline` says.

    ``recycle``: a yielded array is overwritten once the next one is asked for (its memory is
    reused): for consumers that are done with each tensor at once, such as the writer.
    """
    buffers = _Buffers() if recycle else None
    for task, result in _run_tasks(plan, pool, workers, buffers):
        yield task.name, result
        if buffers is not None:  # the consumer is done with it: its memory serves a later task
            buffers.put(result.base if result.base is not None else result)


def merge_into(plan: MergePlan, pool: SourcePool, targets: Mapping[str, Any], *, workers: int | None = None) -> Iterator[str]:
    """Write every output tensor of ``plan`` into ``targets[name]``, a writable buffer of exactly
    its bytes in the dtype `iter_merged` yields (such as a region of a memory-mapped file);
    yield the names in plan order as they are written. Threads as in `iter_merged`."""
    missing = [task.name for task in plan.tasks if task.name not in targets]
    if missing:
        raise KeyError(f"no target for tensor '{missing[0]}'")
    for task, _ in _run_tasks(plan, pool, workers, _Buffers(), targets):
        yield task.name


def _run_tasks(
    plan: MergePlan, pool: SourcePool, workers: int | None, buffers: _Buffers | None, targets: Mapping[str, Any] | None = None
) -> Iterator[tuple[TensorTask, np.ndarray]]:
    """``(task, run_task(...))`` in plan order, merged by ``workers`` threads (`ordered_parallel`)."""
    reader = _Reader(pool)
    n_workers = max(1, workers if workers is not None else default_workers())
    sizes = [task_size(task, pool) for task in plan.tasks]
    kernel = numpy_kernel(plan)

    def run(task: TensorTask) -> np.ndarray:
        return run_task(task, plan, reader, buffers, kernel, out=None if targets is None else targets[task.name])

    results = ordered_parallel(plan.tasks, run, sizes, n_workers, prefix="evomerge-fast")
    try:
        yield from results
    finally:
        results.close()
        reader.close()
