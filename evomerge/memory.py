"""The `memory:` section: what a run may hold per node and per worker, and what it holds.

A node holds each source once (the Ray object store, or the driver's process for in-process
workers), the rank/threshold caches of the TIES family once (shared by the node's workers),
and per worker one merged model (its skeleton) plus the worker's own state (interpreter,
libraries, the evaluator's working set). Example::

    memory:
      node:
        limit: 85%          # all of it together; % of the RAM available when the run starts, or bytes ("20GB")
        caches: auto        # rank tables; auto: what `limit` leaves after the sources and the workers
        object_store: auto  # Ray's object store; auto: the sources and the caches, plus 10%
      worker:
        state: 1GB          # per worker: interpreter, libraries, the evaluator's working set
        gpu: 90%            # of a GPU worker's free GPU memory: its skeleton, then sources held there

Sizes are bytes (an integer), a string with a unit (kB, MB, GB, TB, KiB, MiB, GiB, TiB) or a
percentage. `resolve_memory` turns the section into a `MemoryBudget` for the run's sources and
workers: a run whose sources and skeletons alone exceed the node's limit fails before anything
starts, with one line naming the field. The cache budget goes to the sparsifiers (beyond it a
tensor's threshold comes from a one-shot selection: the same masks, more time); the GPU budget
to GPU workers. `write_memory_report` keeps the budget and what each part holds (from the
workers' own accounting) in the run directory's memory.json, which `evomerge status` and the
report show (`memory_lines`).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import ConfigError
from evomerge.fsutil import atomic_write_text

MEMORY_FILE = "memory.json"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
OBJECT_STORE_SLACK = 0.10  # Ray's store fragments: room beyond what it is sized for


def parse_size(value: Any, whole: int | None = None) -> int | None:
    """Bytes of a size: an integer, "12GB", "512 MiB", or "85%" of `whole`; None for "auto"/None.
    Raises ValueError saying what is valid."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ValueError(f"must be bytes, a size such as '8GB' or a percentage such as '50%', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return int(value)
    text = str(value)
    percent = _PERCENT.match(text)
    if percent:
        fraction = float(percent.group(1)) / 100
        if fraction > 1:
            raise ValueError(f"a percentage must be at most 100%, got {text!r}")
        return None if whole is None else int(fraction * whole)
    size = _SIZE.match(text)
    if size and size.group(2).lower() in _UNITS:
        return int(float(size.group(1)) * _UNITS[size.group(2).lower()])
    raise ValueError(f"must be bytes, a size such as '8GB' or '512MiB', a percentage such as '50%' or 'auto', got {value!r}")


def is_percent(value: Any) -> bool:
    return isinstance(value, str) and bool(_PERCENT.match(value))


def gb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        parse_size(value, 1)  # raises with what is valid
        return value


class NodeMemory(_Section):
    """Per node: the limit of everything, the shared caches, Ray's object store."""

    limit: int | str = "85%"
    caches: int | str = "auto"
    object_store: int | str = "auto"


class WorkerMemory(_Section):
    """Per worker: its own state beside its skeleton, and the share of its GPU it may use."""

    state: int | str = "1GB"
    gpu: int | str = "90%"


class MemorySpec(BaseModel):
    """The experiment's `memory:` section (every field has a default from the machine)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    node: NodeMemory = Field(default_factory=NodeMemory)
    worker: WorkerMemory = Field(default_factory=WorkerMemory)


@dataclass(frozen=True)
class MemoryBudget:
    """A run's memory budget in bytes, resolved for its sources and workers on this machine.

    available: RAM available when it was resolved; limit: all a node may hold; sources: each
    source once; workers: per node; skeleton: one merged model; state: per worker beside its
    skeleton (and the driver's, when it is a process apart: `driver_apart`); caches: the node's
    shared caches; object_store: Ray's store (None in-process);
    gpu_fraction or gpu_bytes: a GPU worker's share of its GPU (a fraction of its free memory,
    resolved on the worker, or bytes).
    """

    available: int
    limit: int
    sources: int
    workers: int
    skeleton: int
    state: int
    caches: int
    object_store: int | None
    gpu_fraction: float | None
    gpu_bytes: int | None = None
    driver_apart: bool = False  # a Ray run: the driver is a process of its own (its state counts)

    @property
    def planned(self) -> int:
        """What the node is planned to hold: sources, caches, each worker's skeleton and state (and
        the driver's state when it is a process apart)."""
        return self.sources + self.caches + self.workers * (self.skeleton + self.state) + self.driver_apart * self.state

    def gpu_budget(self, free_gpu_bytes: int, skeleton_bytes: int = 0) -> int:
        """Bytes of sources a GPU worker may hold on its GPU: its share of the free memory less
        its skeleton (0: stream every source tensor)."""
        share = self.gpu_bytes if self.gpu_bytes is not None else int((self.gpu_fraction or 0.0) * free_gpu_bytes)
        return max(0, min(share, free_gpu_bytes) - skeleton_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "planned": self.planned}


_ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}


def sources_and_skeleton(pool: Any, refs: list[str], dtype: str | None) -> tuple[int, int]:
    """(bytes of the sources, each directory once; bytes of the largest as a model of `dtype`,
    default its own dtypes): what a node holds once and what one skeleton weighs. `pool`: a
    `SourcePool` (headers only: nothing is loaded)."""
    seen: dict[str, tuple[int, int]] = {}
    for ref in refs:
        source = pool.get(ref)
        key = str(source.path)
        if key in seen:
            continue
        stored = model = 0
        for name in source.names:
            shape, own = _shape_dtype(source, name)
            numel = 1
            for d in shape:
                numel *= d
            stored += numel * _ITEM_BYTES.get(own, 4)
            model += numel * _ITEM_BYTES.get(dtype or own, 4)
        seen[key] = (stored, model)
    return sum(s for s, _ in seen.values()), max((m for _, m in seen.values()), default=0)


def _shape_dtype(source: Any, name: str) -> tuple[tuple[int, ...], str]:
    try:
        entry = source.entry(name)
        return tuple(entry.shape), str(entry.dtype)
    except Exception:  # a pickled checkpoint: its tensor says
        tensor = source.get(name)
        return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def available_memory() -> int:
    """RAM available to new allocations now (MemAvailable: free memory plus reclaimable cache)."""
    import psutil  # a dependency of Ray's and of evomerge's worker metering

    return int(psutil.virtual_memory().available)


def resolve_memory(
    spec: MemorySpec | None,
    *,
    sources: int,
    skeleton: int,
    workers: int,
    ray: bool,
    available: int | None = None,
    file: str | None = None,
) -> MemoryBudget:
    """The budget of `spec` (None: the defaults) for `sources` bytes of sources, `workers`
    skeletons of `skeleton` bytes each, on a node with `available` bytes of RAM (default: now).
    Raises ConfigError naming the field when the sources and skeletons do not fit the limit,
    or an explicit cache or object-store size does not fit what they leave."""
    spec = spec or MemorySpec()
    available = available_memory() if available is None else available
    node, worker = spec.node, spec.worker
    limit = parse_size(node.limit, available)
    limit = int(0.85 * available) if limit is None else limit
    state = parse_size(worker.state, available) or 0
    fixed = sources + workers * skeleton
    if fixed > limit:
        raise ConfigError(
            f"the sources ({gb(sources)}, once per node) and {workers} worker skeleton(s) of {gb(skeleton)} need "
            f"{gb(fixed)}, more than the limit of {gb(limit)} ({_of(node.limit, available)}): lower ray.workers, "
            "raise memory.node.limit or merge fewer or smaller models",
            file=file, field="memory.node.limit",
        )
    processes = workers + (1 if ray else 0)  # a Ray run's driver holds its own state too
    left = max(0, limit - fixed - processes * state)
    caches = parse_size(node.caches, available)
    if caches is None:
        caches = left
    elif caches > left:
        raise ConfigError(
            f"{gb(caches)} of caches do not fit: the limit of {gb(limit)} leaves {gb(left)} after the sources "
            f"({gb(sources)}), {workers} skeleton(s) of {gb(skeleton)} and {processes} process(es) of {gb(state)} state; lower memory.node.caches "
            "(0: thresholds by one-shot selection, the same masks) or raise memory.node.limit",
            file=file, field="memory.node.caches",
        )
    store = None
    if ray:
        store = parse_size(node.object_store, available)
        if store is None:
            store = int((sources + caches) * (1 + OBJECT_STORE_SLACK)) + 64 * 2**20
        elif store < sources:
            raise ConfigError(
                f"{gb(store)} is less than the sources ({gb(sources)}), which the object store holds once per node "
                "(Ray would spill them to disk); raise memory.node.object_store or leave it 'auto'",
                file=file, field="memory.node.object_store",
            )
    fraction, gpu_bytes = 0.9, None
    if is_percent(worker.gpu):
        fraction = float(str(worker.gpu).strip().rstrip("%")) / 100
    elif parse_size(worker.gpu) is not None:
        fraction, gpu_bytes = None, parse_size(worker.gpu)
    return MemoryBudget(available, limit, sources, workers, skeleton, state, caches, store, fraction, gpu_bytes, ray)


