"""Merge planning: recipe -> plan (one task per output tensor), from checkpoint headers only.

Planning checks shapes and resolves every parameter to a plain number per tensor, following
mergekit (per-model parameters: slice source, `models:`, slice, top level; gradients interpolated
at t = layer index / (layers in slice - 1), and at t = 0 for the embeddings and for the final
norm and head, as mergekit 0.1.5 does). It imports no torch: one plan feeds both executors, the
torch engine (`evomerge.merge.engine`, every method) and the numpy one (`evomerge.merge.fast`,
the element-wise methods on the `evomerge merge` path).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeWarning, SourceError
from evomerge.merge.layout import layer_count, place_of, with_layer_count
from evomerge.merge.sources import SourcePool
from evomerge.merge.specs import MethodSpec, ParamSpec, get_spec
from evomerge.recipe import (
    DTYPES,
    InputSlice,
    OutputSlice,
    Recipe,
    resolve_global_param,
    resolve_model_param,
)

if TYPE_CHECKING:
    import torch


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

    @property
    def refs(self) -> list[TensorRef]:
        """The source tensors the task reads: the base first (when it has one), then the inputs."""
        return [*([self.base] if self.base else []), *self.inputs]


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    tasks: list[TensorTask]
    reference: str  # the model whose config (and, by default, tokenizer) the output takes
    num_layers: int
    config: dict = field(default_factory=dict)
    compute_dtype_name: str | None = None  # inputs are cast to this before merging (recipe `dtype`)
    out_dtype_name: str | None = None  # the result is cast to this (recipe `out_dtype`, else `dtype`)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return _torch_dtype(self.compute_dtype_name)

    @property
    def out_dtype(self) -> torch.dtype | None:
        return _torch_dtype(self.out_dtype_name)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    import torch  # only when a torch dtype is asked for: planning itself needs no torch

    return getattr(torch, name)


class MixedArchitectureWarning(EvomergeWarning):
    """Sources of different architectures merged (the recipe allowed it): what was dropped."""


def plan_merge(recipe: Recipe, pool: SourcePool) -> MergePlan:
    """Resolve a recipe against its sources; raises ConfigError/SourceError on any mismatch."""
    pool.open_all(recipe.ref_fields())  # a missing or damaged model is named by its field first
    method = get_spec(recipe.merge_method)
    slices = _as_slices(recipe, pool)
    reference = recipe.base_model or slices[0].sources[0].model
    _check_architectures(recipe, pool, reference)
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

    compute_dtype = recipe.dtype if recipe.dtype in DTYPES else None
    out_dtype = (recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) in DTYPES else None
    config = with_layer_count(ref_source.config, out_index) if ref_layers is not None else dict(ref_source.config)
    if out_dtype is not None:
        config["torch_dtype"] = out_dtype
        config.pop("dtype", None)
    return MergePlan(recipe, method, tasks, reference, out_index, config, compute_dtype, out_dtype)


def architecture_of(config: dict) -> str:
    """A model's architecture in words: its `model_type` (else its `architectures`)."""
    archs = config.get("architectures") or [config.get("architecture")]
    return str(config.get("model_type") or archs[0] or "unknown")


def _tensor_refs(recipe: Recipe) -> list[str]:
    """The models whose tensors a recipe merges (the tokenizer source aside)."""
    refs = [*([recipe.base_model] if recipe.base_model else []), *(m.model for m in recipe.models or [])]
    for out_slice in recipe.slices or []:
        refs += [s.model for s in out_slice.sources] + ([out_slice.base_model] if out_slice.base_model else [])
    return list(dict.fromkeys(refs))


