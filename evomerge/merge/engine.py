"""The torch merge engine: runs a plan's tasks (one per output tensor) with the methods' pure
tensor functions.

Planning lives in `evomerge.merge.plan` (torch-free; re-exported here). `materialize` keeps the
result in memory; `merge_into` (and `load_into_model`) writes it straight into existing tensors,
e.g. a resident model's parameters, with no full-size temporary per tensor where the method can
write in place; `evomerge.merge.writer` streams it to a Hugging Face directory, through this
engine or, for the element-wise methods, the numpy executor in `evomerge.merge.fast`.

The kernels run where their inputs are: `merge_into` merges on its targets' device, the others
on ``device`` (default the CPU), with the sources brought there by `evomerge.merge.device`
(`DeviceSources`: kept there within a budget, else copied per use, the next ones ahead on a
side stream while the current tensor merges). CPU and GPU run one code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from evomerge.errors import ConfigError, SourceError
from evomerge.merge.device import DeviceSources, as_device
from evomerge.merge.methods import MergeContext, Workspace, accepts_out, get_method
from evomerge.merge.pipeline import ordered_parallel
from evomerge.merge.plan import MergePlan, TensorRef, TensorTask, plan_merge, task_size
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import OneShotSparsifier, Sparsifier
from evomerge.recipe import Recipe

__all__ = [
    "TORCH_DTYPES", "DeviceSources", "MergePlan", "TensorRef", "TensorTask", "iter_merged", "load_into_model", "materialize",
    "merge_into", "plan_merge", "prepare_masks", "run_task", "single_threaded_torch",
]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- execution ------------------------------------------------------------------------------


def run_task(
    task: TensorTask,
    plan: MergePlan,
    pool: SourcePool,
    sparsifier: Sparsifier,
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    staging: DeviceSources | None = None,
) -> torch.Tensor:
    """The merged tensor of one task. With ``out``, a method that can (see
    `evomerge.merge.methods.usable_out`) writes the result into it and ``out`` comes back;
    otherwise a new tensor does, which the caller copies where it belongs. ``workspace``: chunk
    buffers shared with the plan's other tasks. ``staging``: the sources on the device to merge
    on (default: where the pool holds them, the CPU)."""

    base, tensors, ctx = _task_inputs(task, plan, pool, sparsifier, workspace, staging)
    method = get_method(plan.method.name)
    kwargs = {}
    if out is not None and accepts_out(method) and plan.out_dtype in (None, out.dtype):
        kwargs["out"] = out.detach()  # a parameter's storage, written without autograd
    try:
        merged = method.merge(base, tensors, task.model_params, task.params, ctx, **kwargs)
    except ValueError as exc:  # parameter values the method cannot use (e.g. weights summing to 0)
        raise ConfigError(str(exc), field="parameters") from None
    if plan.out_dtype is not None and merged.dtype != plan.out_dtype:
        merged = merged.to(plan.out_dtype)
    return merged


def _task_inputs(
    task: TensorTask, plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier, workspace: Workspace | None = None,
    staging: DeviceSources | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], MergeContext]:
    def load(ref: TensorRef) -> torch.Tensor:
        source = pool.get(ref.model)
        tensor = staging.get(source, ref.name) if staging is not None else source.get(ref.name)
        return tensor if plan.compute_dtype is None else tensor.to(plan.compute_dtype)

    base = load(task.base) if task.base else None
    tensors = [load(ref) for ref in task.inputs]
    keys = [(ref.model, ref.name, task.base.model if task.base else None) for ref in task.inputs]
    ctx = MergeContext(tensor_name=task.name, keys=keys, sparsifier=sparsifier, seed=plan.recipe.seed, workspace=workspace)
    return base, tensors, ctx


def prepare_masks(plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier, staging: DeviceSources | None = None) -> None:
    """Build every mask the plan's merge will ask for, without merging, and drop them.

    With a caching sparsifier (`CachedSparsifier`) the rank tables of the plan's sources are then
    computed before any output tensor is written: their full-size temporaries (a tensor's
    |delta| while it is sorted) do not stack on a whole merged model's memory, which matters
    in a worker's first job. Methods without masks have nothing to prepare; with a sparsifier
    that keeps nothing this is wasted work.
    """
    prepare = getattr(get_method(plan.method.name), "prepare", None)
    if prepare is None:
        return
    with single_threaded_torch(), _ahead(plan, pool, staging):
        for task in plan.tasks:
            base, tensors, ctx = _task_inputs(task, plan, pool, sparsifier, staging=staging)
            try:
                prepare(base, tensors, task.model_params, task.params, ctx)
            except ValueError as exc:
                raise ConfigError(str(exc), field="parameters") from None
            _prefetch_next(staging)


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block (restored after).

    Merging is elementwise work on cache-sized chunks: with torch's thread team every op
    waits for its slowest thread, which on a shared, loaded machine costs 10x or more, while
    separate single-threaded tasks (one tensor each) never wait on each other.
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def iter_merged(
    plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier | None = None, *, workers: int | None = None,
    device: torch.device | str | None = None, staging: DeviceSources | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor, in plan order.

    Tensors are merged by ``workers`` threads (default: ``torch.get_num_threads()``, the
    parallelism torch was given, e.g. 1 in a Ray worker), each running torch single-threaded;
    see `evomerge.merge.pipeline` for how many merged tensors wait to be consumed. Results do
    not depend on ``workers`` (random masks are keyed by tensor name, not by order).

    ``device``: where to merge (default the CPU; the results are on it). ``staging``: the
    sources on that device (`DeviceSources`, e.g. a worker's, which keeps them there within its
    budget); default: each source tensor copied there per use. An accelerator merges with one
    thread (its kernels queue on one stream anyway).
    """
    sparsifier = sparsifier if sparsifier is not None else OneShotSparsifier()
    staging = _staging(as_device(staging.device if staging is not None else device), staging)
    workspace = Workspace()  # chunk buffers allocated once per thread, freed with the iterator

    def run(task: TensorTask) -> torch.Tensor:
        merged = run_task(task, plan, pool, sparsifier, workspace=workspace, staging=staging)
        _prefetch_next(staging)
        return merged

    with _ahead(plan, pool, staging), _in_plan_order(plan, pool, run, _threads(staging, workers)) as results:
        for task, tensor in results:
            yield task.name, tensor


