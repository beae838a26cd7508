"""Recipes: a recipe *is* a mergekit configuration, plus an optional top-level `evomerge:` block.

The schema mirrors mergekit's `MergeConfiguration` (merge_method, base_model, models | slices,
parameters, dtype, out_dtype, tokenizer_source, chat_template) so that every recipe evomerge
writes is accepted by `mergekit-yaml`, and mergekit configs using the methods evomerge implements
run here. Parameter values follow mergekit's rules: a scalar, a gradient list (interpolated over
a slice's layers), or a list of `{filter, value}` conditions (first matching filter wins; a
condition without a filter matches everything).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from evomerge.errors import ConfigError, schema_error
from evomerge.merge.specs import ParamSpec, find_spec, unknown_method
from evomerge.resources import read_yaml

DTYPES = ("float32", "float16", "bfloat16")

ParamValue = Any  # scalar | list[float] | list[{filter, value}] | {filter, value}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputModel(_Strict):
    """One entry of `models:`."""

    model: str
    parameters: dict[str, ParamValue] | None = None


class InputSlice(_Strict):
    """One source of an output slice: a model and a half-open layer range."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start <= end, got {list(value)}")
        return value

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_Strict):
    """One entry of `slices:`: layers merged from several sources of equal length."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] | None = None


class EvomergeBlock(BaseModel):
    """evomerge-only facts (seed of random methods, source content hashes, DFS path, scores).

    mergekit's parser ignores unknown top-level keys, so a recipe with this block stays a valid
    mergekit config. Free-form extra keys are kept.

    `allow_mixed_architectures`: merge sources of different model types (e.g. a Llama and a
    Qwen2 of the same shapes); the result takes the reference model's (base's) architecture,
    and tensors it has no place for are dropped with a warning. Refused without it."""

    model_config = ConfigDict(extra="allow")

    seed: int = 0
    source_hashes: dict[str, str] = Field(default_factory=dict)
    allow_mixed_architectures: StrictBool | None = None  # None: false, and not written out


class Recipe(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParamValue] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    evomerge: EvomergeBlock | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Mapping[str, Any], *, file: str | None = None) -> Recipe:
        """Validate a mergekit-style mapping; errors name the file and the field."""
        if not isinstance(data, Mapping):
            raise ConfigError("a recipe must be a mapping (mergekit YAML)", file=file)
        try:
            recipe = cls.model_validate(dict(data))
        except ValidationError as exc:
            raise schema_error(exc, file=file, valid_fields=_valid_fields) from None
        recipe.check(file=file)
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("recipe file does not exist", file=str(path))
        return cls.parse(read_yaml(path) or {}, file=str(path))

    @classmethod
    def from_string(cls, text: str, *, file: str | None = None) -> Recipe:
        return cls.parse(yaml.safe_load(text) or {}, file=file)

    # ---- validation ---------------------------------------------------------------------
    def check(self, *, file: str | None = None) -> None:
        """Checks that need the method registry: method name, parameter names, structure."""

        def fail(field: str, message: str) -> None:
            raise ConfigError(message, file=file, field=field)

        try:
            method = find_spec(self.merge_method)
        except ValueError as exc:  # a plugin that fails to import
            fail("merge_method", str(exc))
        if method is None:
            fail("merge_method", unknown_method(self.merge_method))
        if (self.models is None) == (self.slices is None):
            fail("models", "give exactly one of `models:` or `slices:`")
        for field_name in ("dtype", "out_dtype"):
            value = getattr(self, field_name)
            if value is not None and value not in DTYPES:
                fail(field_name, f"unknown dtype '{value}'; valid: {', '.join(DTYPES)}")
        if method.requires_base and not self.base_model:
            fail("base_model", f"method '{self.merge_method}' needs a base_model")

        model_names = {p.name for p in method.model_params}
        global_names = {p.name for p in method.global_params}
        valid_text = ", ".join(sorted(model_names | global_names)) or "none"

        def check_params(params: dict | None, field: str, allowed: set[str]) -> None:
            for name, value in (params or {}).items():
                if name not in allowed:
                    fail(f"{field}.{name}", f"method '{self.merge_method}' has no parameter '{name}'; valid: {valid_text}")
                spec = method.param(name)
                assert spec is not None
                check_setting(value, spec, file=file, field=f"{field}.{name}")

        if self.models is not None and not self.models:
            fail("models", "is empty; list the models to merge")
        if self.slices is not None and not self.slices:
            fail("slices", "is empty; list at least one output slice")
        if method.requires_base and self.models is not None and all(m.model == self.base_model for m in self.models):
            fail("models", f"method '{self.merge_method}' needs at least one model besides base_model '{self.base_model}'")
        # Top-level and slice-level parameters may set per-model defaults as in mergekit.
        check_params(self.parameters, "parameters", model_names | global_names)
        for i, model in enumerate(self.models or []):
            check_params(model.parameters, f"models[{i}].parameters", model_names)
        for i, out_slice in enumerate(self.slices or []):
            check_params(out_slice.parameters, f"slices[{i}].parameters", model_names | global_names)
            lengths = {s.num_layers for s in out_slice.sources}
            if len(lengths) > 1:
                ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in out_slice.sources)
                fail(f"slices[{i}].sources", f"layer ranges differ in length ({ranges}); every source of a slice needs the same number of layers")
            for j, source in enumerate(out_slice.sources):
                check_params(source.parameters, f"slices[{i}].sources[{j}].parameters", model_names)

        if self.models is not None:
            refs = [m.model for m in self.models]
            if self.base_model and self.base_model not in refs and not method.requires_base:
                refs.append(self.base_model)  # merged as one more input, as mergekit does
            if problem := method.count_problem(_inputs(refs, self.base_model if method.requires_base else None)):
                fail("models", problem)
        for i, out_slice in enumerate(self.slices or []):
            base = (out_slice.base_model or self.base_model) if method.requires_base else None
            if problem := method.count_problem(_inputs([s.model for s in out_slice.sources], base)):
                fail(f"slices[{i}].sources", problem)

    # ---- queries ------------------------------------------------------------------------
    def model_refs(self, include_base: bool = True) -> list[str]:
        """Every model reference the recipe uses, in first-use order, without duplicates."""
        refs: list[str] = []
        if include_base and self.base_model:
            refs.append(self.base_model)
        for model in self.models or []:
            refs.append(model.model)
        for out_slice in self.slices or []:
            refs.extend(s.model for s in out_slice.sources)
            if include_base and out_slice.base_model:
                refs.append(out_slice.base_model)
        if include_base and self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            refs.append(self.tokenizer_source)
        return list(dict.fromkeys(refs))

    def ref_fields(self) -> list[tuple[str, str]]:
        """(field, model reference) for every place the recipe names a model, in order."""
        named = [("base_model", self.base_model)] if self.base_model else []
        named += [(f"models[{i}].model", m.model) for i, m in enumerate(self.models or [])]
        for i, out_slice in enumerate(self.slices or []):
            named += [(f"slices[{i}].sources[{j}].model", s.model) for j, s in enumerate(out_slice.sources)]
            if out_slice.base_model:
                named.append((f"slices[{i}].base_model", out_slice.base_model))
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            named.append(("tokenizer_source", self.tokenizer_source))
        return named

    @property
    def seed(self) -> int:
        return self.evomerge.seed if self.evomerge else 0

    # ---- output -------------------------------------------------------------------------
    def to_dict(self, *, include_evomerge: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        for out_slice in data.get("slices", []):
            for source in out_slice["sources"]:
                source["layer_range"] = list(source["layer_range"])
        if not include_evomerge:
            data.pop("evomerge", None)
        return data

    def to_yaml(self, *, include_evomerge: bool = True) -> str:
        return yaml.safe_dump(self.to_dict(include_evomerge=include_evomerge), sort_keys=False, default_flow_style=None)

    def content_hash(self) -> str:
        """Stable identity of the merge this recipe builds (sha256, 16 hex digits).

        Only what changes the tensors counts: the mergekit part and the evomerge seed (random
        methods), with floats rounded to 12 significant digits so that a YAML round trip keeps it.
        """
        data = self.to_dict(include_evomerge=False)
        data["seed"] = self.seed
        canonical = json.dumps(_round_floats(data), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_evomerge(self, **facts: Any) -> Recipe:
        block = self.evomerge.model_dump() if self.evomerge else {}
        block.update(facts)
        return self.model_copy(update={"evomerge": EvomergeBlock(**block)})


def _inputs(refs: list[str], base: str | None) -> int:
    """How many models one output tensor merges besides ``base`` (as the merge plan splits them)."""
    return sum(1 for ref in refs if ref != base)


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.12g}") if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round_floats(v) for v in value]
    return value


def check_setting(value: Any, spec: ParamSpec, *, file: str | None, field: str) -> None:
    """Accept what mergekit accepts for a parameter setting (a scalar, a gradient list of numbers,
    `{filter, value}` conditions, nested), with every value valid for `spec` (finite, in range,
    booleans as booleans). Raises a ConfigError naming the exact value's field."""

    def bad(message: str, where: str) -> ConfigError:
        return ConfigError(message, file=file, field=where)

    if isinstance(value, Mapping):
        unknown = set(value) - {"filter", "value"}
        if unknown or "value" not in value:
            raise bad("a conditional parameter is {filter: NAME, value: V}", field)
        if value.get("filter") is not None and not isinstance(value["filter"], str):
            raise bad(f"a filter is a substring of tensor names, got {value['filter']!r}", f"{field}.filter")
        check_setting(value["value"], spec, file=file, field=f"{field}.value")
        return
    if isinstance(value, list):
        if not value:
            raise bad(f"is an empty list; give {spec.valid}, a gradient list of numbers or {{filter, value}} conditions", field)
        if all(isinstance(v, Mapping) for v in value):
            for i, cond in enumerate(value):
                check_setting(cond, spec, file=file, field=f"{field}[{i}]")
            return
        if spec.kind == "bool":
            raise bad(f"{spec.name} is {spec.valid} (a gradient list is for numbers), got {value!r}", field)
        for i, item in enumerate(value):
            problem = spec.problem(item)
            if problem:
                raise bad(f"{problem} (an anchor of a gradient list)", f"{field}[{i}]")
        return
    problem = spec.problem(value)
    if problem:
        raise bad(problem, field)


