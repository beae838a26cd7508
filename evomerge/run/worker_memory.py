"""A worker's private memory: giving freed memory back, and metering it per job.

Glibc keeps freed heap pages and MKL keeps its GEMM packing buffers for the life of the
process, so without `release_free_memory` and `release_blas_buffers` a merge's temporaries and
the last evaluation's BLAS buffers would stay resident in every worker while it holds its
model and merges the next candidate. `MemoryMeter` measures what a worker holds beyond its base
(taken after setup), split where the evaluator is called (`MeteredEvaluator`).

ctypes, torch and psutil are imported inside the helpers: each is needed by one of them only,
and importing this module must stay free of torch.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any


def release_free_memory() -> None:
    """Give memory freed during a job back to the system (glibc keeps freed heap pages, so
    the temporaries of one merge would otherwise stay resident in every worker)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to do
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def release_blas_buffers() -> None:
    """Free the buffers MKL's memory manager keeps after a GEMM (its packed panels: ~3.5 MB for
    the scheduler benchmark's model, more for wider ones) until the next evaluation needs them.

    Called after each job, so a worker merging its next candidate holds its model and not the
    last evaluation's scratch. Measured on the scheduler benchmark's model: an evaluation that
    starts with no buffers costs what one that finds them does (median 0.52 s CPU against 0.53 s,
    24 alternating runs of each at load ~1); only the memory differs. A torch without MKL (or with MKL linked
    privately) has nothing to free here.
    """
    global _MKL_FREE
    if _MKL_FREE is None:
        _MKL_FREE = _find_mkl_free()
    if _MKL_FREE:
        _MKL_FREE()


def _find_mkl_free() -> Any:
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return False
    names = ("mkl_serv_free_buffers", "mkl_free_buffers", "MKL_Free_Buffers")
    libraries = [os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None]
    for library in libraries:
        try:
            handle = ctypes.CDLL(library)
        except OSError:
            continue
        for name in names:
            function = getattr(handle, name, None)
            if function is not None:
                function.restype = None
                return function
    return False


_MKL_FREE: Any = None


def private_memory() -> tuple[int, int]:
    """(now, peak) bytes of this process's private memory: anonymous resident pages now, and
    the peak resident size less what is file-backed or shared memory (the object store)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[name] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: USS for both
        import psutil

        uss = psutil.Process().memory_full_info().uss
        return uss, uss
    now = fields.get("RssAnon", 0)
    peak = fields.get("VmHWM", 0) - fields.get("RssFile", 0) - fields.get("RssShmem", 0)
    return now, max(now, peak)


def reset_peak() -> bool:
    """Restart this process's peak resident size (VmHWM) from its current size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """This worker's private memory around each job, split where the evaluator is called.

    Private memory is what the process alone holds: anonymous pages, not the sources and rank
    tables it maps from the node's object store (see `private_memory`). Per job, the peak
    resident size is restarted (`reset_peak`) when the job starts and again when the evaluator
    is called, which splits the job in two phases:

    - *merge*: planning, the skeleton (built once per architecture), the merge's temporaries;
      its peak is what holding and materializing a candidate costs;
    - *evaluate*: the evaluator's working set (activations, logits) on top of what is resident
      when it starts (the merged model), which any worker pays at the configured batch size.

    Figures are bytes over the base taken after setup, the maximum over the jobs so far. The
    peak of a phase counts shared pages as mapped at its end, so the rank tables a job maps
    from the store while it runs (a worker's first job, mostly) can hide up to their size from
    that job's merge peak: `first_job_merge_peak` is that job's figure, kept apart.
    """

    def __init__(self) -> None:
        self.base = 0
        self.set_base(0)

    def set_base(self, base: int | None = None) -> None:
        """Measure from here on (default: from this process's private memory now, once freed
        memory is given back: pages glibc kept would count in the base and then be reused)."""
        if base is None:
            release_free_memory()
        self.base = private_memory()[0] if base is None else base
        self.jobs = 0
        self._resettable = True
        self._maxima = {
            "merge_peak": 0,
            "resident": 0,
            "evaluate_peak": 0,
            "eval_working_set": 0,
            "after_job": 0,
        }
        self._first_merge_peak = 0
        self._at_eval_start = 0
        self._job_start: float | None = None
        self._merge_seconds: deque[float] = deque(maxlen=1000)  # per job: its start to the evaluator's call

    def job_starts(self) -> None:
        self._resettable = reset_peak()
        self._at_eval_start = 0
        self._job_start = time.perf_counter()

    def evaluation_starts(self) -> None:
        if self._job_start is not None:
            self._merge_seconds.append(time.perf_counter() - self._job_start)
            self._job_start = None
        now, peak = private_memory()
        self._at_eval_start = now
        self._raise("merge_peak", peak - self.base)
        if self.jobs == 0:
            self._first_merge_peak = peak - self.base
        self._raise("resident", now - self.base)
        self._resettable = reset_peak()

    def evaluation_ends(self) -> None:
        peak = private_memory()[1]
        self._raise("evaluate_peak", peak - self.base)
        if self._at_eval_start and self._resettable:
            self._raise("eval_working_set", peak - self._at_eval_start)

    def job_ends(self) -> None:
        self.jobs += 1
        self._maxima["after_job"] = private_memory()[0] - self.base

    def _raise(self, name: str, value: int) -> None:
        self._maxima[name] = max(self._maxima[name], value)

    def figures(self) -> dict[str, int]:
        """private_base, and over it: merge_peak, resident, evaluate_peak, eval_working_set,
        after_job (after the last job), first_job_merge_peak, jobs_metered; merge_seconds: per
        job (the last 1000), wall seconds from its start to the evaluator's call."""
        return {
            "private_base": self.base,
            **self._maxima,
            "first_job_merge_peak": self._first_merge_peak,
            "jobs_metered": self.jobs,
            "merge_seconds": list(self._merge_seconds),
        }


class MeteredEvaluator:
    """The worker's evaluator. Before each evaluation the merge's freed temporaries go back to
    the system (glibc would keep them, and the evaluation's activations would come on top);
    the meter hears when each evaluation starts and ends."""

    def __init__(self, inner: Any, meter: MemoryMeter):
        self._inner = inner
        self._meter = meter

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        release_free_memory()
        self._meter.evaluation_starts()
        try:
            return self._inner.evaluate(*args, **kwargs)
        finally:
            self._meter.evaluation_ends()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