@contextmanager
def _in_plan_order(
    plan: MergePlan, pool: SourcePool, run: Callable[[TensorTask], Any], workers: int | None
) -> Iterator[Iterator[tuple[TensorTask, Any]]]:
    """``(task, run(task))`` in plan order, computed by ``workers`` threads (default: torch's
    thread count) each running torch single-threaded; the threads stop when the block ends."""
    n_workers = max(1, workers if workers is not None else torch.get_num_threads())
    sizes = [task_size(task, pool) for task in plan.tasks] if n_workers > 1 else []
    with single_threaded_torch():
        results = ordered_parallel(plan.tasks, run, sizes, n_workers)
        try:
            yield results
        finally:
            results.close()


def _staging(device: torch.device, staging: DeviceSources | None) -> DeviceSources | None:
    """What serves the sources on ``device``: ``staging`` when given; else on the CPU the
    pool itself (None), elsewhere a `DeviceSources` that keeps nothing (copies per use, the
    next ones ahead)."""
    if staging is not None or device.type == "cpu":
        return staging
    return DeviceSources.streaming(device)


@contextmanager
def _ahead(plan: MergePlan, pool: SourcePool, staging: DeviceSources | None) -> Iterator[None]:
    """Tell ``staging`` the order the plan's tasks use their source tensors in (each task's base,
    then its inputs), so it copies the next ones ahead (`DeviceSources.ahead`)."""
    if staging is None:
        yield
        return
    order = [(pool.get(ref.model), ref.name) for task in plan.tasks for ref in task.refs]
    with staging.ahead(order):
        yield


def _prefetch_next(staging: DeviceSources | None) -> None:
    if staging is not None:
        staging.prefetch_next()


def _threads(staging: DeviceSources | None, workers: int | None) -> int | None:
    """An accelerator merges with one thread: its kernels queue on one stream anyway."""
    return 1 if staging is not None and staging.device.type != "cpu" else workers