def _valid_fields(parent: str) -> list[str]:
    """Fields of the recipe object at `parent` (a field path), for "unknown field" messages."""
    leaf = re.sub(r"\[\d+\]", "", parent.rsplit(".", 1)[-1]) if parent else ""
    model = {"": Recipe, "models": InputModel, "slices": OutputSlice, "sources": InputSlice}.get(leaf)
    return list(model.model_fields) if model else []


# ---- parameter resolution (mergekit's precedence and gradient rules) -------------------------


def evaluate_setting(setting: ParamValue, tensor_name: str, t: float) -> Any:
    """Value of one parameter setting for one tensor at relative depth t in [0, 1].

    Gradient lists interpolate linearly over their anchor points; `{filter, value}` lists take the
    first condition whose filter is a substring of the tensor name (or has no filter).
    Returns None when no condition matches.
    """
    if isinstance(setting, bool | int | float | str):
        return setting
    if isinstance(setting, Mapping):
        return evaluate_setting([setting], tensor_name, t)
    if isinstance(setting, list):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting):
            if len(setting) == 1:
                return setting[0]
            scaled = t * (len(setting) - 1)
            lo = min(int(scaled), len(setting) - 1)
            hi = min(lo + 1, len(setting) - 1)
            frac = scaled - lo
            return setting[lo] * (1 - frac) + setting[hi] * frac
        for cond in setting:
            flt = cond.get("filter")
            if not flt or flt in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    return None


