"""Parameter space (PS): genes for a merge method's parameters, per model, optionally per layer
group and per module filter.

Layout of the genome, in order: for every merged model, for every per-model parameter searched,
for every filter group, for every layer group, one gene; then the method-wide parameters
searched (e.g. slerp's `t`), per filter group and layer group. Filter groups are the `filters`
given (substrings of tensor names such as `self_attn`, `mlp`) plus one group for every tensor no
filter matches. Layer groups decode as one mergekit slice per group (embeddings take the first
group's values and the final norm / head the last's, as mergekit does), or with `smooth: true`
as gradient lists whose anchors are the groups.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import ConfigError
from evomerge.merge.layout import layer_count
from evomerge.merge.sources import SourcePool
from evomerge.merge.specs import METHOD_SPECS, find_spec, get_spec, unknown_method
from evomerge.recipe import (
    DTYPES,
    EvomergeBlock,
    InputModel,
    InputSlice,
    OutputSlice,
    Recipe,
    check_setting,
)
from evomerge.spaces.base import Gene, GeneRange, SearchSpace, SpaceSpec

REST = "*"


class PSSpec(SpaceSpec):
    kind: Literal["ps"]
    method: str
    genes: dict[str, GeneRange] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_groups: int = Field(1, ge=1)
    smooth: bool = False
    filters: list[str] = Field(default_factory=list)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    seed: int = 0

    @model_validator(mode="after")
    def _smooth_needs_anchors(self) -> PSSpec:
        if self.smooth and self.layer_groups < 2:
            raise ValueError("smooth: true needs layer_groups >= 2 (the gradient's anchor points)")
        return self

    def check(self, *, file: str | None = None) -> None:
        check_ps_spec(self, file=file)

    def base_needed(self) -> str | None:
        method = METHOD_SPECS.get(self.method)
        return f"merges with '{self.method}', which needs a base model" if method is not None and method.requires_base else None


def check_ps_spec(spec: PSSpec, *, file: str | None = None) -> None:
    """A PS space against its method's declared parameters (`evomerge.merge.specs`): genes are
    numeric parameters that have an effect, with bounds valid for the parameter (density in
    [0, 1], t in [0, 1], every bound finite); fixed values are valid settings. Needs no model."""
    try:
        method = find_spec(spec.method)
    except ValueError as exc:  # a plugin that fails to import
        raise ConfigError(str(exc), file=file, field="method") from None
    if method is None:
        raise ConfigError(unknown_method(spec.method), file=file, field="method")
    valid = ", ".join(sorted(p.name for p in (*method.model_params, *method.global_params)))
    for name, rng in spec.genes.items():
        param = method.param(name)
        field = f"genes.{name}"
        if param is None:
            raise ConfigError(f"method '{method.name}' has no parameter '{name}'; valid: {valid}", file=file, field=field)
        if param.kind != "number":
            raise ConfigError(f"{name} is {param.valid}, not a number to search; set it under fixed:", file=file, field=field)
        if param.inert:
            raise ConfigError(f"{name} has no effect in method '{method.name}' ({param.doc}); search another parameter", file=file, field=field)
        ends = {"low": rng.low, "high": rng.high}
        if name == "weight" and spec.allow_negative_weights and rng.low >= 0:
            ends["low"] = -rng.high  # what the space searches (see ParameterSpace)
        for end, value in ends.items():
            if problem := param.problem(value):
                raise ConfigError(f"the bounds must be valid values: {problem}", file=file, field=f"{field}.{end}")
    for name, value in spec.fixed.items():
        param = method.param(name)
        if param is None:
            raise ConfigError(f"method '{method.name}' has no parameter '{name}'; valid: {valid}", file=file, field=f"fixed.{name}")
        check_setting(value, param, file=file, field=f"fixed.{name}")


class ParameterSpace(SearchSpace):
    kind = "ps"
    spec_model = PSSpec
    RECIPE_VIEW = "parameters"

    def __init__(self, spec: PSSpec, *, base: str | None, models: list[str], layer_count: int | None, file: str | None = None):
        check_ps_spec(spec, file=file)  # method, parameters, bounds (checked on loading too; a spec may be built in code)
        self.spec = spec
        self.method = get_spec(spec.method)  # names, defaults, requires_base: no torch needed
        self.base = base if self.method.requires_base else None
        self.models = [m for m in models if m != self.base]
        self.layer_count = layer_count
        self.filter_groups = [*spec.filters, REST] if spec.filters else [REST]
        self._check(file)
        model_names = {p.name for p in self.method.model_params}
        self.model_genes = [name for name in spec.genes if name in model_names]
        self.global_genes = [name for name in spec.genes if name not in model_names]
        super().__init__(self._genes())

    @classmethod
    def build(cls, spec: PSSpec, *, models: list[str], base: str | None, pool: SourcePool, file: str | None) -> ParameterSpace:
        counts = {layer_count(pool.get(m).config) for m in [*models, *([base] if base else [])]}
        return cls(spec, base=base, models=models, layer_count=counts.pop() if len(counts) == 1 else None, file=file)

    # ---- validation ---------------------------------------------------------------------
    def _check(self, file: str | None) -> None:
        spec, method = self.spec, self.method
        if method.requires_base and not self.base:
            raise ConfigError(f"method '{method.name}' needs a base model", file=file, field="models.base")
        if not self.models:
            raise ConfigError("the space needs at least one model to merge besides the base", file=file, field="models")
        if problem := method.count_problem(len(self.models)):
            raise ConfigError(problem, file=file, field="models")
        groups = spec.layer_groups
        if groups == 1:
            return
        if self.layer_count is None:
            raise ConfigError(
                "the sources have different layer counts; a per-layer space (layer_groups > 1) needs models of equal depth",
                file=file,
                field="layer_groups",
            )
        n = self.layer_count
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        if groups > n or (not spec.smooth and n % groups):
            hint = f"a divisor of {n} ({', '.join(map(str, divisors))})" + ("" if spec.smooth else f", or up to {n} with smooth: true")
            raise ConfigError(f"{groups} groups do not divide the {n} layers of the sources; use {hint}", file=file, field="layer_groups")

    def describe(self) -> str:
        """The genes, then the method's declaration (capabilities, parameters, ranges)."""
        return f"{super().describe()}\nmethod {self.method.describe()}"

    # ---- genes --------------------------------------------------------------------------
    def _genes(self) -> list[Gene]:
        genes: list[Gene] = []
        for model in self.models:
            for name in self.model_genes:
                genes += self._group_genes(f"{_short(model)}.{name}", name, f"{name} of {model}")
        for name in self.global_genes:
            genes += self._group_genes(name, name, name)
        return genes

    def _group_genes(self, label: str, param: str, meaning: str) -> list[Gene]:
        rng = self.spec.genes[param]
        low = rng.low
        if param == "weight" and self.spec.allow_negative_weights and low >= 0:
            low = -rng.high
        out = []
        for flt in self.filter_groups:
            for g in range(self.spec.layer_groups):
                where = []
                if flt != REST or len(self.filter_groups) > 1:
                    where.append("other tensors" if flt == REST else f"tensors matching '{flt}'")
                if self.spec.layer_groups > 1:
                    where.append(self._group_text(g))
                suffix = "".join(f"[{w}]" for w in ([flt] if len(self.filter_groups) > 1 else []) + ([f"g{g}"] if self.spec.layer_groups > 1 else []))
                out.append(Gene(label + suffix, low, rng.high, rng.start, meaning + (" — " + ", ".join(where) if where else "")))
        return out

    def _group_text(self, g: int) -> str:
        groups, n = self.spec.layer_groups, self.layer_count or 0
        if self.spec.smooth:
            return f"gradient anchor {g + 1}/{groups} (depth {g / (groups - 1):.2f})"
        size = n // groups
        return f"layers {g * size}-{(g + 1) * size - 1}"

    # ---- decoding -----------------------------------------------------------------------
    def decode(self, genome: np.ndarray) -> Recipe:
        values = iter(self.check_genome(genome).tolist())
        n_groups, n_filters = self.spec.layer_groups, len(self.filter_groups)

        def take() -> list[list[float]]:  # [filter group][layer group]
            return [[next(values) for _ in range(n_groups)] for _ in range(n_filters)]

        model_settings = {m: {name: take() for name in self.model_genes} for m in self.models}
        global_settings = {name: take() for name in self.global_genes}
        fixed = dict(self.spec.fixed)
        if self.spec.normalize is not None and any(p.name == "normalize" for p in self.method.global_params):
            fixed["normalize"] = self.spec.normalize
        block = EvomergeBlock(seed=self.spec.seed)
        common: dict[str, Any] = {"merge_method": self.method.name, "dtype": self.spec.dtype, "evomerge": block}
        if self.base:
            common["base_model"] = self.base

        if n_groups == 1 or self.spec.smooth:
            def setting(per_filter: list[list[float]]) -> Any:
                return self._filtered([v[0] if n_groups == 1 else list(v) for v in per_filter])

            models = [InputModel(model=m, parameters={k: setting(v) for k, v in model_settings[m].items()} or None) for m in self.models]
            if self.method.lists_base:
                models = [InputModel(model=self.base), *models]
            params = {**fixed, **{k: setting(v) for k, v in global_settings.items()}}
            return Recipe(models=models, parameters=params or None, **common)

        size = (self.layer_count or 0) // n_groups
        slices = []
        for g in range(n_groups):
            layer_range = (g * size, (g + 1) * size)
            sources = [
                InputSlice(
                    model=m,
                    layer_range=layer_range,
                    parameters={k: self._filtered([v[g] for v in per_filter]) for k, per_filter in model_settings[m].items()} or None,
                )
                for m in self.models
            ]
            if self.base:
                sources.append(InputSlice(model=self.base, layer_range=layer_range))
            slice_params = {k: self._filtered([v[g] for v in per_filter]) for k, per_filter in global_settings.items()}
            slices.append(OutputSlice(sources=sources, parameters=slice_params or None))
        return Recipe(slices=slices, parameters=fixed or None, **common)

    def _filtered(self, per_filter: list[Any]) -> Any:
        if len(per_filter) == 1:
            return per_filter[0]
        return [
            {"filter": flt, "value": value} if flt != REST else {"value": value}
            for flt, value in zip(self.filter_groups, per_filter, strict=True)
        ]


def _short(ref: str) -> str:
    """A readable model label: the last path component of a reference."""
    tail = ref.rstrip("/").rsplit("/", 1)[-1]
    return tail.split(":")[-1]