def merge_into(
    plan: MergePlan,
    pool: SourcePool,
    targets: Mapping[str, torch.Tensor],
    sparsifier: Sparsifier | None = None,
    *,
    workers: int | None = None,
    staging: DeviceSources | None = None,
    exact_dtype: bool = False,
) -> Iterator[str]:
    """Write every output tensor of ``plan`` into ``targets[name]``; yield the names in plan order
    as they are written.

    ``targets`` maps every output name to a tensor of that shape (e.g. a resident model's
    ``state_dict(keep_vars=True)``); its values are what `materialize` would give, cast to the
    target's dtype. Each task writes its result straight into its target when the method can
    (contiguous target of the result's dtype and device), else into a new tensor that is copied
    there and freed. Targets that share memory (tied embeddings) are written in plan order, the
    last one wins, as with copying `iter_merged`'s results. Threads as in `iter_merged`.

    The merge runs on the targets' device (a GPU worker's skeleton: on its GPU), with the
    sources from ``staging`` when given (see `iter_merged`).

    ``exact_dtype``: a result of another dtype or shape than its target raises `TargetMismatch`
    instead of being cast into it (for targets laid out as `iter_merged` would yield, such as
    the writer's memory-mapped files).
    """
    missing = [task.name for task in plan.tasks if task.name not in targets]
    if missing:
        raise SourceError(f"the target has no tensor '{missing[0]}'; its architecture differs from the merge")
    sparsifier = sparsifier if sparsifier is not None else OneShotSparsifier()
    device = next((targets[task.name].device for task in plan.tasks), torch.device("cpu"))
    staging = _staging(device, staging)
    shared = _overlapping({task.name: targets[task.name] for task in plan.tasks})
    workspace = Workspace()  # chunk buffers allocated once per thread, freed at the end

    def write(task: TensorTask) -> torch.Tensor | None:
        """Merged into its target (None), or the result to copy in plan order (shared targets)."""
        if task.name in shared:
            merged = run_task(task, plan, pool, sparsifier, workspace=workspace, staging=staging)
            _prefetch_next(staging)
            return merged
        target = targets[task.name]
        merged = run_task(task, plan, pool, sparsifier, out=target, workspace=workspace, staging=staging)
        _prefetch_next(staging)  # the copies of the next inputs overlap this task's kernels
        if exact_dtype:
            _check_exact(task.name, merged, target)
        if merged.data_ptr() != target.data_ptr():  # not written in place
            with torch.no_grad():  # a worker thread does not inherit the caller's grad mode
                target.copy_(merged)
        return None

    with _ahead(plan, pool, staging), _in_plan_order(plan, pool, write, _threads(staging, workers)) as results:
        for task, merged in results:
            if merged is not None:
                if exact_dtype:
                    _check_exact(task.name, merged, targets[task.name])
                with torch.no_grad():
                    targets[task.name].copy_(merged)
            del merged
            yield task.name


class TargetMismatch(TypeError):
    """A merged tensor whose dtype or shape is not its target's (`merge_into(exact_dtype=True)`)."""


def _check_exact(name: str, merged: torch.Tensor, target: torch.Tensor) -> None:
    if merged.dtype != target.dtype or merged.shape != target.shape:
        raise TargetMismatch(
            f"tensor '{name}': merged as {merged.dtype} {tuple(merged.shape)}, the target is {target.dtype} {tuple(target.shape)}"
        )


def _overlapping(tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the tensors whose memory overlaps another's (tied weights): every member of a
    run of overlapping address ranges."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name) for name, t in tensors.items() if t.numel()
    )
    found: set[str] = set()
    run: list[str] = []
    end = -1
    for start, stop, name in spans:
        if start >= end:  # a new run starts
            if len(run) > 1:
                found.update(run)
            run = []
        run.append(name)
        end = max(end, stop)
    if len(run) > 1:
        found.update(run)
    return found


def materialize(
    recipe: Recipe, pool: SourcePool, sparsifier: Sparsifier | None = None, *, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The merged state dict, in memory (on ``device``, merged there; default the CPU)."""
    plan = plan_merge(recipe, pool)
    return dict(iter_merged(plan, pool, sparsifier, device=device))


def load_into_model(
    model: torch.nn.Module, recipe: Recipe, pool: SourcePool, sparsifier: Sparsifier | None = None
) -> None:
    """Overwrite a resident model's weights with the merge, without re-creating the model.

    The model must already have the merged architecture (same tensor names and shapes); tensors
    the model ties to others (lm_head to the embeddings) follow automatically.
    """
    plan = plan_merge(recipe, pool)
    for _name in merge_into(plan, pool, dict(model.state_dict(keep_vars=True)), sparsifier):
        pass
