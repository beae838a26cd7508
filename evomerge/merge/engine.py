"""The merge engine: recipe -> plan (one task per output tensor) -> tensors.

Planning reads only checkpoint headers; it checks shapes and resolves every parameter to a
plain number per tensor, following mergekit (per-model parameters: slice source, `models:`,
slice, top level; gradients interpolated at t = layer index / (layers in slice - 1), and at
t = 0 for the embeddings and for the final norm and head, as mergekit 0.1.5 does). Execution runs the method's pure tensor
function per task. `materialize` keeps the result in memory (or copies it into a resident HF
model); `evomerge.merge.writer` streams it to a Hugging Face directory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError, SourceError
from evomerge.merge.layout import layer_count, place_of, with_layer_count
from evomerge.merge.methods import MergeContext, MergeMethod, get_method
from evomerge.merge.sources import SourcePool
from evomerge.merge.sparsify import OneShotSparsifier, Sparsifier
from evomerge.recipe import (
    InputSlice,
    OutputSlice,
    Recipe,
    resolve_global_param,
    resolve_model_param,
)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorRef:
    model: str
    name: str


@dataclass
class TensorTask:
    """Everything needed to compute one output tensor."""

    name: str
    inputs: list[TensorRef]
    base: TensorRef | None
    model_params: list[dict[str, Any]]
    params: dict[str, Any]


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    tasks: list[TensorTask]
    reference: str  # the model whose config (and, by default, tokenizer) the output takes
    num_layers: int
    config: dict = field(default_factory=dict)
    compute_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None


def plan_merge(recipe: Recipe, pool: SourcePool) -> MergePlan:
    """Resolve a recipe against its sources; raises ConfigError/SourceError on any mismatch."""
    method = get_method(recipe.merge_method)
    slices = _as_slices(recipe, pool)
    reference = recipe.base_model or slices[0].sources[0].model
    ref_source = pool.get(reference)
    ref_layers = layer_count(ref_source.config)
    ref_names = ref_source.names
    places = [(name, place_of(name)) for name in ref_names]
    layer_rests: list[str] = []
    for _, place in places:
        if place.kind == "layer" and place.index == 0 and place.rest not in layer_rests:
            layer_rests.append(place.rest)
    layer_prefix = next((p.prefix for _, p in places if p.kind == "layer"), None)
    if ref_layers and layer_prefix is None:
        raise SourceError(f"model '{reference}': could not find its numbered layers among the tensor names")

    # As in mergekit, embeddings merge over the first slice's sources (with its parameters) and
    # the final norm / head over the last slice's (as many as the first slice has), both at t = 0.
    first_models = [s.model for s in slices[0].sources]
    last_models = [s.model for s in slices[-1].sources][: len(first_models)]
    tasks: list[TensorTask] = []
    for name, place in places:
        if place.kind == "pre":
            tasks.append(_task(recipe, method, pool, name, [(m, name) for m in first_models], 0.0, slices[0]))
    out_index = 0
    for out_slice in slices:
        length = out_slice.sources[0].num_layers
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for rest in layer_rests:
                out_name = f"{layer_prefix}.{out_index}.{rest}"
                sources = [(s.model, f"{layer_prefix}.{s.layer_range[0] + idx}.{rest}") for s in out_slice.sources]
                tasks.append(_task(recipe, method, pool, out_name, sources, t, out_slice))
            out_index += 1
    for name, place in places:
        if place.kind == "post":
            tasks.append(_task(recipe, method, pool, name, [(m, name) for m in last_models], 0.0, slices[-1]))

    compute_dtype = TORCH_DTYPES.get(recipe.dtype) if recipe.dtype else None
    out_dtype = TORCH_DTYPES.get(recipe.out_dtype or recipe.dtype or "", None)
    config = with_layer_count(ref_source.config, out_index) if ref_layers is not None else dict(ref_source.config)
    if out_dtype is not None:
        config["torch_dtype"] = recipe.out_dtype or recipe.dtype
        config.pop("dtype", None)
    return MergePlan(recipe, method, tasks, reference, out_index, config, compute_dtype, out_dtype)


def _as_slices(recipe: Recipe, pool: SourcePool) -> list[OutputSlice]:
    """`models:` is one slice over every layer, as mergekit reads it."""
    if recipe.slices is not None:
        for i, out_slice in enumerate(recipe.slices):
            for j, source in enumerate(out_slice.sources):
                count = layer_count(pool.get(source.model).config)
                if count is not None and source.layer_range[1] > count:
                    raise ConfigError(
                        f"layer_range {list(source.layer_range)} is past the end of '{source.model}' ({count} layers)",
                        field=f"slices[{i}].sources[{j}].layer_range",
                    )
        return list(recipe.slices)
    refs = [m.model for m in recipe.models or []]
    if recipe.base_model and recipe.base_model not in refs:
        refs = [*refs, recipe.base_model]
    counts = {ref: layer_count(pool.get(ref).config) for ref in refs}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{ref}: {n}" for ref, n in counts.items())
        raise ConfigError(f"models have different layer counts ({listing}); use slices: to pick matching layer ranges", field="models")
    n = next(iter(counts.values())) or 0
    return [OutputSlice(sources=[InputSlice(model=ref, layer_range=(0, n)) for ref in refs])]


def _task(
    recipe: Recipe,
    method: MergeMethod,
    pool: SourcePool,
    out_name: str,
    sources: list[tuple[str, str]],
    t: float,
    out_slice: OutputSlice | None,
) -> TensorTask:
    """One output tensor: split the sources into base and inputs, resolve parameters, check shapes."""
    base_model = (out_slice.base_model if out_slice and out_slice.base_model else None) or recipe.base_model
    by_model = dict(sources)
    if method.name == "passthrough":
        inputs = [TensorRef(*sources[0])]
        base = None
    elif method.requires_base:
        base_name = by_model.get(base_model, out_name) if base_model else out_name
        base = TensorRef(base_model, base_name)
        inputs = [TensorRef(m, n) for m, n in sources if m != base_model]
    else:  # e.g. linear: a base_model not listed under models: is one more input, as in mergekit
        inputs = [TensorRef(m, n) for m, n in sources]
        base = None

    for ref in [*inputs, *([base] if base else [])]:
        if not pool.get(ref.model).has(ref.name):
            raise SourceError(f"tensor '{ref.name}' is missing from model '{ref.model}'")
    shapes = {ref.model: pool.get(ref.model).shape(ref.name) for ref in [*([base] if base else []), *inputs]}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{model} {list(shape)}" for model, shape in shapes.items())
        raise SourceError(f"tensor '{out_name}' has different shapes in its sources ({listing})")

    model_params = []
    for ref in inputs:
        values = {}
        for spec in method.model_params:
            value = resolve_model_param(recipe, spec.name, ref.model, out_name, t, out_slice)
            if value is None:
                if spec.required:
                    raise ConfigError(
                        f"method '{method.name}' needs '{spec.name}' for model '{ref.model}' (tensor {out_name})",
                        field="parameters",
                    )
                value = spec.default
            values[spec.name] = value
        model_params.append(values)
    params = {}
    for spec in method.global_params:
        value = resolve_global_param(recipe, spec.name, out_name, t, out_slice)
        if value is None:
            if spec.required:
                raise ConfigError(f"method '{method.name}' needs parameter '{spec.name}' (tensor {out_name})", field="parameters")
            value = spec.default
        params[spec.name] = value
    return TensorTask(out_name, inputs, base, model_params, params)


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
        merged = plan.method.merge(base, tensors, task.model_params, task.params, ctx)
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
    at most ``2 * workers`` merged tensors wait to be consumed. Results do not depend on
    ``workers`` (random masks are keyed by tensor name, not by order).
    """
    sparsifier = sparsifier if sparsifier is not None else OneShotSparsifier()
    n_workers = max(1, workers if workers is not None else torch.get_num_threads())
    with single_threaded_torch():
        if n_workers == 1 or len(plan.tasks) <= 1:
            for task in plan.tasks:
                yield task.name, run_task(task, plan, pool, sparsifier)
            return
        executor = ThreadPoolExecutor(n_workers, thread_name_prefix="evomerge-merge")
        try:
            tasks = iter(plan.tasks)
            pending: deque[tuple[str, Future]] = deque()

            def submit() -> None:
                task = next(tasks, None)
                if task is not None:
                    pending.append((task.name, executor.submit(run_task, task, plan, pool, sparsifier)))

            for _ in range(2 * n_workers):
                submit()
            while pending:
                name, future = pending.popleft()
                tensor = future.result()
                submit()
                yield name, tensor
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


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
