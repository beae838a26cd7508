"""`LocalWorkerPool`: the WorkerPool interface in the driver's own process, one worker.

For tests, small experiments (`ray: {workers: 0}` or `--local`) and debugging: jobs run one at a
time inside `wait()`, through the same `WorkerCore` as the Ray actors, so a run gives the same
scores either way. Nothing runs in the background: a job submitted and not waited for never runs.

`threads`: torch's intra-op threads while the pool is started (the worker's CPUs, as Ray limits an
actor to its `num_cpus`; restored at shutdown). On shared, busy cores a multi-threaded forward pass
of a small model spins: the digits MLP took 31 ms per pass with 2 threads against 2.5-4.5 ms with
one, measured at load average 3 on 2 cores.

torch is imported where used: the module is also imported on paths that compute nothing.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from evomerge.evaluate.result import EvalResult
from evomerge.memory import held_report, worker_budget
from evomerge.run.jobs import Job, JobOutcome
from evomerge.run.worker_core import WorkerCore, default_device
from evomerge.run.worker_memory import private_memory


class LocalWorkerPool:
    """One in-process worker. `evaluator`: an already built evaluator to use instead of building
    one from the spec given to `start` (the driver built it to validate the experiment)."""

    def __init__(self, *, evaluator: Any | None = None, device: str | None = None, threads: int | None = None, memory: Any = None):
        self._evaluator = evaluator
        self._memory = memory  # the run's evomerge.memory.MemoryBudget (None: no budget)
        self._device = device
        self._threads = threads
        self._saved_threads: int | None = None
        self._core: WorkerCore | None = None
        self._queue: deque[Job] = deque()
        self._directions: dict[str, bool] = {}

    def start(self, sources: dict[str, str], evaluator: dict, *, allow_pickle: bool, dtype: str | None) -> None:
        if self._threads is not None and self._saved_threads is None:
            import torch

            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, int(self._threads)))
        spec: Any = (lambda: self._evaluator) if self._evaluator is not None else evaluator
        budget = worker_budget(self._memory, self._device or default_device())
        self._core = WorkerCore(dict(sources), spec, allow_pickle, dtype, self._device, **budget)
        directions = getattr(self._core.evaluator, "higher_is_better", None)
        self._directions = dict(directions) if isinstance(directions, dict) else {}

    def add_source(self, ref: str, path: str) -> None:
        self._require().add_source(ref, path)

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[JobOutcome]:
        """Run the oldest queued job and return its outcome ([] when nothing is queued)."""
        if not self._queue:
            return []
        job = self._queue.popleft()
        core = self._require()
        started = time.time()
        try:
            result = core.run(job)
        except Exception as exc:  # WorkerCore never raises; this is a last guard
            result = EvalResult.failure(f"{type(exc).__name__}: {exc}", self._directions)
        return [JobOutcome(job.job_id, result, "local-0", 1, started, time.time())]

    @property
    def size(self) -> int:
        return 1

    def idle(self) -> int:
        return 0 if self._queue else 1

    def memory_held(self) -> dict[str, Any]:
        """What each part holds (`evomerge.memory.held_report`): this process is the node and the worker."""
        core = self._require()
        parts = core.memory_parts()
        private, peak = private_memory()
        worker = {"name": "local-0", "memory_parts": parts, "model_bytes": parts.get("skeleton", 0), "private": private, "private_peak": peak}
        node = {"node": "local", "sources": parts.get("sources", 0), "tables": parts.get("caches", 0)}
        return held_report([node], [worker])

    def shutdown(self) -> None:
        self._queue.clear()
        self._core = None
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def _require(self) -> WorkerCore:
        if self._core is None:
            raise RuntimeError("LocalWorkerPool.start() was not called")
        return self._core
