"""Ray worker pool: one actor per worker, sources shared per node through the object store.

Layout on a cluster:

- one *store* actor per node (0 CPUs, pinned to the node) reads each source checkpoint once and
  `ray.put`s it (`evomerge.run.worker_store`); the store owns those objects, so they live as
  long as the pool does;
- one *worker* actor per worker (`num_cpus`/`num_gpus` from the experiment's `ray:` section)
  asks its node's store for the sources, maps them zero-copy and runs a `WorkerCore` (resident
  model skeleton + evaluator, built once);
- TIES/DELLA magnitude ranks are shared per node the same way (`NodeSharedSparsifier`).

Each node reads the sources from the paths the driver gives (`stage:` and `archive:` models are
written in the run directory): on a multi-machine cluster those paths must be readable on every
node (a shared filesystem, or the same layout everywhere).

The driver hands each idle worker the next pending job; while at least one pending job per
worker is left over, a busy worker also holds its next job, which starts the moment the running
one ends (no round trip through the driver between jobs), and near the end of a batch jobs wait
for whichever worker frees first. A worker gives back what merging freed before its evaluator
runs (so the evaluation's activations do not come on top of the merge's temporaries) and after
each job, with MKL's GEMM buffers (`evomerge.run.worker_memory`); it meters its private memory
per job (`MemoryMeter`, in `worker_stats()`). A worker that dies (killed, out of memory,
segfault) is replaced by a fresh actor and its job retried, up to `MAX_ATTEMPTS` attempts in all;
then the job comes back as a failed outcome and the pool goes on. Ray is started locally (bound to 127.0.0.1, dashboard off) unless `address` says to
join a running cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`); an already initialized Ray
(a test fixture, an application) is used as it is.

Ray is imported inside the functions that start or talk to it: `--local` runs and the
in-process paths never load it (it takes seconds).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluate.result import EvalResult
from evomerge.run.jobs import MAX_ATTEMPTS, Job, JobOutcome
from evomerge.run.worker_memory import (
    MemoryMeter,
    MeteredEvaluator,
    private_memory,
    release_blas_buffers,
    release_free_memory,
)

_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_START_TIMEOUT_S = 300.0
_MAX_REPLACEMENTS_IN_A_ROW = 10


# ---- Ray start ----------------------------------------------------------------------------------


@contextmanager
def _loopback_only():
    """Make Ray take 127.0.0.1 as this node's address (and its servers bind there).

    Ray turns 127.0.0.1 into the host's routable address unless its multi-machine mode is off
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read once at import). We switch it off only while a
    local instance starts (its processes inherit the variable), then restore it, so a later
    join of a real cluster from this process is unaffected.
    """
    old_env = os.environ.get(_CLUSTER_ENV)
    os.environ[_CLUSTER_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    old_const = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = old_env
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = (
                old_const
                if old_const is not None
                else constants.env_bool(_CLUSTER_ENV, not constants.IS_WINDOWS_OR_OSX)
            )


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
) -> bool:
    """Start or join Ray unless it is already initialized; True when this call initialized it.

    address None/"local": a new local instance on 127.0.0.1, dashboard off, with `num_cpus`
    (default: all cores) and `num_gpus`. "auto", "HOST:PORT" or "ray://HOST:PORT": join that
    cluster (its resources are its own). Worker output is not echoed to this process (errors
    come back in the results); set EVOMERGE_RAY_LOGS=1 to see it.
    """
    with _loopback_only() if address in (None, "local") else _nothing():
        import ray

        if ray.is_initialized():
            return False
        log_to_driver = os.environ.get("EVOMERGE_RAY_LOGS", "0") == "1"
        if address in (None, "local"):
            # local workers inherit this process's environment (offline flags, cache dir)
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_memory,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                _node_ip_address="127.0.0.1",
            )
        else:
            env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_", "EVOMERGE_"))}
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env} if env else None)
        return True


@contextmanager
def _nothing():
    yield


# ---- actors ---------------------------------------------------------------------------------------


class _StoreActor:
    """Reads each source once on its node and keeps the packed object alive (it owns it)."""

    def __init__(self, allow_pickle: bool):
        self.allow_pickle = allow_pickle
        self._objects: dict[tuple[str, str], Any] = {}
        self._nbytes: dict[tuple[str, str], int] = {}
        self._tables: dict[str, Any] = {}

    def load(self, ref: str, path: str) -> list:
        """The object ref of the packed source, in a list so that Ray passes it unresolved."""
        import ray

        from evomerge.run.worker_store import pack_source

        key = (ref, path)
        if key not in self._objects:
            packed = pack_source(ref, path, ray.put, allow_pickle=self.allow_pickle)
            self._nbytes[key] = packed["nbytes"]
            self._objects[key] = ray.put(packed)  # its nested refs keep the tensors alive
        return [self._objects[key]]

    def offer(self, offers: dict[str, list]) -> None:
        """Keep a copy of each table offered that the node lacks (key -> [ref] of a table a
        worker put; the copy is this actor's, so it outlives that worker: the first offered
        wins)."""
        import ray

        fresh = {key: wrapped[0] for key, wrapped in offers.items() if key not in self._tables}
        if fresh:
            values = ray.get(list(fresh.values()))
            for key, value in zip(fresh, values, strict=True):
                self._tables[key] = ray.put(value)
            del values

    def tables(self) -> dict[str, list]:
        """Every rank table of the node, key -> [ref] (see NodeSharedSparsifier)."""
        return {key: [ref] for key, ref in self._tables.items()}

    def nbytes(self) -> dict[str, int]:
        """Bytes this node's store holds: packed sources and shared rank tables."""
        import ray

        sources = sum(self._nbytes.values())
        tables = sum(int(ray.get(obj).nbytes) for obj in self._tables.values())
        return {"sources": sources, "tables": tables}