def _of(value: Any, available: int) -> str:
    return f"{value} of {gb(available)} available" if is_percent(value) else "memory.node.limit"


# ---- what each part holds ------------------------------------------------------------------------


def worker_budget(budget: MemoryBudget | None, device: str) -> dict[str, int | None]:
    """A worker's engine parameters from the run's budget: `cache_budget` (the node's caches)
    and, on a GPU, `gpu_budget` (bytes of sources it may hold there, from its free memory now);
    {} without a budget."""
    if budget is None:
        return {}
    gpu = None
    if str(device).startswith("cuda"):
        import torch  # only on a GPU worker, which has imported it already

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        gpu = budget.gpu_budget(free, budget.skeleton)
    return {"cache_budget": budget.caches, "gpu_budget": gpu}


def held_report(nodes: list[dict[str, Any]], workers: list[dict[str, Any]], *, object_store_used: int | None = None) -> dict[str, Any]:
    """What each part holds, from the nodes' stores ({node, sources, tables} bytes each) and the
    workers' own figures (their `stats()`: memory_parts, model_bytes, the meter's peaks)."""
    rows = []
    for i, stats in enumerate(workers):
        parts = stats.get("memory_parts") or {}
        rows.append({
            "name": stats.get("name") or f"w{i}:{stats.get('pid', '?')}",
            "skeleton": parts.get("skeleton", stats.get("model_bytes", 0)),
            "sources_on_device": parts.get("sources_on_device", 0),
            "caches": parts.get("caches", 0),
            "private_base": stats.get("private_base", 0),
            "merge_peak": stats.get("merge_peak", 0),
            "evaluate_peak": stats.get("evaluate_peak", 0),
            "private_peak": stats.get("private_peak", 0),
            "cache_fallbacks": stats.get("cache_fallbacks", 0),
            "merge_seconds": stats.get("merge_seconds", []),
        })  # fmt: skip
    node = {
        "sources": sum(int(n.get("sources", 0)) for n in nodes),
        "caches": sum(int(n.get("tables", 0)) for n in nodes),
        "object_store_used": object_store_used,
    }
    return {"node": node, "nodes": nodes, "workers": rows}


def run_memory(exp: Any, pool: Any, refs: list[str], *, local: bool, file: str | None = None) -> MemoryBudget:
    """The budget of an experiment (`exp.memory`, `exp.ray`, `exp.dtype`) for the sources `refs`
    of `pool` (a SourcePool), with its in-process worker (`local`) or its Ray workers."""
    sources, skeleton = sources_and_skeleton(pool, refs, exp.dtype)
    workers = 1 if local else max(1, exp.ray.workers)
    return resolve_memory(exp.memory, sources=sources, skeleton=skeleton, workers=workers, ray=not local, file=file)


def record_memory(run_dir: str | Path, budget: MemoryBudget | None, pool: Any) -> None:
    """Write memory.json from the pool's `memory_held()`; a pool that cannot tell (or a failed
    write) leaves the file as it was: this is a report, never a reason to stop a run. An answer
    that comes after a later one was asked for (`refresh_memory`) is not written over it."""
    reports = _reports(run_dir)
    with reports.lock:
        reports.asked += 1
        ticket = reports.asked
    try:
        held = pool.memory_held() if hasattr(pool, "memory_held") else {}
        with reports.lock:
            if ticket < reports.written:  # a later answer is on disk already
                return
            write_memory_report(run_dir, budget, held)
            reports.written = ticket
    except Exception:  # noqa: BLE001 - Ray errors, a worker that died, a full disk
        pass