def _check_architectures(recipe: Recipe, pool: SourcePool, reference: str) -> None:
    """Sources of different model types (or `architectures`) are refused unless the recipe says
    `evomerge: {allow_mixed_architectures: true}`; then the result takes the reference model's
    architecture and the tensors it has no place for are named in a MixedArchitectureWarning."""
    refs = _tensor_refs(recipe)
    configs = {ref: pool.get(ref).config for ref in refs}
    ref_config = configs[reference]
    ref_archs = ref_config.get("architectures")

    def differs(config: dict) -> bool:
        archs = config.get("architectures")
        return architecture_of(config) != architecture_of(ref_config) or bool(archs and ref_archs and archs != ref_archs)

    others = [ref for ref in refs if differs(configs[ref])]
    if not others:
        return

    def label(ref: str) -> str:
        archs = configs[ref].get("architectures")
        return f"'{ref}' ({architecture_of(configs[ref])}" + (f", {', '.join(archs)})" if archs else ")")

    listing = ", ".join(label(ref) for ref in [reference, *others])
    if not (recipe.evomerge and recipe.evomerge.allow_mixed_architectures):
        raise SourceError(
            f"the sources have different architectures: {listing}; merge models of one architecture, or set "
            "`evomerge: {allow_mixed_architectures: true}` to merge into the reference model's architecture",
            field="models",
        )
    ref_names = {_pattern(name) for name in pool.get(reference).names}
    dropped: dict[str, list[str]] = {}
    for ref in others:
        for name in pool.get(ref).names:
            if _pattern(name) not in ref_names:
                dropped.setdefault(_pattern(name), []).append(ref)
    lost = "; ".join(f"{name} (from {', '.join(dict.fromkeys(models))})" for name, models in dropped.items()) or "none"
    warnings.warn(
        f"merging mixed architectures {listing}: the result is {architecture_of(ref_config)} like '{reference}'; "
        f"tensors it has no place for are dropped: {lost}",
        MixedArchitectureWarning,
        stacklevel=3,
    )


def _pattern(name: str) -> str:
    """A tensor name with its layer index as '*' (model.layers.*.self_attn.q_proj.bias)."""
    place = place_of(name)
    return f"{place.prefix}.*.{place.rest}" if place.kind == "layer" else name


def _as_slices(recipe: Recipe, pool: SourcePool) -> list[OutputSlice]:
    """`models:` is one slice over every layer, as mergekit reads it."""
    if not recipe.models and not recipe.slices:
        raise ConfigError("the recipe merges no model (models: and slices: are empty)", field="slices" if recipe.slices is not None else "models")
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
    method: MethodSpec,
    pool: SourcePool,
    out_name: str,
    sources: list[tuple[str, str]],
    t: float,
    out_slice: OutputSlice | None,
) -> TensorTask:
    """One output tensor: split the sources into base and inputs, resolve parameters, check shapes."""
    base_model = (out_slice.base_model if out_slice and out_slice.base_model else None) or recipe.base_model
    by_model = dict(sources)
    if method.requires_base:
        base_name = by_model.get(base_model, out_name) if base_model else out_name
        base = TensorRef(base_model, base_name)
        inputs = [TensorRef(m, n) for m, n in sources if m != base_model]
    else:  # e.g. linear: a base_model not listed under models: is one more input, as in mergekit
        inputs = [TensorRef(m, n) for m, n in sources]
        base = None
    if problem := method.count_problem(len(inputs)):  # a recipe built in code skips `Recipe.check`
        raise ConfigError(f"{problem} (tensor {out_name})", field="models" if recipe.models is not None else "slices")

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
            else:
                _check_resolved(spec, value, f"model '{ref.model}', tensor {out_name}")
            values[spec.name] = value
        if method.model_rule is not None and (problem := method.model_rule(values)):
            raise ConfigError(f"{problem} (model '{ref.model}', tensor {out_name})", field="parameters")
        model_params.append(values)
    params = {}
    for spec in method.global_params:
        value = resolve_global_param(recipe, spec.name, out_name, t, out_slice)
        if value is None:
            if spec.required:
                raise ConfigError(f"method '{method.name}' needs parameter '{spec.name}' (tensor {out_name})", field="parameters")
            value = spec.default
        else:
            _check_resolved(spec, value, f"tensor {out_name}")
        params[spec.name] = value
    return TensorTask(out_name, inputs, base, model_params, params)


def _check_resolved(spec: ParamSpec, value: Any, where: str) -> None:
    """A resolved value valid for its declaration (a recipe built in code skips `Recipe.check`)."""
    problem = spec.problem(value)
    if problem:
        raise ConfigError(f"{problem} ({where})", field="parameters")


def task_size(task: TensorTask, pool: SourcePool) -> int:
    """Elements of a task's output tensor (from the first source's header)."""
    ref = task.base or task.inputs[0]
    size = 1
    for dim in pool.get(ref.model).shape(ref.name):
        size *= dim
    return size