class _WorkerActor:
    """One worker: a WorkerCore over sources mapped from its node's store."""

    def __init__(self, slot: int, workers: int = 1):
        import ray

        self.slot = slot
        self.workers = max(1, workers)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.core = None
        self.setup_error: str | None = None
        self._shared: dict[str, Any] = {}  # ref -> its arrays (the zero-copy views of the store's)
        self._meter = MemoryMeter()
        self._job_cpu: collections.deque[float] = collections.deque(maxlen=1000)  # CPU seconds per job
        self._source_errors: dict[str, str] = {}

    def where(self) -> tuple[str, int]:
        return self.node_id, os.getpid()

    def setup(self, store, sources: dict[str, str], evaluator, allow_pickle: bool, dtype, device, memory=None) -> dict:
        """Build the WorkerCore; returns the evaluator's objective directions (maybe empty).
        memory: the run's `MemoryBudget` (None: no budget)."""
        from evomerge.memory import worker_budget
        from evomerge.run.worker_core import WorkerCore, default_device
        from evomerge.run.worker_store import NodeSharedSparsifier

        try:
            tensors = {ref: self._fetch(store, ref, path) for ref, path in sources.items()}
            budget = worker_budget(memory, device or default_device())
            sparsifier = NodeSharedSparsifier(
                store, self._identity, release=release_free_memory, budget_bytes=budget.get("cache_budget")
            )
            self.core = WorkerCore(
                sources, evaluator, allow_pickle, dtype, device, tensors=tensors, sparsifier=sparsifier, **budget
            )
            self.core.evaluator = MeteredEvaluator(self.core.evaluator, self._meter)
            # workers start merging at different tensors: their first jobs share rank tables
            self.core.merge_offset = (self.slot % self.workers) / self.workers
            self._meter.set_base()  # interpreter, libraries, evaluator; sources are shared memory
        except Exception as exc:
            self.setup_error = f"worker setup failed: {type(exc).__name__}: {exc}"
            raise
        return self.core.directions

    def _identity(self, ref: str) -> str:
        """What a source ref stands for on this worker (ref and directory)."""
        aliases = self.core.pool.aliases if self.core is not None else {}
        return f"{ref}={aliases[ref]}" if ref in aliases else ref

    def add_source(self, store, ref: str, path: str) -> None:
        """Nobody waits for this call: a failure is kept and reported by the jobs that use `ref`."""
        if self.core is None:
            return
        try:
            self.core.add_source(ref, path, self._fetch(store, ref, path))
            self._source_errors.pop(ref, None)
        except Exception as exc:
            self._source_errors[ref] = f"source '{ref}' ({path}) could not be loaded: {type(exc).__name__}: {exc}"

    def _fetch(self, store, ref: str, path: str):
        import ray

        from evomerge.run.worker_store import unpack

        packed = ray.get(ray.get(store.load.remote(ref, path))[0])
        arrays = ray.get(packed["objects"])
        self._shared[ref] = arrays
        return unpack(packed["index"], arrays)

    def run(self, job: Job) -> tuple[EvalResult, float, float, str]:
        started = time.time()
        broken = [self._source_errors[r] for r in job.recipe.model_refs() if r in self._source_errors]
        if self.core is None:
            result = EvalResult.failure(self.setup_error or "worker is not set up", {})
        elif broken:
            result = EvalResult.failure(broken[0], self.core.directions)
        else:
            self._meter.job_starts()
            cpu = time.process_time()
            result = self.core.run(job)
            settle = getattr(self.core.sparsifier, "settle", None)
            if settle is not None:
                settle()  # read the node's copies of the rank tables this job put
            release_blas_buffers()  # the evaluation's GEMM scratch, not held while the next job merges
            release_free_memory()
            self._meter.job_ends()
            self._job_cpu.append(time.process_time() - cpu)
        return result, started, time.time(), f"ray-w{self.slot}@{self.node_id[:8]}:{os.getpid()}"

    def stats(self) -> dict:
        """Memory of this worker process (for tests and benchmarks)."""
        import psutil

        process = psutil.Process()
        info = process.memory_full_info()
        cpu = process.cpu_times()
        private, private_peak = private_memory()
        return {
            **self._meter.figures(),
            "pid": os.getpid(),
            "node_id": self.node_id,
            "rss": info.rss,
            "uss": info.uss,
            "private": private,
            "private_peak": private_peak,
            "cpu_seconds": cpu.user + cpu.system,
            "job_cpu_seconds": list(self._job_cpu),  # per job (the last 1000), in the order run
            "model_bytes": self.core.model_bytes() if self.core else 0,
            "models_built": self.core.models_built if self.core else 0,
            "sparsifier_bytes": self.core.sparsifier.nbytes() if self.core else 0,  # incl. shared views
            "sparsifier_ranks_computed": self.core.sparsifier.rank_computations if self.core else 0,
            "sparsifier_shared_hits": getattr(self.core.sparsifier, "shared_hits", 0) if self.core else 0,
            # rank tables this worker still reads from its own copy, not the node's (0 once settled)
            "sparsifier_own_tables": getattr(self.core.sparsifier, "own_tables", 0) if self.core else 0,
            "memory_parts": self.core.memory_parts() if self.core else {},  # bytes: sources, caches, skeleton
            "cache_fallbacks": self.core.sparsifier.fallbacks if self.core else 0,  # tensors beyond the cache budget
        }