REFRESH_S = 30.0  # memory.json is refreshed during a run at most this often


def refresh_memory(run_dir: str | Path, budget: MemoryBudget | None, pool: Any, *, every_s: float = REFRESH_S) -> threading.Thread | None:
    """Refresh memory.json during a run (the driver calls this at each checkpoint), at most every
    ``every_s`` seconds, without holding the caller up: the pool is asked on a thread of its own
    (a Ray pool's workers answer between their jobs), one refresh at a time. Returns that thread
    (None when no refresh was started)."""
    if pool is None:
        return None
    reports = _reports(run_dir)
    with reports.lock:
        now = time.monotonic()
        busy = reports.thread is not None and reports.thread.is_alive()
        if busy or now - reports.started < every_s:
            return None
        reports.started = now
        reports.thread = threading.Thread(target=record_memory, args=(run_dir, budget, pool), daemon=True,
                                          name="evomerge-memory-report")
        reports.thread.start()
        return reports.thread


class _Reports:
    """Per run directory: memory.json answers asked for and written (in order), the last refresh."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.asked = self.written = 0
        self.started = -math.inf
        self.thread: threading.Thread | None = None


_REPORTS: dict[str, _Reports] = {}
_REPORTS_LOCK = threading.Lock()


def _reports(run_dir: str | Path) -> _Reports:
    with _REPORTS_LOCK:
        return _REPORTS.setdefault(str(Path(run_dir).resolve()), _Reports())


def write_memory_report(run_dir: str | Path, budget: MemoryBudget | None, held: dict[str, Any]) -> Path:
    """memory.json in the run directory: the budget and what the parts hold (`held`: the pool's
    `memory_held()`) at ``at`` (Unix time), replaced each time."""
    data = {"budget": budget.to_dict() if budget is not None else None, "held": held, "at": time.time()}
    return atomic_write_text(Path(run_dir) / MEMORY_FILE, json.dumps(data, indent=1, default=str))


def read_memory_report(run_dir: str | Path) -> dict[str, Any] | None:
    """memory.json of a run directory (None when absent or unreadable: an older run)."""
    try:
        data = json.loads((Path(run_dir) / MEMORY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def memory_lines(report: dict[str, Any] | None) -> list[str]:
    """`evomerge status` lines: the budget against what the node and each worker hold."""
    if not report:
        return []
    budget = report.get("budget") or {}
    held = report.get("held") or {}
    node = held.get("node") or {}
    lines = []
    if budget:
        store = f", object store {gb(budget.get('object_store'))}" if budget.get("object_store") else ""
        lines.append(
            f"memory: node limit {gb(budget.get('limit'))} of {gb(budget.get('available'))} available; planned "
            f"{gb(budget.get('planned'))} = sources {gb(budget.get('sources'))} + caches {gb(budget.get('caches'))} + "
            f"{budget.get('workers')} x (skeleton {gb(budget.get('skeleton'))} + state {gb(budget.get('state'))}){store}"
        )
    if node:
        at = report.get("at")
        when = f" (at {time.strftime('%H:%M:%S UTC', time.gmtime(at))})" if isinstance(at, int | float) else ""
        lines.append(
            f"  node holds{when}: sources {gb(node.get('sources'))}, caches {gb(node.get('caches'))}"
            + (f", object store in use {gb(node.get('object_store_used'))}" if node.get("object_store_used") is not None else "")
        )
    for w in held.get("workers") or []:
        parts = [f"skeleton {gb(w.get('skeleton'))}"]
        for key, label in (("sources_on_device", "sources on device"), ("caches", "own caches"),
                           ("merge_peak", "merge peak +"), ("evaluate_peak", "evaluate peak +"), ("private_base", "base")):
            if w.get(key):
                parts.append(f"{label}{'' if label.endswith('+') else ' '}{gb(w[key])}")
        if w.get("cache_fallbacks"):
            parts.append(f"{w['cache_fallbacks']} tensors by one-shot selection (beyond the cache budget)")
        lines.append(f"  worker {w.get('name', '?')}: " + ", ".join(parts))
    return lines