def resolve_model_param(
    recipe: Recipe,
    name: str,
    model: str,
    tensor_name: str,
    t: float,
    out_slice: OutputSlice | None = None,
) -> Any:
    """Per-model parameter lookup in mergekit's order: slice source, `models:` entry,
    slice parameters, top-level parameters. Returns None when nowhere set."""
    layers: list[dict | None] = []
    if out_slice is not None:
        layers.extend(s.parameters for s in out_slice.sources if s.model == model)
    layers.extend(m.parameters for m in recipe.models or [] if m.model == model)
    if out_slice is not None:
        layers.append(out_slice.parameters)
    layers.append(recipe.parameters)
    return _first_set(layers, name, tensor_name, t)


def resolve_global_param(
    recipe: Recipe, name: str, tensor_name: str, t: float, out_slice: OutputSlice | None = None
) -> Any:
    """Method-wide parameter lookup: slice parameters, then top-level parameters."""
    layers = [out_slice.parameters if out_slice is not None else None, recipe.parameters]
    return _first_set(layers, name, tensor_name, t)


def _first_set(layers: list[dict | None], name: str, tensor_name: str, t: float) -> Any:
    for params in layers:
        if params and name in params:
            value = evaluate_setting(params[name], tensor_name, t)
            if value is not None:
                return value
    return None
