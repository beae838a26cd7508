"""The torch merge engine: runs a plan's tasks (one per output tensor) with the methods' pure
tensor functions.

Planning lives in `evomerge.merge.plan` (torch-free; re-exported here). `materialize` keeps the
result in memory (or copies it into a resident HF model); `evomerge.merge.writer` streams it to a
Hugging Face directory, through this engine or, for the element-wise methods, the numpy executor
in `evomerge.merge.fast`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from evomerge.errors import ConfigError, SourceError
from evomerge.merge.methods import MergeContext, get_method
from evomerge.merge.pipeline import ordered_parallel
from evomerge.merge.plan import MergePlan, TensorRef, TensorTask, plan_merge, task_size
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import OneShotSparsifier, Sparsifier
from evomerge.recipe import Recipe

__all__ = [
    "TORCH_DTYPES", "MergePlan", "TensorRef", "TensorTask", "iter_merged", "load_into_model", "materialize",
    "plan_merge", "run_task", "single_threaded_torch",
]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- execution ------------------------------------------------------------------------------


def run_task(task: TensorTask, plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier) -> torch.Tensor:
    def load(ref: TensorRef) -> torch.Tensor:
        tensor = pool.get(ref.model).get(ref.name)
        return tensor if plan.compute_dtype is None else tensor.to(plan.compute_dtype)

    base = load(task.base) if task.base else None
    tensors = [load(ref) for ref in task.inputs]
    keys = [(ref.model, ref.name, task.base.model if task.base else None) for ref in task.inputs]
    ctx = MergeContext(tensor_name=task.name, keys=keys, sparsifier=sparsifier, seed=plan.recipe.seed)
    try:
        merged = get_method(plan.method.name).merge(base, tensors, task.model_params, task.params, ctx)
    except ValueError as exc:  # parameter values the method cannot use (e.g. weights summing to 0)
        raise ConfigError(str(exc), field="parameters") from None
    if plan.out_dtype is not None and merged.dtype != plan.out_dtype:
        merged = merged.to(plan.out_dtype)
    return merged


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
    plan: MergePlan, pool: SourcePool, sparsifier: Sparsifier | None = None, *, workers: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor, in plan order.

    Tensors are merged by ``workers`` threads (default: ``torch.get_num_threads()``, the
    parallelism torch was given, e.g. 1 in a Ray worker), each running torch single-threaded;
    see `evomerge.merge.pipeline` for how many merged tensors wait to be consumed. Results do
    not depend on ``workers`` (random masks are keyed by tensor name, not by order).
    """
    sparsifier = sparsifier if sparsifier is not None else OneShotSparsifier()
    n_workers = max(1, workers if workers is not None else torch.get_num_threads())
    sizes = [task_size(task, pool) for task in plan.tasks] if n_workers > 1 else []
    with single_threaded_torch():
        results = ordered_parallel(plan.tasks, lambda task: run_task(task, plan, pool, sparsifier), sizes, n_workers)
        try:
            for task, tensor in results:
                yield task.name, tensor
        finally:
            results.close()


def materialize(
    recipe: Recipe, pool: SourcePool, sparsifier: Sparsifier | None = None
) -> dict[str, torch.Tensor]:
    """The merged state dict, in memory."""
    plan = plan_merge(recipe, pool)
    return dict(iter_merged(plan, pool, sparsifier))


def load_into_model(
    model: torch.nn.Module, recipe: Recipe, pool: SourcePool, sparsifier: Sparsifier | None = None
) -> None:
    """Overwrite a resident model's weights with the merge, without re-creating the model.

    The model must already have the merged architecture (same tensor names and shapes); tensors
    the model ties to others (lm_head to the embeddings) follow automatically.
    """
    plan = plan_merge(recipe, pool)
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, tensor in iter_merged(plan, pool, sparsifier):
            target = params.get(name)
            if target is None:
                raise SourceError(f"the resident model has no tensor '{name}'; its architecture differs from the merge")
            target.copy_(tensor)