# ---- the pool -----------------------------------------------------------------------------------------


@dataclass
class _Running:
    job: Job
    attempts: int
    dispatched: float


@dataclass
class _Slot:
    index: int
    actor: Any
    ready: Any | None = None  # ObjectRef of `where()` while the actor is starting
    node_id: str | None = None
    pid: int | None = None
    running: _Running | None = None
    pending_run: Any | None = None  # ObjectRef of the current `run`
    queued: _Running | None = None  # the job sent to wait behind `running` on the actor
    queued_run: Any | None = None  # ObjectRef of its `run`

    @property
    def name(self) -> str:
        """As the actor names itself: ray-w<slot>@<node id prefix>:<pid>."""
        return f"ray-w{self.index}@{(self.node_id or '?')[:8]}:{self.pid}"


@dataclass
class RayWorkerPool:
    """`WorkerPool` on Ray actors (see the module docstring).

    workers: number of actors; num_cpus_per_worker / num_gpus_per_worker: what each asks Ray
    for (a worker with a GPU evaluates on `cuda`); resources_per_worker: extra custom Ray
    resources each asks for; address: None (local Ray), "auto", "HOST:PORT" or "ray://...";
    num_cpus: CPUs of a local Ray instance (default workers x num_cpus_per_worker).
    """

    workers: int = 1
    num_cpus_per_worker: float = 1
    num_gpus_per_worker: float = 0
    address: str | None = None
    num_cpus: int | None = None
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    start_timeout: float = _START_TIMEOUT_S
    memory: Any = None  # the run's evomerge.memory.MemoryBudget: object store size, worker budgets

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        self._slots: list[_Slot] = []
        self._stores: dict[str, Any] = {}
        self._pending: collections.deque[tuple[Job, int]] = collections.deque()
        self._done: list[JobOutcome] = []
        self._sources: dict[str, str] = {}
        self._directions: dict[str, bool] = {}
        self._started = False
        self._owns_ray = False
        self._replacements_in_a_row = 0
        self.replacements = 0  # actors replaced after a death, over the pool's life

    @classmethod
    def from_config(cls, ray_config: Mapping[str, Any] | None, **overrides: Any) -> RayWorkerPool:
        """From an experiment's `ray:` section: {address, workers, num_cpus_per_worker,
        num_gpus_per_worker, num_cpus, resources_per_worker}."""
        cfg = dict(ray_config or {})
        keys = {"address", "workers", "num_cpus_per_worker", "num_gpus_per_worker", "num_cpus", "resources_per_worker"}
        kwargs = {k: v for k, v in cfg.items() if k in keys and v is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---- WorkerPool ---------------------------------------------------------------------------
    def start(
        self, sources: dict[str, str], evaluator: dict, *, allow_pickle: bool, dtype: str | None
    ) -> None:
        """Start the actors and wait until every one holds the sources and its evaluator."""
        if self._started:
            raise RuntimeError("the pool is already started")
        import ray

        local_cpus = self.num_cpus
        if local_cpus is None:
            local_cpus = max(1, int(round(self.workers * self.num_cpus_per_worker)))
        store_bytes = self.memory.object_store if self.memory is not None else None
        self._owns_ray = init_ray(self.address, num_cpus=local_cpus, object_store_memory=store_bytes)
        self._sources = {ref: str(path) for ref, path in sources.items()}
        self._evaluator = evaluator
        self._allow_pickle = allow_pickle
        self._dtype = dtype
        self._started = True
        self._actor_cls = ray.remote(_WorkerActor)
        self._store_cls = ray.remote(_StoreActor)
        if self.address in (None, "local"):  # nothing joins a local instance: fail now
            self._check_resources(ray.cluster_resources())
        self._slots = [self._new_slot(i) for i in range(self.workers)]
        deadline = time.monotonic() + self.start_timeout
        setups = []
        for slot in self._slots:
            self._await_ready(slot, deadline)
            setups.append(slot.pending_run)
        try:
            directions = ray.get(setups, timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(f"Ray workers did not load their sources within {self.start_timeout:.0f} s") from None
        except ray.exceptions.RayTaskError as exc:
            self.shutdown()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EvomergeError):  # e.g. a bad evaluator spec: the user's to fix
                raise cause from None
            raise RuntimeError(f"a Ray worker could not start: {_short(cause or exc)}") from None
        except _deaths() as exc:
            self.shutdown()
            raise RuntimeError(f"a Ray worker died while loading its sources: {_short(exc)}") from None
        for slot, found in zip(self._slots, directions, strict=True):
            slot.pending_run = None
            self._directions.update(found)

    def add_source(self, ref: str, path: str) -> None:
        """Every worker (and any later replacement) gets `ref`; jobs submitted after this call see it."""
        self._sources[ref] = str(path)
        for slot in self._slots:
            if slot.ready is None:
                slot.actor.add_source.remote(self._store(slot.node_id), ref, str(path))

    def submit(self, job: Job) -> None:
        self._check_started()
        self._pending.append((job, 0))
        self._dispatch()

    def wait(self, timeout: float | None = None) -> list[JobOutcome]:
        """Finished jobs (at least one unless `timeout` passes or nothing is pending)."""
        import ray

        self._check_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            self._dispatch()
            waiting = {s.ready: s for s in self._slots if s.ready is not None}
            waiting.update({s.pending_run: s for s in self._slots if s.pending_run is not None})
            if not waiting:
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=left)
            if not ready:
                break
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            for ref in ready:
                self._settle(waiting[ref], ref)
            if deadline is not None and time.monotonic() >= deadline:
                break
        self._dispatch()
        done, self._done = self._done, []
        return done

    @property
    def size(self) -> int:
        return self.workers

    def idle(self) -> int:
        return sum(1 for s in self._slots if s.running is None)

    def pending(self) -> int:
        """Jobs submitted and not yet finished (queued or running)."""
        held = sum((s.running is not None) + (s.queued is not None) for s in self._slots)
        return len(self._pending) + held

    def shutdown(self) -> None:
        """Kill the actors and the stores; shut Ray down if this pool started it."""
        import ray

        if not ray.is_initialized():
            return
        for slot in self._slots:
            ray.kill(slot.actor, no_restart=True)
        for store in self._stores.values():
            ray.kill(store, no_restart=True)
        self._slots, self._stores = [], {}
        self._started = False
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # ---- introspection (tests, benchmarks) ------------------------------------------------------
    def worker_stats(self) -> list[dict]:
        import ray

        return ray.get([s.actor.stats.remote() for s in self._slots])

    def memory_held(self) -> dict[str, Any]:
        """What each part holds (`evomerge.memory.held_report`): per node the store's sources and
        shared caches, per worker its own accounting (call it while the workers are idle: a
        busy actor answers after its jobs)."""
        import ray

        from evomerge.memory import held_report

        held = ray.get([s.nbytes.remote() for s in self._stores.values()])
        nodes = [{"node": node[:8], **found} for node, found in zip(self._stores, held, strict=True)]
        total = ray.cluster_resources().get("object_store_memory")
        free = ray.available_resources().get("object_store_memory")
        used = None if total is None or free is None else int(total - free)
        return held_report(nodes, self.worker_stats(), object_store_used=used)

    def actors(self) -> list[Any]:
        return [s.actor for s in self._slots]

    def store_bytes(self, *, tables: bool = False) -> dict[str, int]:
        """Per node, bytes of packed sources its store holds (plus shared rank tables with
        `tables=True`)."""
        import ray

        held = ray.get([s.nbytes.remote() for s in self._stores.values()])
        return {
            node: found["sources"] + (found["tables"] if tables else 0)
            for node, found in zip(self._stores, held, strict=True)
        }

    # ---- internals ------------------------------------------------------------------------------
    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("start() the pool first")

    def _check_resources(self, cluster: Mapping[str, float]) -> None:
        """Fail now, not after the start timeout, when the local Ray cannot hold the workers
        (a joined cluster may still grow: there the start timeout applies)."""
        wanted = {"CPU": self.num_cpus_per_worker, "GPU": self.num_gpus_per_worker, **self.resources_per_worker}
        fields = {"CPU": "num_cpus_per_worker", "GPU": "num_gpus_per_worker"}
        for name, each in wanted.items():
            have = float(cluster.get(name, 0.0))
            if each > 0 and self.workers * each > have + 1e-9:
                self.shutdown()
                raise ConfigError(
                    f"{self.workers} workers x {each:g} {name} each need {self.workers * each:g} {name}, "
                    f"the Ray cluster has {have:g}: lower ray.workers or ray.{fields.get(name, 'resources_per_worker')}",
                    field=f"ray.{fields.get(name, 'resources_per_worker')}",
                )

    def _new_slot(self, index: int) -> _Slot:
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus_per_worker,
            "num_gpus": self.num_gpus_per_worker,
            "max_restarts": 0,
        }
        if self.resources_per_worker:
            options["resources"] = dict(self.resources_per_worker)
        actor = self._actor_cls.options(**options).remote(index, self.workers)
        return _Slot(index, actor, ready=actor.where.remote())

    def _await_ready(self, slot: _Slot, deadline: float) -> None:
        """Block until the slot's actor is placed (start() only), then send it its setup."""
        import ray

        try:
            where = ray.get(slot.ready, timeout=max(1.0, deadline - time.monotonic()))
        except _deaths() as exc:
            self.shutdown()
            raise RuntimeError(f"a Ray worker died while starting: {_short(exc)}") from None
        except ray.exceptions.GetTimeoutError:
            resources = ray.available_resources()
            self.shutdown()
            raise RuntimeError(
                f"Ray could not place {self.workers} workers with num_cpus_per_worker={self.num_cpus_per_worker}, "
                f"num_gpus_per_worker={self.num_gpus_per_worker}, resources={self.resources_per_worker} "
                f"within {self.start_timeout:.0f} s (available: {resources})"
            ) from None
        self._configure(slot, where)

    def _configure(self, slot: _Slot, where: tuple[str, int]) -> None:
        slot.node_id, slot.pid = where
        slot.ready = None
        slot.pending_run = slot.actor.setup.remote(
            self._store(slot.node_id), dict(self._sources), self._evaluator, self._allow_pickle, self._dtype, self.device,
            self.memory,
        )

    def _store(self, node_id: str):
        store = self._stores.get(node_id)
        if store is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            store = self._store_cls.options(
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self._allow_pickle)
            self._stores[node_id] = store
        return store

    def _dispatch(self) -> None:
        """Idle workers take the next jobs. Then, while more jobs than workers are left
        over, a busy worker gets its next job to hold behind the running one: it starts the
        moment the running one ends, without waiting for the driver's round trip (which on a
        busy machine costs tens of milliseconds). With several workers the last `workers` jobs
        of a batch are never held: they stay here for whichever worker frees first, since a job
        held behind a long one would leave the other workers idle at the end of a generation
        (measured: a worker idle for 1.1 s of a 2.3 s generation)."""
        now = time.time()
        for slot in self._slots:
            if not self._pending:
                return
            if slot.ready is None and slot.running is None and slot.pending_run is None:
                job, attempts = self._pending.popleft()
                slot.running = _Running(job, attempts, now)
                slot.pending_run = slot.actor.run.remote(job)
        keep = self.workers if self.workers > 1 else 0  # one worker: holding never unbalances
        for slot in self._slots:
            if len(self._pending) <= keep:
                return
            if slot.ready is None and slot.running is not None and slot.queued is None and slot.pending_run is not None:
                job, attempts = self._pending.popleft()
                slot.queued = _Running(job, attempts, now)
                slot.queued_run = slot.actor.run.remote(job)

    def _settle(self, slot: _Slot, ref: Any) -> None:
        """One of the slot's refs finished: placement, setup, a result, or the actor's death."""
        import ray

        _DEATHS = _deaths()
        starting = slot.ready is not None and ref == slot.ready
        try:
            value = ray.get(ref)
        except _DEATHS as exc:
            self._replace(slot, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # setup raised (the evaluator cannot be built)
            if slot.running is None:
                slot.pending_run = None  # `run` will answer with the setup error
                return
            value = (EvalResult.failure(f"worker error: {exc}", self._directions), slot.running.dispatched, time.time(), slot.name)
        if starting:
            self._configure(slot, value)
            return
        slot.pending_run = None
        if slot.running is None:  # setup finished
            self._directions.update(value or {})
            return
        result, started, finished, worker = value
        if not result.failed:
            self._directions.update(result.higher_is_better)
        self._replacements_in_a_row = 0
        self._done.append(JobOutcome(slot.running.job.job_id, result, worker, slot.running.attempts + 1, started, finished))
        slot.running, slot.pending_run = slot.queued, slot.queued_run  # the held job runs now
        slot.queued = slot.queued_run = None

    def _replace(self, slot: _Slot, exc: Exception) -> None:
        """The slot's actor died: retry its job on a fresh actor, or fail it after MAX_ATTEMPTS."""
        import ray

        running, slot.running = slot.running, None
        if slot.queued is not None:  # it never started: back to the queue, no attempt spent
            self._pending.appendleft((slot.queued.job, slot.queued.attempts))
            slot.queued = slot.queued_run = None
        self.replacements += 1
        self._replacements_in_a_row += 1
        if self._replacements_in_a_row > _MAX_REPLACEMENTS_IN_A_ROW * self.workers:
            raise RuntimeError(f"Ray workers keep dying ({self._replacements_in_a_row} in a row); last: {_short(exc)}")
        ray.kill(slot.actor, no_restart=True)
        if running is not None:
            attempts = running.attempts + 1
            if attempts >= MAX_ATTEMPTS:
                result = EvalResult.failure(
                    f"worker died {attempts} times while evaluating this candidate (last: {_short(exc)})",
                    self._directions,
                )
                self._done.append(JobOutcome(running.job.job_id, result, slot.name, attempts, running.dispatched, time.time()))
            else:
                self._pending.appendleft((running.job, attempts))
        fresh = self._new_slot(slot.index)
        slot.actor, slot.ready, slot.pending_run = fresh.actor, fresh.ready, None
        slot.node_id = slot.pid = None


def _deaths() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
